"""Host cost of one call of worker/cuda/batch_kernels.py's kernels against MLX's own ops (issue 15).

    python -m bench.probe.kernel_host [--calls 400] [--spy OUT]

Per op: microseconds of host time to issue one call (no eval in between), then GPU time per call.
With --spy, py-spy (native frames) samples a loop of attention-kernel calls and prints the leaf frames.
"""

import argparse
import collections
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402

from worker.cuda import batch_kernels as cuda_batch  # noqa: E402


def inputs(B=4, L=600, D=64, Hq=32, Hk=8):
    q = mx.random.normal((B, Hq, 1, D)).astype(mx.bfloat16)
    kb = mx.random.normal((B, Hk, L + 256, D)).astype(mx.bfloat16)
    vb = mx.random.normal((B, Hk, L + 256, D)).astype(mx.bfloat16)
    mask = (mx.arange(L)[None] >= mx.arange(B)[:, None] * 5)[:, None, None, :]
    mx.eval(q, kb, vb, mask)
    return q, kb[..., :L, :], vb[..., :L, :], mask


def host_us(fn, calls):
    mx.eval([fn() for _ in range(8)])
    t = time.perf_counter()
    outs = [fn() for _ in range(calls)]
    issue = (time.perf_counter() - t) / calls * 1e6
    mx.eval(outs)
    total = (time.perf_counter() - t) / calls * 1e6
    return issue, total


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--spy")
    ap.add_argument("--loop", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    q, k, v, mask = inputs()
    if a.loop:
        end = time.time() + 12
        while time.time() < end:
            mx.eval([cuda_batch.decode_attention(q, k, v, 0.125, mask) for _ in range(100)])
        return
    x = mx.random.normal((8, 1, 2048)).astype(mx.bfloat16)
    wq, s, b = mx.quantize(mx.random.normal((8192, 2048)).astype(mx.bfloat16), group_size=64, bits=4)
    ops = {
        "sdpa nomask": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125),
        "sdpa mask (fallback)": lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125, mask=mask),
        "decode_attention": lambda: cuda_batch.decode_attention(q, k, v, 0.125, mask),
        "quantized_matmul 8 rows": lambda: mx.quantized_matmul(x, wq, s, b, group_size=64, bits=4),
        "rows_qmv 8 rows": lambda: cuda_batch.rows_qmv(x, wq, s, b, 64),
        "add": lambda: q + 1,
    }
    for name, fn in ops.items():
        issue, total = host_us(fn, a.calls)
        print(f"{name:26s} host {issue:6.1f} us/call, issue+eval {total:6.1f} us/call", flush=True)
    try:
        comp = mx.compile(lambda q, k, v, m: cuda_batch.decode_attention(q, k, v, 0.125, m), shapeless=True)
        issue, total = host_us(lambda: comp(q, k, v, mask), a.calls)
        print(f"{'compiled shapeless attn':26s} host {issue:6.1f} us/call, issue+eval {total:6.1f} us/call")
    except Exception as exc:  # noqa: BLE001 - a probe: report and go on
        print(f"shapeless compile: {type(exc).__name__}: {exc}"[:300], flush=True)
    if a.spy:
        raw = Path(a.spy) / "kernel-spy.txt"
        spy = str(Path(sys.executable).parent / "py-spy") if Path(sys.executable).with_name("py-spy").exists() \
            else "/tmp/site/bin/py-spy"
        subprocess.run([spy, "record", "-r", "500", "-d", "8", "-n", "-f", "raw", "-o", str(raw), "--",
                        sys.executable, "-m", "bench.probe.kernel_host", "--loop"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        leaf, incl = collections.Counter(), collections.Counter()
        for ln in raw.read_text().splitlines():
            stack, _, n = ln.rpartition(" ")
            frames = stack.split(";")
            leaf[frames[-1][:140]] += int(n)
            for f in set(frames):
                incl[f[:140]] += int(n)
        print("leaf frames:")
        for f, n in leaf.most_common(30):
            print(f"  {n:6d} {f}")
        print("inclusive:")
        for f, n in incl.most_common(40):
            print(f"  {n:6d} {f}")


if __name__ == "__main__":
    main()
