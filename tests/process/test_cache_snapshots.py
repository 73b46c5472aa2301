"""Past its sliding window a Gemma 3 cache cannot be trimmed: snapshots of the window layers let a
regenerate, an edited message and a long conversation still reuse what they share (gemma3_text fixture,
window 512, through the real worker, against a cold mlx-lm run).

Reuse is asserted exactly (PROTOCOL.md, The prompt cache): a prompt that extends an entry reuses all of it (the
previous prompt and every generated token); one that diverges resumes from the entry's longest snapshot within
the common prefix, and a request snapshots where its cached part ends and at its prompt's last token."""

import pytest

from tests.support import reference
from tests.support.client import Worker, generated_tokens
from tests.support.prompts import assert_varied, random_ids


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
    prompt = random_ids(700, 1)  # past the 512-token window: the local layers have wrapped
    first, _ = _gen(w, "p1", prompt)
    want = reference.generate(gemma3_dir, prompt, 8, dtype="float32")
    assert_varied(want, what="mlx-lm's answer to the 700-token prompt")
    again, st = _gen(w, "p2", prompt)  # regenerate: the snapshot at the prompt's last token
    assert st["cached_tokens"] == len(prompt) - 1, st
    assert again == first == want
    turn = prompt + first + random_ids(20, 2)
    answer, st = _gen(w, "t1", turn)  # extends the entry: all of it
    assert st["cached_tokens"] == len(prompt) + len(first), st
    edited = prompt + first + random_ids(20, 3)  # the last user message edited
    assert edited[len(prompt) + len(first)] != turn[len(prompt) + len(first)]
    out, st = _gen(w, "t1e", edited)  # the snapshot where t1's cached part ended
    assert st["cached_tokens"] == len(prompt) + len(first), st
    want = reference.generate(gemma3_dir, edited, 8, dtype="float32")
    assert_varied(want, what="mlx-lm's answer to the edited prompt")
    assert out == want


def test_a_long_conversation_keeps_reusing(gemma, gemma3_dir):
    w = gemma
    w.request({"type": "cache_clear", "id": "cc2"})
    ids, previous = random_ids(100, 5), None
    for turn in range(8):  # ~1,000 tokens: twice the window
        out, st = _gen(w, f"c{turn}", ids)
        if previous is not None:  # the whole previous turn, its answer included
            assert st["cached_tokens"] == previous, (turn, st, previous)
        previous, last = len(ids) + len(out), ids
        ids = ids + out + random_ids(100, 50 + turn)
    want = reference.generate(gemma3_dir, last, 8, dtype="float32")
    assert_varied(want, what="mlx-lm's last answer")
    assert out == want
