"""worker/cache/batch_layers.py against mlx-lm's own per-sequence layers: rows merged from QuantizedKVCache and
RotatingKVCache(max_size, keep) layers give back the same arrays, and a batched attention step gives each row
what the layer alone gives (mlx-lm's SDPA, quantized where the layer is)."""

import mlx.core as mx
import pytest
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.base import scaled_dot_product_attention as sdpa
from mlx_lm.models.cache import BatchKVCache, KVCache, QuantizedKVCache, RotatingKVCache

from worker.cache import layout
from worker.cache.batch_layers import BatchKeepKVCache, BatchQuantizedKVCache, BatchWindowKVCache, merge_layers

H, HQ, D = 2, 4, 64  # kv heads, query heads (grouped), head size
SCALE = D ** -0.5


def _kv(n, seed):
    mx.random.seed(seed)
    return mx.random.normal((1, H, n, D)), mx.random.normal((1, H, n, D))


def _fed(cache, lengths, seed):
    """``cache`` after updates of these many tokens each (a prefill chunk, or a one-token step)."""
    for i, n in enumerate(lengths):
        cache.update_and_fetch(*_kv(n, seed * 100 + i))
    return cache


def _quantized(lengths, seed):
    return _fed(QuantizedKVCache(group_size=32, bits=4), lengths, seed)


def _step(batch, solos, n, seed):
    """One attention step of ``n`` tokens per row, batched and on each layer alone: (batched out, alone outs)."""
    mx.random.seed(seed)
    q = mx.random.normal((len(solos), HQ, n, D))
    k, v = mx.random.normal((len(solos), H, n, D)), mx.random.normal((len(solos), H, n, D))
    mask = create_attention_mask(mx.zeros((len(solos), n, 1)), batch)  # as the models ask for it
    # (mlx-lm's quantized SDPA scales the queries it is given in place: each call gets its own)
    got = sdpa(q * 1, *batch.update_and_fetch(k, v), cache=batch, scale=SCALE, mask=mask)
    alone = []
    for i, c in enumerate(solos):
        m = create_attention_mask(mx.zeros((1, n, 1)), c)
        alone.append(sdpa(q[i:i + 1] * 1, *c.update_and_fetch(k[i:i + 1], v[i:i + 1]), cache=c, scale=SCALE, mask=m))
    return got, alone


def _same_rows(got, alone, tol=1e-5):
    for i, a in enumerate(alone):
        assert mx.abs(got[i:i + 1] - a).max().item() < tol, i


def _same_quantized(c, ref):
    assert c.offset == ref.offset and (c.group_size, c.bits) == (ref.group_size, ref.bits)
    for x, y in zip(tuple(c.keys) + tuple(c.values), tuple(ref.keys) + tuple(ref.values)):
        assert mx.array_equal(x[..., :c.offset, :], y[..., :ref.offset, :])


def test_quantized_rows_merge_extend_filter_and_extract_exactly():
    solos = [_quantized([5], 1), _quantized([17, 1], 2), _quantized([300, 1], 3)]
    batch = merge_layers(solos[:2])
    assert isinstance(batch, BatchQuantizedKVCache) and batch.bits == 4
    batch.extend(merge_layers(solos[2:]))
    for i, c in enumerate(solos):
        _same_quantized(batch.extract(i), c)
    batch.filter([0, 2])
    _same_quantized(batch.extract(0), solos[0])
    _same_quantized(batch.extract(1), solos[2])


def test_a_quantized_batch_step_equals_each_layer_alone_and_rewinds_per_row():
    """One-token steps, a several-token step (causal, as a verification), then a per-row rewind (trim the
    common part, roll each row right by the rest: mlx-lm's prepare / finalize) and a step after it."""
    solos = [_quantized([3, 1], 4), _quantized([40, 1], 5), _quantized([9, 1], 6)]
    batch = merge_layers([_quantized([3, 1], 4), _quantized([40, 1], 5)])
    batch.extend(merge_layers([_quantized([9, 1], 6)]))
    for s in range(3):
        _same_rows(*_step(batch, solos, 1, 10 + s))
    _same_rows(*_step(batch, solos, 4, 20))
    rejected = [3, 1, 2]
    for c, r in zip(solos, rejected):
        c.trim(r)
    batch.trim(min(rejected))
    batch.prepare(right_padding=[r - min(rejected) for r in rejected], lengths=[4 - r for r in rejected])
    batch.finalize()
    for i, c in enumerate(solos):
        _same_quantized(batch.extract(i), c)
    _same_rows(*_step(batch, solos, 1, 30))
    _same_rows(*_step(batch, solos, 2, 31))


def _window(lengths, seed, size=8, keep=2):
    return _fed(RotatingKVCache(max_size=size, keep=keep), lengths, seed)


def _same_window(c, ref):
    n = min(ref.offset, ref.keys.shape[2])
    assert (type(c), c.offset, c._idx, c.keep, c.max_size) == (type(ref), ref.offset, ref._idx, ref.keep, ref.max_size)
    assert mx.array_equal(c.keys[..., :n, :], ref.keys[..., :n, :])
    assert mx.array_equal(c.values[..., :n, :], ref.values[..., :n, :])


def test_windows_that_keep_their_first_tokens_decode_each_row_as_alone():
    """Rows of an 8-token window keeping 2: a one-token prompt (fewer than ``keep``), a prompt inside the
    window, one past it (its prefill chunk wrapped), one that joins later; every row wraps while batched,
    one leaves; each step's attention and each row's layer at the end are what mlx-lm's layer gives alone."""
    plans = [[1], [5, 1], [20, 1], [9, 1, 1, 1]]
    solos = [_window(p, 40 + i) for i, p in enumerate(plans)]
    batch = merge_layers([_window(p, 40 + i) for i, p in enumerate(plans[:3])])
    assert isinstance(batch, BatchKeepKVCache)
    for s in range(4):
        _same_rows(*_step(batch, solos[:3], 1, 50 + s))
    batch.extend(merge_layers([_window(plans[3], 43)]))
    for s in range(5):
        _same_rows(*_step(batch, solos, 1, 60 + s))
    batch.filter([0, 2, 3])
    solos = [solos[0], solos[2], solos[3]]
    for s in range(9):
        _same_rows(*_step(batch, solos, 1, 70 + s))
    assert all(c.offset > 8 for c in solos)  # every row has wrapped
    for i, c in enumerate(solos):
        _same_window(batch.extract(i), c)
    with pytest.raises(NotImplementedError):
        batch.make_mask(3)


def test_layers_merge_by_their_own_kind():
    """Windows that keep nothing stay mlx-lm's batch, giving back the worker's class (exact under kv_bits);
    plain layers stay mlx-lm's; layers of different kinds do not merge."""
    mine = [_fed(layout.RotatingKVCache(max_size=8), p, 80 + i) for i, p in enumerate([[3, 1], [12, 1]])]
    batch = merge_layers(mine)
    assert isinstance(batch, BatchWindowKVCache)
    assert all(type(batch.extract(i)) is layout.RotatingKVCache for i in range(2))
    assert type(merge_layers([_fed(KVCache(), [3], 90), _fed(KVCache(), [5], 91)])) is BatchKVCache
    with pytest.raises(ValueError):
        merge_layers([_fed(KVCache(), [3], 92), _quantized([3], 93)])
