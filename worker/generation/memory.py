"""The KV memory ledger: the bytes of KV cache each running generate may grow to, held against a ceiling
(``load.options.kv_memory``).

A request reserves, before its prefill, the KV of its whole prompt plus its budget (``max_tokens``, at most what
the context leaves): the cached part of the prompt counts too, since the request holds it in its own cache
(handed over or copied from the prompt cache). Layers bounded by a window (``max_kv_size``, sliding-window
layers) count at most their window, recurrent state its fixed size, and ``kv_bits`` layers their quantized size.
The batch's caches are left-padded to its longest row, so requests held together count as that many rows of
the longest one. A request that would not fit beside the others waits; one that cannot fit even alone is
refused (``out_of_memory``) before any compute.
"""

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import mlx.core as mx
from mlx_lm.models import cache as mlx_cache

from ..loading.weights import nbytes as weights_nbytes
from ..protocol import KvMemory, WorkerError

SAFETY = 0.75  # of the memory left after the weights and the prompt cache: the rest is for activations
STEP = 256  # KV layers allocate this many tokens at a time (mlx-lm's KVCache.step)


@dataclass(frozen=True)
class Layout:
    """The KV bytes one sequence holds, from its tokens."""

    per_token: int = 0  # layers that grow with every token (full attention; with kv_bits, quantized)
    windows: Tuple[Tuple[int, int], ...] = ()  # (bytes a token, most tokens) of rotating layers
    fixed: int = 0  # layers of a constant size (recurrent state)
    exact: int = 0  # with kv_bits: bytes a token of the quantized layers before they are quantized
    exact_until: int = 0  # most tokens they hold so (quantized_kv_start, passed by at most a chunk)

    def nbytes(self, tokens: int) -> int:
        n = _steps(tokens)
        windows = sum(per * min(n, cap) for per, cap in self.windows)
        return self.per_token * n + windows + self.fixed + self.exact * min(n, self.exact_until)


def _steps(tokens: int) -> int:
    """Most tokens a layer allocates for ``tokens``: it grows by whole steps from where it is (a prefill chunk may
    end anywhere), so less than one step more."""
    return max(tokens, 1) + STEP - 1


def _layers(cache: list):
    for c in cache:
        if c is None:
            continue
        if isinstance(c, mlx_cache.CacheList):
            yield from _layers(c.caches)
        else:
            yield c


def _length(layer) -> int:
    keys = layer.keys[0] if isinstance(layer.keys, (tuple, list)) else layer.keys
    return keys.shape[2]


def measure(model, cache: list, kv_bits=None, kv_group_size=64, quantized_kv_start=0, chunk: int = 1) -> Layout:
    """One token through ``cache`` (fresh): each layer's bytes a token, its bound, its quantized size. A window
    holds up to ``chunk`` - 1 tokens more while a prefill chunk of that size goes through it."""
    model(mx.array([[0]]), cache=cache)
    mx.eval([c.state for c in cache])
    per, windows, fixed, exact = 0, [], 0, 0
    for c in _layers(cache):
        if not hasattr(c, "keys"):  # recurrent state (ArraysCache)
            fixed += c.nbytes
            continue
        if c.keys is None:  # a layer this model does not fill (its KV is shared)
            continue
        size = math.ceil(c.nbytes / _length(c))
        if isinstance(c, mlx_cache.RotatingKVCache):
            windows.append((size, c.max_size + chunk - 1))
        elif kv_bits is not None and hasattr(c, "to_quantized"):
            per += math.ceil(c.to_quantized(group_size=kv_group_size, bits=kv_bits).nbytes / _length(c))
            exact += size if quantized_kv_start else 0
        else:
            per += size
    del cache
    mx.clear_cache()
    until = _steps(quantized_kv_start + chunk - 1) if exact else 0
    return Layout(per, tuple(windows), fixed, exact, until)


def default_ceiling(weights: int, prompt_cache: int) -> int:
    """What the device leaves for KV: MLX's memory limit (or the GPU's recommended working set, when smaller)
    minus the weights and the prompt cache's budget (at most half of what is left), times ``SAFETY``: the
    rest is for a prefill chunk's activations and the allocator's slack."""
    limit = mx.get_memory_limit()
    working_set = mx.device_info().get("max_recommended_working_set_size")
    if working_set:
        limit = min(limit, working_set)
    left = max(0, limit - weights)
    return int(SAFETY * (left - min(prompt_cache, left // 2)))


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} bytes"


class Ledger:
    """The reservations of the running generates (request id -> tokens, with the draft model or not)."""

    def __init__(self, layout: Layout, ceiling: int, draft: Optional[Layout] = None, chosen: bool = False):
        self.layout, self.ceiling, self.draft = layout, ceiling, draft
        self.what = "options.kv_memory" if chosen else "the default kv_memory (what the device leaves)"
        self.held: Dict[str, Tuple[int, bool]] = {}
        self.figures = self._figures()  # replaced, never changed: the reader thread reads it for `status`

    def need(self, tokens: int, draft: bool = False) -> int:
        """Bytes of one sequence of ``tokens`` alone."""
        return self.total([(tokens, draft)])

    def total(self, held) -> int:
        """Bytes of sequences decoded together: each row padded to the longest one."""
        if not held:
            return 0
        out = len(held) * self.layout.nbytes(max(t for t, _ in held))
        drafted = [t for t, d in held if d]
        if drafted and self.draft is not None:
            out += len(drafted) * self.draft.nbytes(max(drafted))
        return out

    def check(self, n_prompt: int, budget: int, draft: bool = False) -> None:
        """Refuse (``out_of_memory``) a request that cannot fit even alone."""
        need = self.need(n_prompt + budget, draft)
        if need > self.ceiling:
            drafted = ", with the draft model's" if draft and self.draft else ""
            raise WorkerError("out_of_memory", (
                f"this request's KV cache needs {_size(need)} ({n_prompt} prompt tokens + {budget} to generate"
                f"{drafted}); {self.what} is {_size(self.ceiling)}: ask for fewer max_tokens, or load with a "
                "larger options.kv_memory or with options.kv_bits (8 or 4)"))

    def fits(self, tokens: int, draft: bool = False) -> bool:
        return self.total(list(self.held.values()) + [(tokens, draft)]) <= self.ceiling

    def reserve(self, rid: str, tokens: int, draft: bool = False) -> None:
        self.held[rid] = (tokens, draft)
        self.figures = self._figures()

    def release(self, rid: str) -> None:
        if self.held.pop(rid, None) is not None:
            self.figures = self._figures()

    def clear(self) -> None:
        self.held.clear()
        self.figures = self._figures()

    def _figures(self) -> KvMemory:
        reserved = self.total(list(self.held.values()))
        return KvMemory(ceiling=self.ceiling, reserved=reserved, free=max(0, self.ceiling - reserved))


def claim(run) -> Tuple[int, bool]:
    """What a request reserves: its whole prompt and its budget, with the draft model's KV or not."""
    return run.n_prompt + run.budget, bool(run.spec.on and run.kit.draft is not None)


def ledger_for(kit) -> Ledger:
    """The ledger of a loaded model (and its draft): its KV layouts, measured, and its ceiling."""
    opts = kit.options
    quant = dict(kv_bits=opts.kv_bits, kv_group_size=opts.kv_group_size, quantized_kv_start=opts.quantized_kv_start,
                 chunk=opts.prefill_step_size or 1)
    layout = measure(kit.model, kit.cache.fresh(), **quant)
    draft, weights = None, kit.weights_bytes
    if kit.draft is not None:
        draft = measure(kit.draft.model, kit.draft.cache.fresh(), **quant)
        weights += weights_nbytes(kit.draft.model)
    ceiling = opts.kv_memory if opts.kv_memory is not None else default_ceiling(weights, kit.cache.max_bytes)
    return Ledger(layout, ceiling, draft, chosen=opts.kv_memory is not None)
