"""One batched decode step's logits per kernel choice against each row decoded alone (issue 15, GPU).

    python -m bench.probe.step_logits --models-dir DIR [--shapes gemma3-1b,llama-3.2-1b] [--sizes 2,4]

Greedy tokens of a random-weight model can flip on a near tie, so counting equal tokens (batch_host.py
--agree) cannot tell a rounding difference from a wrong kernel. Per row this prints, for one step from the
same prefilled caches: the largest logit difference of each variant (``base``: MLX's batch path;
``attn``: + decode_attention, ``attn_win`` / ``attn_full``: on the sliding-window layers only / on
the others; ``qmv``: + rows_qmv on 8M+ matrices; ``both``; ``fused``: + q/k/v and
swiglu in one launch each) against the row run alone on its own cache (what the worker gives it alone),
relative to the logits' range, whether its argmax is the same, and the alone run's top-2 margin. First,
decode_attention alone against MLX's SDPA on random inputs of each model family's head shapes.
"""

import argparse
import contextlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402

from bench.gpu import SHAPES, build  # noqa: E402
from bench.probe.batch_step import prefilled  # noqa: E402
from worker.cuda import batch_kernels as cuda_batch  # noqa: E402

ATTN = dict(attention=True, matmul=False)
VARIANTS = {"base": None, "attn": ATTN, "attn_win": ATTN, "attn_full": ATTN,
            "qmv": dict(attention=False, fuse=False), "both": dict(fuse=False), "fused": dict(fuse=True)}
FITS = cuda_batch.fits


def kernel_alone(q_shape, kv_heads, L, pad, dtype):
    """decode_attention against MLX's SDPA on random inputs: keys and values strided views of larger
    buffers, rows left-padded by ``pad``; the max relative difference."""
    B, Hq, _, D = q_shape
    q = mx.random.normal(q_shape, key=mx.random.key(0)).astype(dtype)
    kb, vb = (mx.random.normal((B, kv_heads, L + 64, D), key=mx.random.key(i)).astype(dtype) for i in (1, 2))
    k, v = kb[..., :L, :], vb[..., :L, :]
    mask = (mx.arange(L)[None] >= mx.array(pad)[:, None])[:, None, None, :]
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=D ** -0.5, mask=mask).astype(mx.float32)
    got = cuda_batch.decode_attention(q, k, v, D ** -0.5, mask).astype(mx.float32)
    return (mx.abs(got - ref).max() / mx.abs(ref).max()).item()


def main():
    import numpy as np

    ap = argparse.ArgumentParser()
    ap.add_argument("--models-dir", default="/tmp/gpu-models")
    ap.add_argument("--shapes", default="gemma3-1b,llama-3.2-1b")
    ap.add_argument("--sizes", default="2,4")
    ap.add_argument("--prompt", type=int, default=700)
    a = ap.parse_args()
    for D, hq, hk in () if not cuda_batch.available() else ((64, 32, 8), (128, 28, 4), (256, 4, 1), (256, 8, 4)):
        for L in (512, 700):
            errs = [kernel_alone((4, hq, 1, D), hk, L, [0, 37, 74, 111], t) for t in (mx.bfloat16, mx.float32)]
            print(f"kernel D={D} Hq={hq} Hk={hk} L={L}: rel diff bf16 {errs[0]:.2e}, fp32 {errs[1]:.2e}", flush=True)
    from mlx_lm import load
    for shape in a.shapes.split(","):
        model, _ = load(str(build(Path(a.models_dir), shape, 4)))
        vocab = SHAPES[shape]["vocab_size"]
        rng = np.random.default_rng(0)
        for b in (int(x) for x in a.sizes.split(",")):
            ps = [[int(x) for x in rng.integers(1, vocab - 2, a.prompt - 37 * i)] for i in range(b)]
            y = mx.array([p[-1] for p in ps])
            alone = [model(y[i:i + 1, None], cache=c)[:, -1, :].astype(mx.float32)
                     for i, c in enumerate(prefilled(model, ps))]
            alone = mx.concatenate(alone)
            top2 = mx.sort(alone, axis=-1)[:, -2:]
            margin = (top2[:, 1] - top2[:, 0]).tolist()
            span = (alone.max(axis=-1) - alone.min(axis=-1)).tolist()
            print(f"{shape} B={b}: alone top-2 margin {[f'{m:.3g}' for m in margin]}, logit span "
                  f"{[f'{s:.3g}' for s in span]}", flush=True)
            for name, kw in VARIANTS.items():
                caches = prefilled(model, ps)
                cache = [layer.merge([cs[i] for cs in caches]) for i, layer in enumerate(caches[0])]
                kernels = cuda_batch.batch_kernels(model, **kw) if kw is not None else None
                window = SHAPES[shape].get("sliding_window")  # a wrapped window layer attends to exactly it
                cuda_batch.fits = {"attn_win": lambda q, k, m: FITS(q, k, m) and k.shape[2] == window,
                                   "attn_full": lambda q, k, m: FITS(q, k, m) and k.shape[2] != window}.get(name, FITS)
                with kernels(b) if kernels else contextlib.nullcontext():
                    got = model(y[:, None], cache=cache)[:, -1, :].astype(mx.float32)
                diff = (mx.abs(got - alone).max(axis=-1) / mx.array(span)).tolist()
                same = (mx.argmax(got, axis=-1) == mx.argmax(alone, axis=-1)).tolist()
                print(f"  {name:6s} rel diff {[f'{d:.2e}' for d in diff]}, argmax same {same}", flush=True)
        del model
        mx.clear_cache()


if __name__ == "__main__":
    main()
