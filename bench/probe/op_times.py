"""GPU time of the ops of one batched decode step, by rows (issue 15): which op grows with the batch.

    python -m bench.probe.op_times [--rows 1,2,4,8] [--ctx 600]

Each op is issued ``--reps`` times back to back (independent outputs, one eval), so launch overhead on the
host is amortised and the figure is the GPU's. Shapes: Llama-3.2-1B's (hidden 2048, 32/8 heads of 64,
MLP 8192, vocab 128256), 4-bit affine, group 64.
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402

from worker.cuda import batch_kernels as cuda_batch  # noqa: E402


def timed(fn, reps):
    outs = [fn() for _ in range(3)]
    mx.eval(outs)
    best = None
    for _ in range(3):
        t = time.perf_counter()
        outs = [fn() for _ in range(reps)]
        mx.eval(outs)
        dt = (time.perf_counter() - t) / reps * 1e6
        best = dt if best is None else min(best, dt)
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--ctx", type=int, default=600)
    ap.add_argument("--reps", type=int, default=200)
    a = ap.parse_args()
    rows = [int(r) for r in a.rows.split(",")]
    mats = {"q/o 2048x2048": (2048, 2048), "k/v 512x2048": (512, 2048), "up 8192x2048": (8192, 2048),
            "down 2048x8192": (2048, 8192), "head 128256x2048": (128256, 2048)}
    for name, (n, k) in mats.items():
        w = mx.random.normal((n, k)).astype(mx.bfloat16)
        wq, s, b = mx.quantize(w, group_size=64, bits=4)
        mx.eval(wq, s, b)
        line = []
        for m in rows:
            x = mx.random.normal((m, 1, k)).astype(mx.bfloat16)
            qmm = timed(lambda: mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=4), a.reps)
            item = f"{m}: {qmm:.1f}us"
            if m > 1:
                ours = timed(lambda: cuda_batch.rows_qmv(x, wq, s, b, 64), a.reps)
                ref = mx.quantized_matmul(x, wq, s, b, transpose=True, group_size=64, bits=4)
                err = (mx.abs(ref - cuda_batch.rows_qmv(x, wq, s, b, 64)).max() / mx.abs(ref).max()).item()
                item += f" (rows_qmv {ours:.1f}us, rel err {err:.1e})"
            line.append(item)
        print(f"qmm {name}: " + ", ".join(line), flush=True)
    L, D, Hq, Hk = a.ctx, 64, 32, 8
    for m in rows:
        q = mx.random.normal((m, Hq, 1, D)).astype(mx.bfloat16)
        kb = mx.random.normal((m, Hk, L + 256, D)).astype(mx.bfloat16)
        vb = mx.random.normal((m, Hk, L + 256, D)).astype(mx.bfloat16)
        k, v = kb[..., :L, :], vb[..., :L, :]
        mask = (mx.arange(L)[None] >= mx.arange(m)[:, None] * 5)[:, None, None, :]
        mx.eval(q, kb, vb, mask)
        nomask = timed(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125), a.reps)
        masked = timed(lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask), a.reps)
        line = f"sdpa rows {m}: nomask {nomask:.1f}us, mask {masked:.1f}us"
        if m > 1:
            ours = timed(lambda: cuda_batch.decode_attention(q, k, v, 0.125, mask), a.reps)
            line += f", kernel {ours:.1f}us"
        print(line, flush=True)
    for m in rows:
        x = mx.random.normal((m, 1, 2048)).astype(mx.bfloat16)
        wn = mx.ones((2048,), dtype=mx.bfloat16)
        norm = timed(lambda: mx.fast.rms_norm(x, wn, 1e-5), a.reps)
        logits = mx.random.normal((m, 128256)).astype(mx.bfloat16)
        lse = timed(lambda: mx.argmax(logits - mx.logsumexp(logits, axis=-1, keepdims=True), axis=-1), a.reps)
        print(f"rows {m}: rms_norm {norm:.1f}us, logsumexp+argmax {lse:.1f}us", flush=True)


if __name__ == "__main__":
    main()
