"""worker/batch_compiled.py: the compiled batched step gives mlx-lm's batch step's logits and cache.

Each test decodes the same left-padded batch twice from the same prefilled caches, through mlx-lm's
``BatchKVCache`` path and through the compiled step, past a buffer growth (256 tokens) and through rows
leaving and joining, and compares the logits, the greedy tokens and what the caches hold.
"""

import mlx.core as mx
import pytest
from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

from tests import reference as ref
from worker import batch_compiled
from worker.batch import _merge


def _prefilled(model, lengths):
    caches = []
    for i, n in enumerate(lengths):
        c = make_prompt_cache(model)
        model(mx.array([[(7 * i + 3 * k) % 300 + 20 for k in range(n)]]), cache=c)
        mx.eval([x.state for x in c])
        caches.append(c)
    return caches


def _plain(model, y, cache):
    return model(y[:, None], cache=cache)[:, -1, :]


def _state(cache):
    """Per row, the keys and values mlx-lm's cache holds for it (padding cut), and the offsets."""
    out = []
    for c in cache:
        k, v = c.keys[..., :c._idx, :], c.values[..., :c._idx, :]
        out.append((k, v, c.offset, c.left_padding, c._idx))
    return out


def _same_state(a, b):
    for (k1, v1, o1, p1, i1), (k2, v2, o2, p2, i2) in zip(_state(a), _state(b)):
        assert i1 == i2 and mx.array_equal(o1, o2) and mx.array_equal(p1, p2)
        for r in range(k1.shape[0]):
            lo = p1[r].item()
            assert mx.array_equal(k1[r, :, lo:], k2[r, :, lo:]) and mx.array_equal(v1[r, :, lo:], v2[r, :, lo:])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_compiled_steps_equal_mlx_lm_s_batch_steps(family, llama_dir, qwen2_dir):
    model, _ = ref.load_model(llama_dir if family == "llama" else qwen2_dir)
    lengths = [230, 190, 251]  # the buffers grow to 512 while these decode
    plain, comp = _merge(_prefilled(model, lengths)), _merge(_prefilled(model, lengths))
    fwd = batch_compiled.Forward(model)
    assert batch_compiled.compilable(comp, None)
    y1 = y2 = mx.array([5, 6, 7], dtype=mx.uint32)
    compiled_steps = 0
    for step in range(60):
        a = _plain(model, y1, plain)
        b = fwd(y2, comp)
        if b is None:
            b = _plain(model, y2, comp)
        else:
            compiled_steps += 1
        assert mx.allclose(a, b, atol=1e-5, rtol=1e-5), step
        y1, y2 = mx.argmax(a, axis=-1), mx.argmax(b, axis=-1)
        assert y1.tolist() == y2.tolist()
        if step == 30:  # a row leaves, another joins: the shapes change, the state carries over
            for c in (plain, comp):
                for layer in c:
                    layer.filter([0, 2])
                for mine, theirs in zip(c, _merge(_prefilled(model, [40, 12]))):
                    mine.extend(theirs)
            y1 = y2 = mx.concatenate([y1[mx.array([0, 2])], mx.array([9, 10], dtype=mx.uint32)])
    _same_state(plain, comp)
    assert compiled_steps >= 55  # only the growth steps ran uncompiled
    assert len(fwd.traces) <= batch_compiled.KEEP


def test_what_is_not_compiled(llama_dir, gemma3_dir):
    model, _ = ref.load_model(gemma3_dir)
    cache = _merge(_prefilled(model, [20, 30]))
    assert not all(type(c) is BatchKVCache for c in cache)  # sliding-window layers
    assert not batch_compiled.compilable(cache, None)
    llama, _ = ref.load_model(llama_dir)
    cache = _merge(_prefilled(llama, [20, 30]))
    assert batch_compiled.compilable(cache, None)
    assert not batch_compiled.compilable(cache, object())  # an add-on's state: uncompiled
    assert not batch_compiled.compilable(None, None)


def test_a_model_the_trace_cannot_take_runs_uncompiled(llama_dir, monkeypatch):
    """A trace that raises turns the compiled step off for that model; the caches are as they were."""
    model, _ = ref.load_model(llama_dir)
    cache = _merge(_prefilled(model, [20, 30]))
    y = mx.array([5, 6], dtype=mx.uint32)
    _plain(model, y, cache)  # grows the buffers: the next step has room
    before = [(c.keys, c.values, c._idx) for c in cache]
    fwd = batch_compiled.Forward(model)

    def broken(*a):
        raise ValueError("cannot trace this")

    monkeypatch.setattr(fwd, "_function", lambda: broken)
    assert fwd(y, cache) is None and fwd.off
    assert all(c.keys is k and c.values is v and c._idx == i for c, (k, v, i) in zip(cache, before))
    assert fwd(y, cache) is None  # and stays off
