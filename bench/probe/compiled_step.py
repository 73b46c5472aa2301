"""A batched decode step as one compiled MLX function (issue 15): does it run there, the same tokens, how fast.

mlx-lm's model traced by ``mx.compile`` once per batch shape, with a stand-in cache that writes the new
keys and values at a dynamic index (``mx.slice_update``) and hands the model the whole buffer with a mask
of the positions each row holds. Measured on an H200 (bench/README.md): it runs, its greedy tokens equal
mlx-lm's batch step's, and it is no faster (a 4-row step there is bound by the GPU), so the worker does
not use it.

    python -m bench.probe.compiled_step --models-dir DIR [--rows 4] [--steps 48]

The lean loop of batch_host.py over merged BatchKVCaches of ``--rows`` rows with the worker's kernel
context: mlx-lm's step against worker/batch_compiled.py's, interleaved, plus one row alone; greedy tokens
of the two batched loops compared step by step. Prints as it goes (a cut run still says something).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import mlx.core as mx  # noqa: E402

from bench.gpu import SHAPES, build  # noqa: E402
from bench.probe.batch_step import prefilled  # noqa: E402
from mlx_lm.models.cache import BatchKVCache  # noqa: E402
from collections import OrderedDict  # noqa: E402
from typing import List, Optional  # noqa: E402

from worker.cuda import batch_kernels as cuda_batch  # noqa: E402
from worker.generation.decode_batch import _merge  # noqa: E402

KEEP = 4  # compiled shapes kept: the batch's current one and its recent ones


class _StepCache:
    """A BatchKVCache's place inside the traced step: full buffers, a dynamic write index."""

    def __init__(self, keys, values, offset, idx, left_padding):
        self.keys, self.values, self.offset = keys, values, offset
        self.idx, self.left_padding = idx, left_padding

    def update_and_fetch(self, keys, values):
        self.keys = mx.slice_update(self.keys, keys, self.idx, axes=(2,))
        self.values = mx.slice_update(self.values, values, self.idx, axes=(2,))
        return self.keys, self.values

    def make_mask(self, N: int, return_array: bool = False, window_size=None):
        """BatchKVCache's mask for one new token, over the whole buffer: left padding and the positions
        not written yet are out."""
        pos = mx.arange(self.keys.shape[2])
        return ((pos <= self.idx) & (pos >= self.left_padding[:, None]))[:, None, None, :]


def compilable(cache: Optional[list], addon) -> bool:
    return addon is None and bool(cache) and all(type(c) is BatchKVCache for c in cache)


class Forward:
    """The logits of one decode step of a batch, computed by a compiled function (see the module)."""

    def __init__(self, model):
        self.model = model
        self.traces: "OrderedDict[tuple, object]" = OrderedDict()
        self.off = False  # the model could not be traced: every step runs uncompiled

    def _function(self):
        model = self.model

        def step(y, idx, left_padding, offset, *kv):
            caches = [_StepCache(kv[i], kv[i + 1], offset, idx, left_padding) for i in range(0, len(kv), 2)]
            logits = model(y[:, None], cache=caches)[:, -1, :]
            return [logits, offset + 1] + [a for c in caches for a in (c.keys, c.values)]

        return mx.compile(step)

    def __call__(self, y: mx.array, cache: List[BatchKVCache]) -> Optional[mx.array]:
        """The step's logits, with ``cache`` advanced by one token; None where it must run uncompiled."""
        first = cache[0]
        if self.off or first.keys is None or first._idx >= first.keys.shape[2]:
            return None  # the buffers grow in this step: mlx-lm's own path
        key = (y.shape[0], first.keys.shape[2], first.keys.dtype)
        fn = self.traces.pop(key, None) or self._function()
        self.traces[key] = fn
        while len(self.traces) > KEEP:
            self.traces.popitem(last=False)
        kv = [a for c in cache for a in (c.keys, c.values)]
        for c in cache:  # the buffers' only references go into the step, so it may write them in place
            c.keys = c.values = None
        try:
            out = fn(y, mx.array(first._idx, dtype=mx.int32), first.left_padding, first.offset, *kv)
        except Exception:  # noqa: BLE001 - a model the trace cannot take: mlx-lm's own path, always
            for i, c in enumerate(cache):
                c.keys, c.values = kv[2 * i], kv[2 * i + 1]
            self.off = True
            return None
        del kv
        offset = out[1]
        for i, c in enumerate(cache):
            c.keys, c.values = out[2 + 2 * i], out[3 + 2 * i]
            c._idx += 1
            c.offset = offset
        return out[0]



def loop(model, cache, last, steps, compiled):
    kernels = cuda_batch.batch_kernels(model) if len(last) > 1 else None
    fwd = Forward(model)
    y, prev, times, toks, taken = mx.array(last), None, [], [], 0
    for _ in range(steps + 1):
        t = time.perf_counter()
        with kernels(len(last)) if kernels else _null():
            logits = fwd(y, cache) if compiled and len(last) > 1 else None
            taken += logits is not None
            if logits is None:
                logits = model(y[:, None], cache=cache)[:, -1, :]
            nxt = mx.argmax(logits - mx.logsumexp(logits, axis=-1, keepdims=True), axis=-1)
        mx.async_eval(nxt)
        if prev is not None:
            toks.append(prev.tolist())
        prev = y = nxt
        times.append(time.perf_counter() - t)
    return statistics.median(times[4:]) * 1000, toks, taken


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def main():
    import numpy as np

    ap = argparse.ArgumentParser()
    ap.add_argument("--models-dir", default="/tmp/gpu-models")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shape", default="llama-3.2-1b")
    a = ap.parse_args()
    from mlx_lm import load
    model, _ = load(str(build(Path(a.models_dir), a.shape, 4)))
    vocab = SHAPES[a.shape]["vocab_size"]
    rng = np.random.default_rng(0)
    ps = [[int(x) for x in rng.integers(1, vocab - 2, 512 - 7 * i)] for i in range(a.rows)]
    last = [p[-1] for p in ps]
    for rnd in range(a.rounds):
        t0 = time.perf_counter()
        one = loop(model, prefilled(model, ps[:1])[0], last[:1], a.steps, False)[0]
        plain, ref, _ = loop(model, _merge(prefilled(model, ps)), last, a.steps, False)
        comp, got, taken = loop(model, _merge(prefilled(model, ps)), last, a.steps, True)
        same = sum(r == g for r, g in zip(ref, got))
        print(f"round {rnd} ({time.perf_counter() - t0:.1f} s): 1 row {one:.2f} ms; {a.rows} rows mlx-lm "
              f"{plain:.2f} ms, compiled {comp:.2f} ms ({taken} compiled steps); tokens equal in {same}/"
              f"{len(ref)} steps; ratio vs one row: mlx-lm {a.rows * one / plain:.2f}x, compiled "
              f"{a.rows * one / comp:.2f}x", flush=True)


if __name__ == "__main__":
    main()
