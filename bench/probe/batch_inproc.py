"""Where a batched decode step's time goes in the worker's own code (issue 15), in process.

    python -m bench.probe.batch_inproc --models-dir DIR [--sizes 1,2,4,8] [--tokens 256] [--model DIR]

Per batch size: the worker's Batcher with N requests; per tick, ms building the step's graph (up to
async_eval), waiting for the previous step (tolist), and the rest (tokens through each request's Run,
events). Against it: worker.generation.solo.run alone (generate_step), tokens per second from its stats.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402

from bench.gpu import build  # noqa: E402


class Job:
    def __init__(self, req):
        self.req = req


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models-dir", default="/root/models")
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--sizes", default="1,2,4,8")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--model", help="a model directory instead of the random --shape (e.g. SmolLM2 on a CPU)")
    a = ap.parse_args()
    from worker.generation import decode_batch as batch
    from worker.generation import solo as generate
    from worker.loading import model
    from worker.protocol import Generate, GenerateParams, LoadOptions, Prompt
    from worker.generation.batcher import Batcher

    path = a.model or build(Path(a.models_dir), a.shape, a.bits or None)
    kit = model.load(str(path), LoadOptions(max_concurrent=8, warmup=True), lambda f: None)
    vocab = kit.info.vocab_size
    n_req = [0]

    def req(n):
        n_req[0] += 1
        ids = [(n_req[0] * 7919 + i * 104729) % (vocab - 2) + 1 for i in range(a.prompt)]
        return Generate(id=f"r{n_req[0]}", prompt=Prompt(tokens=ids), params=GenerateParams(max_tokens=n))

    batch.warm_up(kit.model, kit.cache.fresh, 8)
    for rnd in range(2):
        solo = []
        for _ in range(2):
            events = []
            generate.run(kit, req(a.tokens), events.append, lambda: False)
            solo.append(next(e for e in events if type(e).__name__ == "Stats").generation_tps)
        line = [f"solo {statistics.median(solo):.0f} tok/s"]
        for n in [int(x) for x in a.sizes.split(",")]:
            b = Batcher(kit)
            marks = []
            orig = b.batch.step

            def timed_step():
                t0 = time.perf_counter()
                out = orig()
                marks.append((t0, time.perf_counter()))
                return out

            b.batch.step = timed_step
            for _ in range(n):
                b.admit(Job(req(a.tokens)), lambda e: None, lambda: False)
            k0 = k1 = None
            finished = 0
            while finished < n:
                finished += len(b.tick())
                if k0 is None and len(b.batch) == n:
                    k0 = len(marks)
                if k1 is None and finished:
                    k1 = len(marks) - 1
            span = marks[k1 - 1][1] - marks[k0][0]
            steps = k1 - k0
            inside = [m[1] - m[0] for m in marks[k0:k1]]
            rest = [marks[i + 1][0] - marks[i][1] for i in range(k0, k1 - 1)]
            line.append(f"N={n}: {steps * n / span:.0f} tok/s, step {span / steps * 1000:.2f} ms "
                        f"(in step() {statistics.median(inside) * 1000:.2f}, outside {statistics.median(rest) * 1000:.2f})")
        print(f"round {rnd}: " + "; ".join(line), flush=True)


if __name__ == "__main__":
    main()
