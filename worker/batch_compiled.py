"""A batched decode step as one compiled MLX function (issue 15): the host builds no graph per step.

On a GPU a decode step of a small model is bound by the host: Python and MLX building the step's graph
(~300 operations) cost as much as encoding its kernels, and more than the GPU takes to run them. With
``mx.compile`` the graph is traced once per batch shape and replayed from C++ afterwards (3-4x less host
time than building it, measured on a CPU). mlx-lm's model code is what is traced, unchanged: only its
cache is a stand-in, which writes the new keys and values at a dynamic index (``mx.slice_update``) and
hands the model the whole buffer, with a mask of the positions each row holds. Keys past that are masked,
so each row attends over exactly the keys mlx-lm's ``BatchKVCache`` would give it.

Only batches whose every layer is a plain ``BatchKVCache`` (full attention) take it, with no add-on
(vision state, M-RoPE positions); the others, and a step that grows the buffers (every 256 tokens),
run uncompiled. Traces are kept per (rows, buffer length), a few at a time.
"""

import logging
from collections import OrderedDict
from typing import List, Optional

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

KEEP = 4  # compiled shapes kept: the batch's current one and its recent ones
log = logging.getLogger("worker")


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
        except Exception as e:  # noqa: BLE001 - a model the trace cannot take: mlx-lm's own path, always
            log.warning("batching: the compiled step is off for this model (%s: %s)", type(e).__name__, e)
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
