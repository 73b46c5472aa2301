"""Snapshots of the layers that cannot be cut back: rotating (sliding-window) and other bounded layers.

Once a rotating KV layer has wrapped, it cannot be trimmed, so a prompt that diverges from a cached
entry (a regenerated answer, an edited message, a re-rendered answer) could reuse nothing. So, during a
request, the worker copies those layers (bounded by their window, unlike full-attention layers) at the
points where the next prompt will likely diverge: where the cached part ends (the previous turn's end, for
an edited message), the end of the prompt (before its last token, for a
regenerate) and right after it (prompt + first token, for an answer re-rendered differently from its
start), and every few tokens while decoding (the newest two are kept, for an answer re-rendered
differently near its end). A later prompt then
resumes from the longest snapshot within its common prefix: full-attention layers are trimmed as usual,
the bounded ones come from the snapshot.
"""

import copy
from dataclasses import dataclass
from typing import List, Optional

import mlx.core as mx
from mlx_lm.models.cache import KVCache, QuantizedKVCache, _BaseCache

MAX_SNAPSHOTS = 8  # per entry: the newest ones (this turn's and the previous turn's last ones)


@dataclass(frozen=True)
class Snapshot:
    n: int  # the cache held the entry's first n tokens
    layers: tuple  # a copy of each bounded layer, None for the trimmable (full-attention) ones

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers if c is not None)


def clone(value):
    """An independent copy of a cache layer (or a list of them) that shares the arrays' buffers.

    MLX arrays are values: a cache updates its own array objects (slice assignment), and a buffer that
    another array still holds is copied, not written, on that update. So a copy needs new array objects,
    not new buffers: ``copy.deepcopy`` would add a copy kernel per array, and its Python overhead per
    layer, to every follow-up's first forward, for data the update copies anyway.
    """
    if isinstance(value, mx.array):
        return value[...]
    if isinstance(value, (list, tuple)):
        return type(value)(clone(v) for v in value)
    if isinstance(value, dict):
        return {k: clone(v) for k, v in value.items()}
    if isinstance(value, _BaseCache):
        new = object.__new__(type(value))
        new.__dict__.update({k: clone(v) for k, v in vars(value).items()})
        return new
    if value is None or isinstance(value, (int, float, str, bytes)):
        return value
    return copy.deepcopy(value)  # a cache type that is not mlx-lm's: no assumption about its state


def bounded(layer) -> bool:
    """A layer whose trim can fail (a rotating window, SSM state): the ones worth a snapshot."""
    return not isinstance(layer, (KVCache, QuantizedKVCache))


def take_snapshot(cache: list, n: Optional[int]) -> Optional[Snapshot]:
    """A snapshot of ``cache`` holding ``n`` tokens, or None when every layer is trimmable."""
    if not n or not any(bounded(c) for c in cache):
        return None
    return Snapshot(n, tuple(clone(c) if bounded(c) else None for c in cache))


def best_snapshot(snapshots: List[Snapshot], reuse: int) -> Optional[Snapshot]:
    return max((s for s in snapshots if 0 < s.n <= reuse), key=lambda s: s.n, default=None)


def resume(cache: list, snap: Snapshot) -> list:
    """A new cache at ``snap.n`` tokens: the entry's trimmable layers cut back, the bounded ones copied."""
    out = []
    for layer, saved in zip(cache, snap.layers):
        if saved is not None:
            out.append(clone(saved))
        else:
            c = clone(layer)
            c.trim(c.offset - snap.n)
            out.append(c)
    return out


def keep(snapshots, n: int) -> list:
    """The snapshots still valid for an entry that shares its first ``n`` tokens, newest last."""
    return [s for s in snapshots if s.n < n][-MAX_SNAPSHOTS:]
