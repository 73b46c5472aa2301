"""Several conversations at once: shared prefixes are shared, not stolen, and a pinned entry stays pinned.

Reuse is asserted exactly: on these trimmable caches a prompt is served the longest common prefix it has with
any stored entry (each earlier request's prompt and generated ids), all but its last token at most
(PROTOCOL.md, The prompt cache)."""

import pytest

from tests.support import reference
from tests.support.client import Worker, generated_tokens
from tests.support.prompts import assert_varied, random_ids

SYSTEM = 300


def _common(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _served(held, prompt):
    """(cached_tokens, longest common prefix) the documented rule gives ``prompt`` against the entries ``held``."""
    common = max((_common(t, prompt) for t in held), default=0)
    return min(common, len(prompt) - 1), common


def _gen(w, rid, ids, key=None, max_tokens=8):
    req = {"type": "generate", "id": rid, "prompt": {"tokens": ids}, "params": {"max_tokens": max_tokens}}
    if key is not None:
        req["cache_key"] = key
    events = w.request(req)
    assert events[-1]["type"] == "done", events[-1]
    return generated_tokens(events), events[-2]


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("keyed", [False, True], ids=["no-key", "cache_key"])
def test_four_chats_sharing_a_system_prompt_keep_their_own_history(family_dirs, family, keyed):
    path = family_dirs[family]
    w = Worker()
    try:
        w.load(path)
        system = random_ids(SYSTEM, 0)
        prompts = {c: system + random_ids(12, 10 + i) for i, c in enumerate("ABCD")}
        history, held = {}, []
        for turn in range(3):
            for i, c in enumerate("ABCD"):
                prompt = prompts[c]
                gen, stats = _gen(w, f"{c}{turn}", prompt, c if keyed else None)
                want = reference.generate(path, prompt, 8, dtype="float32")
                assert_varied(want, what=f"mlx-lm's answer to chat {c}, turn {turn}")
                assert gen == want, (c, turn)
                cached, common = _served(held, prompt)
                assert stats["cached_tokens"] == cached, (c, turn, stats, cached)
                if turn:  # a follow-up reuses all of its own conversation: a full hit
                    assert cached == history[c] and stats.get("cache_miss_reason") is None, (c, turn, stats)
                elif i:  # a new chat copies the system prompt another chat computed, up to where they part
                    assert cached >= SYSTEM, (c, stats)
                    assert stats["cache_miss_reason"] == f"prefix_diverged_at {common}", (c, stats)
                else:
                    assert stats["cache_miss_reason"] == "no_entry", stats
                history[c] = len(prompt) + len(gen)
                held.append(prompt + gen)
                prompts[c] = prompt + gen + random_ids(10, 100 * turn + i)
    finally:
        w.close()


def test_a_pinned_entry_is_not_taken_by_a_request_without_its_key(llama_dir):
    w = Worker()
    try:
        w.load(llama_dir)
        a = random_ids(80, 1)
        gen, st_a = _gen(w, "a1", a, key="pinned")
        other = a + gen + random_ids(6, 2)
        _, st = _gen(w, "x", other)  # no key, and it extends the pinned entry: it copies it...
        assert st["cached_tokens"] == len(a) + len(gen) and st.get("cache_miss_reason") is None, st
        cache = w.request({"type": "status", "id": "s"})[-1]["cache"]
        # ...so the pinned entry is still there, beside x's own (a taken entry would leave x's alone)
        pinned_len, x_len = len(a) + st_a["generated_tokens"], len(other) + st["generated_tokens"]
        assert cache["entries"] == 2 and cache["tokens"] == pinned_len + x_len, (cache, pinned_len, x_len)
        follow = a + gen + random_ids(6, 3)
        _, st = _gen(w, "a2", follow, key="pinned")  # the pinned conversation goes on from its own entry
        assert st["cached_tokens"] == len(a) + len(gen) and st.get("cache_miss_reason") is None, st
        cache = w.request({"type": "status", "id": "s2"})[-1]["cache"]
        assert cache["entries"] == 2 and cache["tokens"] == x_len + len(follow) + st["generated_tokens"], cache
    finally:
        w.close()


@pytest.mark.parametrize("keyed", [False, True], ids=["no-key", "cache_key"])
def test_a_key_keeps_one_entry_per_conversation(llama_dir, keyed):
    """PROTOCOL.md, The prompt cache (`cache_key`): two conversations X and Y sharing a system prompt, with room
    for two entries; X's first message is edited and sent again. With keys X's new entry replaces its old one,
    so Y's follow-up reuses its whole previous turn. Without, X's abandoned branch stays, Y's entry (the least
    recently used) is evicted, and Y's follow-up reuses only the system prompt."""
    w = Worker()
    try:
        w.load(llama_dir, cache_max_entries=2)
        system, x1, y1 = random_ids(40, 31), random_ids(20, 32), random_ids(20, 33)
        assert x1[0] != y1[0]
        kx, ky = ("x", "y") if keyed else (None, None)
        out_x, _ = _gen(w, "x1", system + x1, kx, max_tokens=4)
        out_y, st = _gen(w, "y1", system + y1, ky, max_tokens=4)
        assert st["cached_tokens"] == len(system), st  # a copy of the shared system prompt
        edited = system + x1[:10] + random_ids(10, 34)
        assert edited[50] != x1[10]
        _, st = _gen(w, "x1-edited", edited, kx, max_tokens=4)
        assert st["cached_tokens"] == len(system) + 10, st
        entries = w.request({"type": "status", "id": "s"})[-1]["cache"]["entries"]
        assert entries == 2, entries
        follow_y = system + y1 + out_y + random_ids(10, 35)
        _, st = _gen(w, "y2", follow_y, ky, max_tokens=4)
        if keyed:  # Y's own entry: its whole previous turn
            assert st["cached_tokens"] == len(system + y1 + out_y), st
            assert st.get("cache_miss_reason") is None, st
        else:  # evicted: only what it shares with X's entries
            assert st["cached_tokens"] == len(system), st
    finally:
        w.close()
