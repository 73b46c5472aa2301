"""worker/cache/store.py with fake cache layers: the longest prefix is reused, shared prefixes copied, pins kept, LRU eviction."""

from worker.cache.store import PromptCacheStore


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


def test_the_longest_usable_match_wins_over_a_longer_unusable_one():
    """Two entries share the prompt's first tokens; the one matching longer cannot be cut back (a wrapped sliding
    window, no snapshot there): the other serves the shared prefix (issue #29 item 2: it picked the unusable one
    and reused nothing, "untrimmable")."""
    store = PromptCacheStore(FakeModel())
    _filled(store, [1, 2, 3, 4, 6, 6])  # trimmable: can serve [1, 2, 3, 4]
    unusable = PromptCacheStore(FakeModel(trimmable=False))
    _filled(unusable, [1, 2, 3, 4, 5, 9])
    store.entries += unusable.entries  # matches one token longer ([1..5]), cannot be cut back
    lease = store.take([1, 2, 3, 4, 5, 7, 7])
    assert lease.reused == 4 and lease.miss_reason == "prefix_diverged_at 4", (lease.reused, lease.miss_reason)
    assert all(layer.offset == 4 for layer in lease.cache)
    assert len(store.entries) == 2  # the trimmable entry was copied, not taken: its conversation keeps it


def test_equally_long_matches_prefer_the_usable_one():
    store = PromptCacheStore(FakeModel())
    unusable = PromptCacheStore(FakeModel(trimmable=False))
    _filled(store, [1, 2, 3, 4, 5, 6])
    _filled(unusable, [1, 2, 3, 4, 5, 8])
    store.entries += unusable.entries  # the newest of two equally long matches, but unusable
    lease = store.take([1, 2, 3, 4, 5, 7, 7])
    assert lease.reused == 5 and lease.miss_reason == "prefix_diverged_at 5", (lease.reused, lease.miss_reason)
