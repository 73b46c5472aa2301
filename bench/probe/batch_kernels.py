"""The batch step with worker/cuda/batch_kernels.py's kernels (issue 15): per-step ms and agreement with MLX.

    python -m bench.probe.batch_kernels --models-dir DIR [--sizes 1,2,4,8] [--steps 128]

First checks ``decode_attention`` against ``mx.fast.scaled_dot_product_attention`` on random left-padded
batches (head dims 64/128/256, bf16/fp16/fp32, strided KV views). Then times the lean decode loop of
bench/probe/batch_step.py over merged BatchKVCaches: ``base`` (MLX as is), ``attn`` (the attention
kernel), ``qmv`` (rows through gather_qmm), ``both``, and ``nomask`` (mask dropped: a floor, wrong
output), and how many greedy tokens of each agree with ``base``.
"""

import argparse
import contextlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402
from mlx_lm.models import cache as C  # noqa: E402

from bench.gpu import SHAPES, build  # noqa: E402
from bench.probe.batch_step import lean, prefilled  # noqa: E402
from worker.cuda import batch_kernels as cuda_batch  # noqa: E402


def check_kernel():
    for D in (64, 128, 256):
        for dt in (mx.bfloat16, mx.float16, mx.float32):
            B, Hq, Hk, L, cap = 5, 8, 2, 300, 512
            q = mx.random.normal((B, Hq, 1, D)).astype(dt)
            kbuf = mx.random.normal((B, Hk, cap, D)).astype(dt)
            vbuf = mx.random.normal((B, Hk, cap, D)).astype(dt)
            k, v = kbuf[..., :L, :], vbuf[..., :L, :]
            pad = mx.array([0, 3, 100, 7, 299])
            mask = (mx.arange(L)[None] >= pad[:, None])[:, None, None, :]
            ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=D ** -0.5, mask=mask)
            got = cuda_batch.decode_attention(q, k, v, D ** -0.5, mask)
            err = mx.abs(ref.astype(mx.float32) - got.astype(mx.float32)).max().item()
            print(f"kernel D={D} {dt}: max abs diff {err:.2e}", flush=True)


def greedy(model, caches_fn, last, steps, ctx):
    cache = caches_fn()
    y, out = mx.array(last), []
    for _ in range(steps):
        with ctx():
            logits = model(y[:, None], cache=cache)[:, -1, :]
        y = mx.argmax(logits, axis=-1)
        out.append(y.tolist())
    return out


def run_all(model, vocab, sizes, steps, plen, agree=False):
    import numpy as np
    rng = np.random.default_rng(0)
    out = {}
    variants = {"base": (False, False), "attn": (True, False), "qmv": (False, True), "both": (True, True)}
    orig = C.BatchKVCache.make_mask
    for b in sizes:
        ps = [[int(x) for x in rng.integers(1, vocab - 2, plen - 7 * i)] for i in range(b)]

        def merged():
            caches = prefilled(model, ps)
            if b == 1:
                return caches[0]
            return [layer.merge([cs[i] for cs in caches]) for i, layer in enumerate(caches[0])]

        def patched(name):
            a, m = variants[name]
            kernels = cuda_batch.batch_kernels(model, a, m)
            return lambda: kernels(b) if kernels else contextlib.nullcontext()

        for name in variants:
            with patched(name)():
                out[f"{name} {b}"] = lean(model, merged(), [p[-1] for p in ps], steps)
        if b > 1:
            C.BatchKVCache.make_mask = lambda self, N, **k: None
            try:
                out[f"nomask {b}"] = lean(model, merged(), [p[-1] for p in ps], steps)
            finally:
                C.BatchKVCache.make_mask = orig
        if agree and b > 1:
            ref = greedy(model, merged, [p[-1] for p in ps], 64, contextlib.nullcontext)
            for name in ("attn", "qmv", "both"):
                got = greedy(model, merged, [p[-1] for p in ps], 64, patched(name))
                same = sum(r == g for r, g in zip(ref, got))
                print(f"agree {name} {b}: {same}/64 steps identical", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models-dir", default="/root/models")
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--sizes", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=512)
    a = ap.parse_args()
    check_kernel()
    from mlx_lm import load
    model, _ = load(str(build(Path(a.models_dir), a.shape, a.bits or None)))
    sizes = [int(x) for x in a.sizes.split(",")]
    t = time.perf_counter()
    run_all(model, SHAPES[a.shape]["vocab_size"], sizes, 24, a.prompt, agree=True)
    print(f"warm-up {time.perf_counter() - t:.1f} s", flush=True)
    for rnd in range(2):
        res = run_all(model, SHAPES[a.shape]["vocab_size"], sizes, a.steps, a.prompt)
        print(f"round {rnd}: " + ", ".join(f"{k} {v:.2f}ms" for k, v in res.items()), flush=True)


if __name__ == "__main__":
    main()
