"""Unit tests of the pure modules: text streaming, the prompt-cache store (with fake caches), M-RoPE
positions, the feature memo. The process-level tests stay the acceptance layer."""

import mlx.core as mx
import pytest

from worker.addons.base import FeatureMemo, image_key
from worker.addons.qwen2_vl import MRopeState, _Active
from worker.cache.store import PromptCacheStore
from worker.channels import Channels


# ---- the answer stream (Channels without markers), with a detokenizer that maps ids to fixed strings

class FakeDetok:
    """mlx-lm's streaming detokenizer interface: add_token, finalize, last_segment, reset."""

    def __init__(self, pieces):
        self.pieces, self.last_segment = pieces, ""

    def reset(self):
        self.last_segment = ""

    def add_token(self, t):
        self.last_segment = self.pieces[t]

    def finalize(self):
        self.last_segment = ""


def _run(pieces, ids, stop=()):
    ts = Channels(FakeDetok(pieces), stop)
    out = []
    for t in ids:
        out += [(p.text, p.ids) for p in ts.add(t)]
        if ts.stop_string is not None:
            break
    else:
        out += [(p.text, p.ids) for p in ts.finish()]
    return ts, out


def test_text_is_released_and_equals_the_concatenation():
    ts, out = _run({1: "Hel", 2: "lo", 3: " world"}, [1, 2, 3])
    assert "".join(t for t, _ in out) == ts.text == "Hello world"
    assert [i for _, ids in out for i in ids] == [1, 2, 3]


def test_a_stop_string_across_tokens_is_held_back_and_cut():
    ts, out = _run({1: "ab", 2: "c<", 3: "/s", 4: ">tail"}, [1, 2, 3, 4], stop=["</s>"])
    assert ts.stop_string == "</s>"
    assert ts.text == "abc" and "".join(t for t, _ in out) == "abc"


def test_a_partial_stop_that_does_not_match_is_released_at_the_end():
    ts, out = _run({1: "x<", 2: "/t"}, [1, 2], stop=["</s>"])
    assert ts.stop_string is None and ts.text == "x</t"


# ---- the prompt-cache store, with fake cache layers

class FakeLayer:
    def __init__(self, trimmable=True):
        self.offset, self.trimmable = 0, trimmable

    @property
    def nbytes(self):
        return 10 * self.offset

    def is_trimmable(self):
        return self.trimmable

    def trim(self, n):
        n = min(n, self.offset)
        self.offset -= n
        return n


class FakeModel:
    def __init__(self, trimmable=True):
        self.trimmable = trimmable

    def make_cache(self):
        return [FakeLayer(self.trimmable), FakeLayer(self.trimmable)]


def _filled(store, tokens, key=None):
    lease = store.take(tokens, key)
    for layer in lease.cache:
        layer.offset = len(tokens)
    store.put(tokens, lease.cache, key)
    return lease


def test_longest_prefix_is_reused_and_trimmed():
    store = PromptCacheStore(FakeModel())
    _filled(store, [1, 2, 3, 4, 5])
    lease = store.take([1, 2, 3, 9, 9])
    assert lease.reused == 3 and lease.miss_reason == "prefix_diverged_at 3"
    assert all(layer.offset == 3 for layer in lease.cache)


def test_one_token_is_always_left_to_process():
    store = PromptCacheStore(FakeModel())
    _filled(store, [1, 2, 3])
    lease = store.take([1, 2, 3])
    assert lease.reused == 2 and lease.miss_reason is None


def test_untrimmable_entry_is_not_used_and_says_why():
    store = PromptCacheStore(FakeModel(trimmable=False))
    _filled(store, [1, 2, 3, 4])
    lease = store.take([1, 2, 7, 8])
    assert lease.reused == 0 and lease.miss_reason == "untrimmable"
    assert store.stats()["entries"] == 1  # the entry stays


def test_another_key_copies_and_the_pinned_entry_stays():
    store = PromptCacheStore(FakeModel())
    _filled(store, [1, 2, 3, 4], key="a")
    other = store.take([1, 2, 3, 4, 5], key="b")
    assert other.reused == 4 and store.stats()["entries"] == 1  # a copy: the entry stayed
    assert store.take([1, 2, 3, 4, 5], key=None).reused == 4
    own = store.take([1, 2, 3, 4, 5], key="a")
    assert own.reused == 4 and store.stats()["entries"] == 0  # its own conversation: handed over


def test_a_shared_prefix_is_copied_not_stolen():
    store = PromptCacheStore(FakeModel())
    _filled(store, [1, 2, 3, 4, 5, 6])
    lease = store.take([1, 2, 3, 9, 9])  # another chat with the same first three tokens
    assert lease.reused == 3 and all(layer.offset == 3 for layer in lease.cache)
    entry = store.entries[0]
    assert entry.tokens == [1, 2, 3, 4, 5, 6] and all(layer.offset == 6 for layer in entry.cache)


def test_lru_eviction_by_entries_and_bytes():
    store = PromptCacheStore(FakeModel(), max_entries=2)
    for first in (10, 20, 30):
        _filled(store, [first, 1, 2])
    assert store.stats()["entries"] == 2
    assert store.take([10, 1, 2, 3]).miss_reason == "evicted"
    small = PromptCacheStore(FakeModel(), max_bytes=150)  # two layers x 10 bytes x tokens
    _filled(small, [1] * 5)
    _filled(small, [2] * 5)
    assert small.stats()["entries"] == 1 and small.stats()["bytes"] == 100


def test_nothing_cached_says_no_entry():
    assert PromptCacheStore(FakeModel()).take([1, 2]).miss_reason == "no_entry"


# ---- M-RoPE positions (Qwen2-VL): the prompt's 3-D positions, then text continuing after a delta

def test_mrope_positions_inside_across_and_after_the_prompt():
    prompt = mx.array([[[0, 1, 2, 2, 3]], [[0, 1, 2, 3, 3]], [[0, 1, 1, 2, 3]]])  # [3, 1, 5]
    st = MRopeState(_Active(), prompt, delta=-1)
    assert st.positions(1, 2).tolist() == prompt[:, :, 1:3].tolist()
    across = st.positions(3, 4)  # 2 prompt positions, then text positions 5 and 6 shifted by delta
    assert across[:, 0, :2].tolist() == prompt[:, 0, 3:5].tolist()
    assert across[:, 0, 2:].tolist() == [[4, 5]] * 3
    assert st.positions(7, 1).tolist() == [[[6]], [[6]], [[6]]]


def test_mrope_state_is_scoped_to_one_request():
    box = _Active()
    a, b = MRopeState(box, mx.zeros((3, 1, 2)), 0), MRopeState(box, mx.zeros((3, 1, 2)), 0)
    with a:
        assert box.state is a
        with pytest.raises(RuntimeError):
            b.__enter__()
    assert box.state is None


# ---- the feature memo and image cache keys

def test_feature_memo_is_an_lru_within_entries_and_bytes():
    memo = FeatureMemo(max_entries=2, max_bytes=1 << 20)
    memo.put("a", mx.zeros((4,)))
    memo.put("b", mx.zeros((4,)))
    assert memo.get("a") is not None  # a is now the most recent
    memo.put("c", mx.zeros((4,)))
    assert memo.get("b") is None and memo.get("a") is not None and memo.get("c") is not None
    small = FeatureMemo(max_entries=8, max_bytes=100)
    small.put("x", mx.zeros((20,), dtype=mx.float32))  # 80 bytes
    small.put("y", mx.zeros((20,), dtype=mx.float32))
    assert small.get("x") is None and small.get("y") is not None


def test_image_keys_are_negative_and_image_specific():
    a = [image_key("ab" * 32, j) for j in range(50)]
    b = [image_key("cd" * 32, j) for j in range(50)]
    assert all(k < 0 for k in a + b) and len(set(a)) == 50 and not set(a) & set(b)


@pytest.mark.parametrize("kind", ["image", "audio"])
def test_media_source_skips_rereading_an_unchanged_old_file(tmp_path, monkeypatch, kind):
    """A file unchanged since it was hashed (and already old then) is not read again; a rewrite or a
    file young enough to be rewritten within one timestamp tick is always read and hashed."""
    import hashlib
    import os

    from worker.addons import audio, media
    from worker.addons import images as imgs
    from worker.protocol import AudioPart, ImagePart

    source, Part = (imgs.source, ImagePart) if kind == "image" else (audio.source, AudioPart)
    path = tmp_path / "x.bin"
    path.write_bytes(b"one")
    old = 1_000_000_000
    os.utime(path, ns=(old, old))
    reads = []
    real = media.read_file
    monkeypatch.setattr(media, "read_file", lambda p, w, c: reads.append(p) or real(p, w, c))
    part = Part(path=str(path))
    assert source(part).digest == hashlib.sha256(b"one").hexdigest() and len(reads) == 1
    src = source(part)
    assert src.digest == hashlib.sha256(b"one").hexdigest() and len(reads) == 1  # from the stat memo
    assert src.read() == b"one"  # the bytes are still there when a miss needs them
    path.write_bytes(b"two!")  # rewritten: size and mtime change
    assert source(part).digest == hashlib.sha256(b"two!").hexdigest()
    young = tmp_path / "y.bin"
    young.write_bytes(b"new")  # mtime now: not remembered
    source(Part(path=str(young)))
    n = len(reads)
    source(Part(path=str(young)))
    assert len(reads) == n + 1


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


def test_library_defaults_leave_what_the_host_set():
    """MLX's CUDA graph-cache thrashing check (it throws, and the stream stays broken) is off by default;
    a host's own setting of it, or of the tokenizers' threads, is kept."""
    from worker.__main__ import library_defaults

    env = {}
    library_defaults(env)
    assert env == {"TOKENIZERS_PARALLELISM": "false", "MLX_ENABLE_CACHE_THRASHING_CHECK": "0"}
    env = {"MLX_ENABLE_CACHE_THRASHING_CHECK": "1", "TOKENIZERS_PARALLELISM": "true"}
    library_defaults(env)
    assert env == {"MLX_ENABLE_CACHE_THRASHING_CHECK": "1", "TOKENIZERS_PARALLELISM": "true"}
