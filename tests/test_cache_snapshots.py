"""Past its sliding window a Gemma 3 cache cannot be trimmed: snapshots of the window layers let a
regenerate, an edited message and a long conversation still reuse what they share (gemma3_text fixture,
window 512, through the real worker, against a cold mlx-lm run)."""

import random

import pytest

from tests import reference
from tests.client import Worker, generated_tokens


def _ids(n, seed):
    return [random.Random(seed).randrange(20, 400) for _ in range(n)]


def _gen(w, rid, ids, max_tokens=8):
    events = w.request({"type": "generate", "id": rid, "prompt": {"tokens": ids},
                        "params": {"max_tokens": max_tokens}})
    assert events[-1]["type"] == "done", events[-1]
    return generated_tokens(events), events[-2]


@pytest.fixture(scope="module")
def gemma(gemma3_dir):
    w = Worker()
    w.load(gemma3_dir)
    yield w
    w.close()


def test_regenerate_and_edit_past_the_window(gemma, gemma3_dir):
    w = gemma
    w.request({"type": "cache_clear", "id": "cc"})
    prompt = _ids(700, 1)  # past the 512-token window: the local layers have wrapped
    first, _ = _gen(w, "p1", prompt)
    again, st = _gen(w, "p2", prompt)  # regenerate: the same prompt once more
    assert st["cached_tokens"] == len(prompt) - 1, st
    assert again == first == reference.generate(gemma3_dir, prompt, 8, dtype="float32")
    turn = prompt + first + _ids(20, 2)
    answer, st = _gen(w, "t1", turn)
    assert st["cached_tokens"] >= len(prompt) + len(first) - 1, st
    edited = prompt + first + _ids(20, 3)  # the last user message edited
    out, st = _gen(w, "t1e", edited)
    assert st["cached_tokens"] >= len(prompt), st  # at least the previous turn's prompt
    assert out == reference.generate(gemma3_dir, edited, 8, dtype="float32")


def test_a_long_conversation_keeps_reusing(gemma, gemma3_dir):
    w = gemma
    w.request({"type": "cache_clear", "id": "cc2"})
    ids, previous = _ids(100, 5), None
    for turn in range(8):  # ~1,000 tokens: twice the window
        out, st = _gen(w, f"c{turn}", ids)
        if previous is not None:
            assert st["cached_tokens"] >= 0.95 * previous, (turn, st, previous)
        previous, last = len(ids) + len(out), ids
        ids = ids + out + _ids(100, 50 + turn)
    assert out == reference.generate(gemma3_dir, last, 8, dtype="float32")
