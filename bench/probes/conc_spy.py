"""py-spy of the worker process decoding N streams in the batch (issue 15): where the engine thread's time goes.

    python -m bench.probes.conc_spy --out DIR [--models-dir DIR] [--plan 1:1,8:1,8:4,8:8] [--native]

Needs py-spy on PATH (or beside the Python executable): carry its wheel like the others (bench/README.md).
"""
import argparse
import collections
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ..common import TimedWorker, models_dir
from ..gpu.shapes import SHAPES, build


def summary(raw: Path, top=40):
    incl, leaf, total = collections.Counter(), collections.Counter(), 0
    threads = collections.Counter()
    for ln in raw.read_text().splitlines():
        stack, _, n = ln.rpartition(" ")
        n = int(n)
        threads[stack.split(";")[0][:60]] += n
        if "engine" not in stack.split(";")[0] and "_engine" not in stack:
            continue
        frames = [re.sub(r":\d+\)", ")", f) for f in stack.split(";")]
        total += n
        for f in set(frames):
            incl[f] += n
        leaf[stack.split(";")[-1]] += n  # with its line: which native call of a function
    print(f"samples per thread: {dict(threads.most_common(8))}")
    print(f"engine-thread samples: {total}")
    for f, n in incl.most_common(top):
        print(f"  incl {n:6d} {100 * n / max(total, 1):5.1f}% {f[:130]}")
    for f, n in leaf.most_common(25):
        print(f"  leaf {n:6d} {100 * n / max(total, 1):5.1f}% {f[:130]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models-dir", type=Path, default=models_dir())
    ap.add_argument("--out", required=True)
    ap.add_argument("--plan", default="1:1,8:1,8:4,8:8", help="max_concurrent:streams, comma separated")
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--native", action="store_true")
    a = ap.parse_args()
    path = build(a.models_dir, a.shape, 4)
    vocab = SHAPES[a.shape]["vocab_size"]
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    workers, k = {}, 0
    for item in a.plan.split(","):
        conc, n = (int(x) for x in item.split(":"))
        if conc not in workers:
            t0 = time.perf_counter()
            workers[conc] = w = TimedWorker()
            w.load_model(path, max_concurrent=conc)
            print(f"worker max_concurrent {conc} loaded in {time.perf_counter() - t0:.1f} s", flush=True)
        w = workers[conc]
        ids = [f"g{k}-{i}" for i in range(n)]
        k += 1
        for i, rid in enumerate(ids):
            w.send({"type": "generate", "id": rid, "prompt": {"tokens": [(k * 131 + i * 31 + j * 7) % vocab
                                                                         for j in range(512)]},
                    "params": {"max_tokens": 100000, "temperature": 0.0}})
        w.wait_for(ids[-1], lambda e: e["type"] == "token", timeout=300)
        time.sleep(1)
        raw = Path(a.out) / f"spy-{conc}-{n}.txt"
        cmd = [spy, "record", "-r", "200", "-d", str(a.seconds), "-f", "raw", "--threads", "-o", str(raw),
               "--pid", str(w.ready["pid"])] + (["--native"] if a.native else [])
        r = subprocess.run(cmd, check=False, capture_output=True, text=True)
        for i, rid in enumerate(ids):
            w.send({"type": "cancel", "id": f"c{rid}", "target": rid})
        evs = [w.collect(rid) for rid in ids]
        st = [next(e for e in ev if e["type"] == "stats") for ev in evs]
        tps = [s["generation_tps"] for s in st]
        print(f"\n## max_concurrent {conc}, {n} streams: tps {tps} (aggregate {sum(tps):.0f})", flush=True)
        if raw.exists():
            summary(raw)
        else:
            print("py-spy failed:", r.returncode, r.stderr[-800:])
    for w in workers.values():
        w.close()


if __name__ == "__main__":
    main()
