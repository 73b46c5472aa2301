"""Groundwork for continuous batching (issue 15): what raw mlx-lm's BatchGenerator gives, before the worker.

    python -m bench.gpu.batch_generator --out DIR [--shape llama-3.2-1b] [--bits 4] [--sizes 1,2,4,8,16]

For each batch size N: N random 512-token prompts, ``batch_generate`` with 256 new tokens each; aggregate
decode tok/s (mlx-lm's own stats) and its ratio to one stream decoded by ``generate_step`` (the worker's
path today, concurrency 1). The issue's targets, through the worker: >= 3x at 4 streams, >= 5x at 8.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from ..common import models_dir
from .shapes import SHAPES, build


def single_stream(model, prompt, n) -> float:
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    t_first, count = None, 0
    for _ in generate_step(mx.array(prompt), model, max_tokens=n):
        count += 1
        if t_first is None:
            t_first = time.perf_counter()
    return (count - 1) / (time.perf_counter() - t_first)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--sizes", default="1,2,4,8,16")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--models-dir", type=Path, default=models_dir())
    a = ap.parse_args(argv)
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load
    from mlx_lm.generate import batch_generate

    path = build(a.models_dir, a.shape, a.bits or None)
    model, tok = load(str(path))
    vocab = SHAPES[a.shape]["vocab_size"]
    rng = np.random.default_rng(0)

    def prompts(n):
        return [[int(t) for t in rng.integers(1, vocab - 2, a.prompt)] for _ in range(n)]

    single_stream(model, prompts(1)[0], 32)  # warm-up: kernels compiled
    batch_generate(model, tok, prompts(2), max_tokens=16)
    solo = statistics.median(single_stream(model, prompts(1)[0], a.tokens) for _ in range(3))
    res = {"shape": a.shape, "bits": a.bits, "device": str(mx.default_device()), "prompt": a.prompt,
           "tokens": a.tokens, "single_stream_tps": solo, "batches": []}
    print(f"one stream (generate_step): {solo:.1f} tok/s", flush=True)
    for n in [int(x) for x in a.sizes.split(",")]:
        t0 = time.perf_counter()
        r = batch_generate(model, tok, prompts(n), max_tokens=a.tokens)
        wall = time.perf_counter() - t0
        row = {"n": n, "generation_tps": r.stats.generation_tps, "prompt_tps": r.stats.prompt_tps,
               "wall_s": wall, "vs_single": r.stats.generation_tps / solo,
               "peak_memory_gb": r.stats.peak_memory}
        res["batches"].append(row)
        print(f"N={n}: {row['generation_tps']:.1f} tok/s aggregate ({row['vs_single']:.2f}x one stream), "
              f"prefill {row['prompt_tps']:.0f} tok/s, {wall:.1f} s", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gpu-batch-{a.shape}-q{a.bits}.json").write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
