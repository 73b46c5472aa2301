"""worker/cache/snapshots.py's clone: a cloned cache layer of every kind is independent of its original."""

import mlx.core as mx
import pytest


@pytest.mark.parametrize("kind", ["kv", "rotating", "quantized", "arrays", "list"])
def test_a_cloned_cache_layer_is_independent_both_ways(kind):
    """clone shares buffers, not array objects: updating either copy leaves the other as it was."""
    from mlx.utils import tree_flatten
    from mlx_lm.models import cache as C

    from worker.cache.snapshots import clone

    def kv(c, n, v):
        return c.update_and_fetch(mx.full((1, 2, n, 32), v), mx.full((1, 2, n, 32), -v))

    def make():
        if kind == "arrays":
            c = C.ArraysCache(2)
            c[0], c[1] = mx.ones((1, 3)), mx.zeros((1, 4))
            return c
        c = {"kv": C.KVCache, "rotating": lambda: C.RotatingKVCache(max_size=6),
             "quantized": lambda: C.QuantizedKVCache(group_size=32, bits=8),
             "list": lambda: C.CacheList(C.KVCache(), C.RotatingKVCache(max_size=6))}[kind]()
        for part in (c.caches if kind == "list" else [c]):
            kv(part, 5, 1.0)
        return c

    def state(c):
        parts = c.caches if kind == "list" else [c]
        arrays = [[x for _, x in tree_flatten(p.cache if kind == "arrays" else p.state)] for p in parts]
        return [[x.tolist() for x in a if isinstance(x, mx.array)] for a in arrays], \
            [getattr(p, "offset", None) for p in parts]

    original = make()
    before = state(original)
    copy_ = clone(original)
    assert state(copy_) == before
    for c, other, v in ((copy_, original, 7.0), (original, copy_, 9.0)):
        expected = state(other)
        for part in (c.caches if kind == "list" else [c]):
            if kind == "arrays":
                part[0] = mx.full((1, 3), v)
            else:
                kv(part, 3, v)  # the rotating one wraps
        assert state(other) == expected
        assert state(c) != expected
