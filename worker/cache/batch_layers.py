"""Batch caches for the layers mlx-lm's batch cannot hold, and ``merge_layers``, what the batch merges a layer
of several sequences with (mlx-lm's ``type(layer).merge`` for the others).

- ``BatchQuantizedKVCache`` (``kv_bits``): mlx-lm's ``BatchKVCache`` (left-padded rows) over (data, scales,
  biases) triples, as ``QuantizedKVCache`` holds them. Quantization groups run along the head dimension, one
  token at a time, so rows merged from per-sequence caches hold exactly their values, ``extract`` gives them
  back, and a row's tokens quantize in the batch as they would alone. ``trim``, ``prepare`` / ``finalize``
  (rows rolled right by their right padding) work as mlx-lm's.
- ``BatchKeepKVCache`` (``max_kv_size``: ``RotatingKVCache(max_size, keep)`` with keep > 0, which mlx-lm's
  ``BatchRotatingKVCache`` cannot hold: it keeps no first tokens). Each row holds its sequence's own buffer
  as the per-sequence layer lays it out (the first ``keep`` tokens, then a ring) and writes each new token
  in that row's own next column, where the layer alone would. A one-token step attends over the set of
  cached keys (positions are in the keys), so a row attends to what it would alone; the mask hides the
  columns a shorter row has not filled. One token per row and step: the batch speculates on no window.
- ``BatchWindowKVCache``: mlx-lm's ``BatchRotatingKVCache`` (windows that keep nothing) whose ``extract``
  gives back the layer's own class (under ``kv_bits`` the worker's rotating layers, cache/layout.py).
"""

from typing import List

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm.models.cache import (BatchKVCache, BatchRotatingKVCache, QuantizedKVCache, RotatingKVCache, _BaseCache,
                                 dynamic_roll)


def merge_layers(layers: list):
    """One batch layer from the same layer of several sequences (each one's own cache)."""
    kind = type(layers[0])
    if any(type(c) is not kind for c in layers):
        raise ValueError(f"cannot batch different cache layers: {sorted({type(c).__name__ for c in layers})}")
    if issubclass(kind, QuantizedKVCache):
        return BatchQuantizedKVCache.merge(layers)
    if issubclass(kind, RotatingKVCache):
        return (BatchKeepKVCache if layers[0].keep else BatchWindowKVCache).merge(layers)
    return kind.merge(layers)


def _pad_steps(x: mx.array, left: int, size: int) -> mx.array:
    """``x`` [B, H, L, d] with ``left`` columns before it, cut or zero-padded after to ``size`` columns."""
    right = size - x.shape[2] - left
    if right < 0:
        x, right = x[..., :right, :], 0
    if left or right:
        x = mx.pad(x, [(0, 0), (0, 0), (left, right), (0, 0)])
    return x


class BatchQuantizedKVCache(BatchKVCache):
    """Left-padded rows of ``QuantizedKVCache`` layers; ``keys`` and ``values`` are (data, scales, biases)."""

    def __init__(self, left_padding: List[int], group_size: int = 64, bits: int = 8):
        super().__init__(left_padding)
        self.group_size, self.bits = group_size, bits  # ``bits`` makes attention take quantized SDPA

    def _quantize(self, x: mx.array) -> tuple:
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def update_and_fetch(self, keys, values):
        S, prev = keys.shape[2], self._idx
        qk, qv = self._quantize(keys), self._quantize(values)
        if self.keys is None or prev + S > self.keys[0].shape[2]:
            n = (self.step + S - 1) // self.step * self.step
            new = tree_map(lambda x: mx.zeros((*x.shape[:2], n, x.shape[3]), x.dtype), (qk, qv))
            if self.keys is None:
                self.keys, self.values = new
            else:
                self.keys, self.values = tree_map(lambda x, y: mx.concatenate([x[..., :prev, :], y], axis=2),
                                                  (self.keys, self.values), new)
        self.offset = self.offset + S
        self._idx += S
        for dst, src in zip(self.keys + self.values, qk + qv):
            dst[..., prev:self._idx, :] = src
        return self.keys_and_values()

    def keys_and_values(self):
        return tree_map(lambda x: x[..., :self._idx, :], (self.keys, self.values))

    def finalize(self):
        if self._right_padding is not None:
            roll = self._right_padding[:, None]
            self.keys, self.values = tree_map(lambda x: dynamic_roll(x, roll, axis=2), (self.keys, self.values))
            self.offset = self.offset - self._right_padding
            self.left_padding += self._right_padding
            self._right_padding = None

    def filter(self, batch_indices):
        if self.keys is not None:
            self.keys, self.values = tree_map(lambda x: x[batch_indices], (self.keys, self.values))
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        shift = min(self.left_padding.tolist())  # drop the padding every row has
        if shift > 0:
            if self.keys is not None:
                self.keys, self.values = tree_map(lambda x: x[..., shift:, :], (self.keys, self.values))
            self._idx -= shift
            self.left_padding -= shift

    def extend(self, other):
        if self.keys is None and other.keys is None:
            self.left_padding = mx.concatenate([self.left_padding, other.left_padding])
            self.offset = mx.concatenate([self.offset, other.offset])
            return
        idx = max(self._idx, other._idx)
        size = max(c.keys[0].shape[2] for c in (self, other) if c.keys is not None)
        like = (self if self.keys is not None else other).keys, (self if self.keys is not None else other).values

        def rows(c):  # c's arrays right-aligned at idx, ``size`` columns
            kv = (c.keys, c.values) if c.keys is not None else tree_map(
                lambda x: mx.zeros((c.offset.shape[0], x.shape[1], 0, x.shape[3]), x.dtype), like)
            return tree_map(lambda x: _pad_steps(x, idx - c._idx, size), kv), c.left_padding + (idx - c._idx)

        (mine, lp_a), (theirs, lp_b) = rows(self), rows(other)
        self.keys, self.values = tree_map(lambda a, b: mx.concatenate([a, b]), mine, theirs)
        self.offset = mx.concatenate([self.offset, other.offset])
        self.left_padding = mx.concatenate([lp_a, lp_b])
        self._idx = idx

    def extract(self, idx):
        pad = self.left_padding.tolist()[idx]
        cache = QuantizedKVCache(group_size=self.group_size, bits=self.bits)
        cache.keys, cache.values = tree_map(lambda x: mx.contiguous(x[idx:idx + 1, :, pad:self._idx]),
                                            (self.keys, self.values))
        cache.offset = self._idx - pad
        return cache

    @classmethod
    def merge(cls, caches):
        g, bits = caches[0].group_size, caches[0].bits
        if any((c.group_size, c.bits) != (g, bits) for c in caches):
            raise ValueError("cannot batch quantized layers of different group sizes or bits")
        lengths = [c.offset if c.keys is not None else 0 for c in caches]
        top = max(lengths)
        if top == 0:
            return cls([0] * len(caches), g, bits)
        pad = [top - n for n in lengths]
        src = next(c for c in caches if c.keys is not None)
        keys, values = tree_map(lambda x: mx.zeros((len(caches), x.shape[1], top, x.shape[3]), x.dtype),
                                (tuple(src.keys), tuple(src.values)))
        for i, (p, n, c) in enumerate(zip(pad, lengths, caches)):
            if n:
                for dst, x in zip(keys + values, tuple(c.keys) + tuple(c.values)):
                    dst[i:i + 1, :, p:p + n] = x[..., :n, :]
        out = cls(pad, g, bits)
        out.keys, out.values = keys, values
        out.offset += top
        out._idx = top
        return out

    @property
    def state(self):
        return self.keys, self.values, self.offset, self.left_padding, self._idx

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset, self.left_padding, self._idx = v

    @property
    def nbytes(self):
        return 0 if self.keys is None else sum(x.nbytes for x in self.keys + self.values)


class BatchKeepKVCache(_BaseCache):
    """Rows of ``RotatingKVCache(max_size, keep)`` layers, each in its own layout, one token per step."""

    step = 256

    def __init__(self, max_size: int, keep: int, layer_class=RotatingKVCache):
        self.max_size, self.keep, self.layer_class = max_size, keep, layer_class
        self.keys = self.values = None
        self.idx: List[int] = []  # per row: the layer's ``_idx`` (its next column, before the wrap)
        self.sizes: List[int] = []  # per row: the columns it holds
        self.offsets: List[int] = []  # per row: the tokens it has seen (its positions)
        self.offset = mx.array(self.offsets, dtype=mx.int32)

    def _next(self):
        """Where each row writes its next token (as its layer alone: past the end, back to ``keep``) and the
        columns it then holds."""
        cols = [i if i < self.max_size else self.keep for i in self.idx]
        return cols, [max(s, c + 1) for s, c in zip(self.sizes, cols)]

    def _one_token(self, n: int) -> None:
        if n != 1:
            raise NotImplementedError("a batch of rotating windows that keep their first tokens takes one token "
                                      "per row and step (the batch does not speculate with max_kv_size)")

    def make_mask(self, N: int, window_size=None, return_array: bool = False):
        self._one_token(N)
        if window_size is not None and window_size < self.max_size:
            raise NotImplementedError("a sliding window inside a max_kv_size window")
        _, sizes = self._next()
        return (mx.arange(max(sizes))[None] < mx.array(sizes)[:, None])[:, None, None, :]

    def update_and_fetch(self, keys, values):
        self._one_token(keys.shape[2])
        cols, sizes = self._next()
        width = max(sizes)
        if self.keys is None or width > self.keys.shape[2]:
            have = 0 if self.keys is None else self.keys.shape[2]
            n = min(self.max_size, max(width, have + self.step)) - have
            more = [mx.zeros((*x.shape[:2], n, x.shape[3]), x.dtype) for x in (keys, values)]
            if self.keys is None:
                self.keys, self.values = more
            else:
                self.keys = mx.concatenate([self.keys, more[0]], axis=2)
                self.values = mx.concatenate([self.values, more[1]], axis=2)
        at = mx.array(cols)[:, None, None, None]
        self.keys = mx.put_along_axis(self.keys, mx.broadcast_to(at, keys.shape), keys, axis=2)
        self.values = mx.put_along_axis(self.values, mx.broadcast_to(at, values.shape), values, axis=2)
        self.idx, self.sizes = [c + 1 for c in cols], sizes
        self.offsets = [o + 1 for o in self.offsets]
        self.offset = self.offset + 1
        return self.keys[..., :width, :], self.values[..., :width, :]

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None):
        if any(p is not None and any(int(x) > 0 for x in (p.tolist() if isinstance(p, mx.array) else p))
               for p in (left_padding, right_padding)):
            raise NotImplementedError("padding a batch of rotating windows that keep their first tokens")

    def finalize(self):
        pass

    def filter(self, batch_indices):
        rows = batch_indices.tolist() if isinstance(batch_indices, mx.array) else list(batch_indices)
        sel = mx.array(rows)
        if self.keys is not None:
            self.keys, self.values = self.keys[sel], self.values[sel]
        self.idx, self.sizes, self.offsets = ([x[i] for i in rows] for x in (self.idx, self.sizes, self.offsets))
        self.offset = self.offset[sel]

    def extend(self, other):
        if self.keys is not None or other.keys is not None:
            width = max(c.keys.shape[2] for c in (self, other) if c.keys is not None)
            like = self if self.keys is not None else other
            parts = []
            for c in (self, other):
                for x, y in ((c.keys, like.keys), (c.values, like.values)):
                    x = x if x is not None else mx.zeros((len(c.idx), y.shape[1], 0, y.shape[3]), y.dtype)
                    parts.append(_pad_steps(x, 0, width))
            self.keys = mx.concatenate([parts[0], parts[2]])
            self.values = mx.concatenate([parts[1], parts[3]])
        self.idx, self.sizes, self.offsets = self.idx + other.idx, self.sizes + other.sizes, self.offsets + other.offsets
        self.offset = mx.concatenate([self.offset, other.offset])

    def extract(self, idx):
        cache = self.layer_class(self.max_size, self.keep)
        n = self.sizes[idx]
        if n:
            cache.keys = mx.contiguous(self.keys[idx:idx + 1, :, :n])
            cache.values = mx.contiguous(self.values[idx:idx + 1, :, :n])
        cache.offset, cache._idx = self.offsets[idx], self.idx[idx]
        return cache

    @classmethod
    def merge(cls, caches):
        first = caches[0]
        if any((c.max_size, c.keep) != (first.max_size, first.keep) for c in caches):
            raise ValueError("cannot batch rotating layers of different sizes")
        out = cls(first.max_size, first.keep, type(first))
        out.sizes = [0 if c.keys is None else min(c.offset, c.keys.shape[2]) for c in caches]
        if max(out.sizes) > first.max_size:
            raise ValueError("a rotating layer joins the batch after a one-token step, not mid-prefill")
        out.idx, out.offsets = [c._idx for c in caches], [c.offset for c in caches]
        out.offset = mx.array(out.offsets, dtype=mx.int32)
        width = max(out.sizes)
        if width:
            src = next(c for c in caches if c.keys is not None)
            out.keys, out.values = (mx.zeros((len(caches), x.shape[1], width, x.shape[3]), x.dtype)
                                    for x in (src.keys, src.values))
            for i, (n, c) in enumerate(zip(out.sizes, caches)):
                if n:
                    out.keys[i:i + 1, :, :n] = c.keys[..., :n, :]
                    out.values[i:i + 1, :, :n] = c.values[..., :n, :]
        return out

    def size(self):
        return max(self.sizes, default=0)

    def empty(self):
        return self.keys is None

    @property
    def state(self):
        return self.keys, self.values, self.offset

    @property
    def nbytes(self):
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class BatchWindowKVCache(BatchRotatingKVCache):
    """mlx-lm's batch of rotating windows, giving each row back in its layer's own class."""

    layer_class = RotatingKVCache

    @classmethod
    def merge(cls, caches):
        out = super().merge(caches)
        out.layer_class = type(caches[0])
        return out

    def extract(self, idx):
        cache = super().extract(idx)
        cache.__class__ = self.layer_class
        return cache
