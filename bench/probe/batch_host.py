"""Host time against step time of a batched decode step, per kernel choice (issue 15).

    python -m bench.probe.batch_host --models-dir DIR [--sizes 1,2,4,8] [--steps 64] [--rounds 3]

The lean loop of bench/probe/batch_step.py over merged BatchKVCaches, per variant of
worker/cuda/batch_kernels.py: ``base`` (MLX as is), ``attn`` (attention kernel only), ``head`` (attention +
rows_qmv for the output head only), ``both`` (attention + rows_qmv for every matrix of 8M+
weights), ``allqmv`` (attention + rows_qmv for every quantized matmul of 2+ rows), ``policy`` (the
worker's: cuda_batch.QMV_LEAST, MLX_WORKER_QMV_LEAST overrides it), ``fused`` (``both`` with q/k/v
one launch and gate, up and swiglu another), ``fusedo`` (``fused`` with the 4M-weight o_proj through rows_qmv too),
and ``nomask`` (mask dropped, MLX as is: a floor, wrong output). Per step: ``build`` ms of Python building
the graph, ``encode`` ms in async_eval (the host encoding the kernels), ``step`` ms between steps.
Variants are interleaved per round so the machine's drift hits them alike; medians over rounds are printed.
"""

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402
from mlx_lm.models import cache as C  # noqa: E402

from bench.gpu import SHAPES, build  # noqa: E402
from bench.probe.batch_step import prefilled  # noqa: E402
from worker.cuda import batch_kernels as cuda_batch  # noqa: E402

POLICY = dict(cuda_batch.QMV_LEAST)

VARIANTS = {"base": (False, False, None), "attn": (True, False, None), "head": (True, True, 1 << 26),
            "both": (True, True, 1 << 23), "allqmv": (True, True, 0), "nomask": (False, False, None),
            "policy": (True, True, "policy"), "fused": (True, True, 1 << 23, True),
            "fusedo": (True, True, 1 << 22, True)}


def kernels_of(model, name):
    """The step context factory of a variant (None off CUDA); sets its rows policy."""
    attn, matmul, least, *fuse = VARIANTS[name]
    cuda_batch.QMV_LEAST = POLICY if least in (None, "policy") else {2: least}
    return cuda_batch.batch_kernels(model, attn, matmul, fuse=bool(fuse) if least != "policy" else None)


def loop(model, cache, last, steps, ctx):
    """Per step (median ms): building the graph, encoding it (async_eval), and the whole step."""
    y, prev, build, encode, wall = mx.array(last), None, [], [], []
    for _ in range(steps + 1):
        t = time.perf_counter()
        with ctx():
            logits = model(y[:, None], cache=cache)[:, -1, :]
            nxt = mx.argmax(logits - mx.logsumexp(logits, axis=-1, keepdims=True), axis=-1)
            t1 = time.perf_counter()
            mx.async_eval(nxt)
        t2 = time.perf_counter()
        build.append(t1 - t)
        encode.append(t2 - t1)
        if prev is not None:
            prev.tolist()
        prev, y = nxt, nxt
        wall.append(time.perf_counter() - t)
    return tuple(statistics.median(v[4:]) * 1000 for v in (build, encode, wall))


def run_variant(model, name, ps, steps):
    caches = prefilled(model, ps)
    cache = caches[0] if len(ps) == 1 else [layer.merge([cs[i] for cs in caches])
                                            for i, layer in enumerate(caches[0])]
    kernels = kernels_of(model, name)

    def ctx():
        return kernels(len(ps)) if kernels else contextlib.nullcontext()

    orig = C.BatchKVCache.make_mask
    if name == "nomask":
        C.BatchKVCache.make_mask = lambda self, N, **k: None
    try:
        return loop(model, cache, [p[-1] for p in ps], steps, ctx)
    finally:
        C.BatchKVCache.make_mask = orig


def check_parts():
    """rows_qmv_parts against MLX's quantized_matmul on random 4-bit matrices (q/k/v and gate/up shapes)."""
    for ns, K in (((2048, 512, 512), 2048), ((8192, 8192), 2048), ((4096, 1024, 1024), 4096)):
        mats = []
        for i, n in enumerate(ns):
            w, s, b = mx.quantize(mx.random.normal((n, K), key=mx.random.key(i)), group_size=64, bits=4)
            mats.append((w, s.astype(mx.bfloat16), b.astype(mx.bfloat16)))
        for M in (2, 4, 8):
            x = mx.random.normal((M, 1, K), key=mx.random.key(9)).astype(mx.bfloat16)
            got = cuda_batch.rows_qmv_parts(x, mats, 64)
            errs = []
            for (w, s, b), g in zip(mats, got):
                ref = cuda_batch._QMM(x, w, s, b, transpose=True, group_size=64, bits=4).astype(mx.float32)
                errs.append((mx.abs(g.astype(mx.float32) - ref).max() / mx.abs(ref).max()).item())
            if len(ns) == 2:  # gate and up: the MLP's swiglu in one launch
                from mlx_lm.models.activations import swiglu
                ref = swiglu(*(cuda_batch._QMM(x, *m, transpose=True, group_size=64, bits=4) for m in mats))
                got = cuda_batch.rows_qmv_swiglu(x, *mats, 64).astype(mx.float32)
                ref = ref.astype(mx.float32)
                errs.append((mx.abs(got - ref).max() / mx.abs(ref).max()).item())
            print(f"parts {ns} K={K} M={M}: max rel err " + ", ".join(f"{e:.1e}" for e in errs), flush=True)


def agree(model, prompts, sizes, names, steps=48):
    """How many of ``steps`` greedy batch steps of each variant give base's tokens in every row."""
    for b in sizes:
        if b == 1:
            continue
        runs = {}
        for name in ["base"] + [n for n in names if n not in ("base", "nomask")]:
            caches = prefilled(model, prompts[b])
            cache = [layer.merge([cs[i] for cs in caches]) for i, layer in enumerate(caches[0])]
            kernels = kernels_of(model, name)
            y, out = mx.array([p[-1] for p in prompts[b]]), []
            for _ in range(steps):
                with kernels(b) if kernels else contextlib.nullcontext():
                    y = mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)
                out.append(y.tolist())
            runs[name] = out
        print(f"agree B={b}: " + ", ".join(f"{n} {sum(r == g for r, g in zip(runs['base'], o))}/{steps}"
                                           for n, o in runs.items() if n != "base"), flush=True)


def main():
    import numpy as np

    ap = argparse.ArgumentParser()
    ap.add_argument("--models-dir", default="/root/models")
    ap.add_argument("--shape", default="llama-3.2-1b")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--sizes", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--agree", action="store_true", help="first: greedy tokens of each variant against base")
    a = ap.parse_args()
    names = a.variants.split(",")
    from mlx_lm import load
    model, _ = load(str(build(Path(a.models_dir), a.shape, a.bits or None)))
    vocab = SHAPES[a.shape]["vocab_size"]
    rng = np.random.default_rng(0)
    sizes = [int(x) for x in a.sizes.split(",")]
    prompts = {b: [[int(x) for x in rng.integers(1, vocab - 2, a.prompt - 7 * i)] for i in range(b)] for b in sizes}
    if a.agree:
        if cuda_batch.available():
            check_parts()
        agree(model, prompts, sizes, names)
    t = time.perf_counter()
    for b in sizes:  # warm-up: every kernel of every size compiles
        for name in names:
            run_variant(model, name, prompts[b], 8)
    print(f"warm-up {time.perf_counter() - t:.1f} s", flush=True)
    res = {}
    for _ in range(a.rounds):
        for b in sizes:
            for name in names:
                if b == 1 and name not in ("base",):
                    continue
                res.setdefault((b, name), []).append(run_variant(model, name, prompts[b], a.steps))
    for (b, name), vals in sorted(res.items()):
        built, encoded, step = (statistics.median(v[i] for v in vals) for i in range(3))
        print(f"B={b} {name:6s} build {built:.2f} ms, encode {encoded:.2f} ms, wait {step - built - encoded:.2f}"
              f" ms, step {step:.2f} ms  (steps: "
              + ", ".join(f"{v[2]:.2f}" for v in vals) + ")", flush=True)


if __name__ == "__main__":
    main()
