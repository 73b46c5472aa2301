"""Several conversations at once: shared prefixes are shared, not stolen, and a pinned entry stays pinned."""

import random

import pytest

from tests import reference
from tests.client import Worker, generated_tokens

SYSTEM = 300


def _ids(n, seed):
    return [random.Random(seed).randrange(20, 400) for _ in range(n)]


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
        system = _ids(SYSTEM, 0)
        prompts = {c: system + _ids(12, 10 + i) for i, c in enumerate("ABCD")}
        history = {}
        for turn in range(3):
            for i, c in enumerate("ABCD"):
                prompt = prompts[c]
                gen, stats = _gen(w, f"{c}{turn}", prompt, c if keyed else None)
                assert gen == reference.generate(path, prompt, 8, dtype="float32"), (c, turn)
                if turn:  # a follow-up reuses (nearly) all of its own conversation
                    assert stats["cached_tokens"] >= 0.95 * history[c], (c, turn, stats, history[c])
                elif i:  # a new chat reuses the system prompt another chat computed
                    assert stats["cached_tokens"] >= SYSTEM, (c, stats)
                history[c] = len(prompt) + len(gen)
                prompts[c] = prompt + gen + _ids(10, 100 * turn + i)
    finally:
        w.close()


def test_a_pinned_entry_is_not_taken_by_a_request_without_its_key(llama_dir):
    w = Worker()
    try:
        w.load(llama_dir)
        a = _ids(80, 1)
        gen, _ = _gen(w, "a1", a, key="pinned")
        other = a + gen + _ids(6, 2)
        _, st = _gen(w, "x", other)  # no key: it may copy from the pinned entry...
        assert st["cached_tokens"] >= len(a)
        follow = a + gen + _ids(6, 3)
        _, st = _gen(w, "a2", follow, key="pinned")  # ...but the pinned conversation keeps it
        assert st["cached_tokens"] >= len(a) + len(gen) - 1, st
        assert st.get("cache_miss_reason") in (None, f"prefix_diverged_at {len(a) + len(gen)}"), st
    finally:
        w.close()
