"""A hybrid model (LFM2-shaped: short-convolution layers, whose state cannot be cut back, between
full-attention layers) through the real worker: greedy parity with mlx-lm, follow-ups that reuse the previous
turn, and a regenerate and an edit that resume from snapshots of the convolution state."""

import random

import pytest

from tests import reference
from tests.client import Worker, generated_tokens
from tests.fixtures import fixture_dir


def _ids(n, seed):
    return [random.Random(seed).randrange(20, 400) for _ in range(n)]


@pytest.fixture(scope="module")
def lfm2(fixtures_root):
    return fixture_dir("lfm2", fixtures_root)


@pytest.fixture(scope="module")
def w(lfm2):
    worker = Worker()
    worker.load(lfm2)
    yield worker
    worker.close()


def _gen(w, rid, ids, n=8):
    events = w.request({"type": "generate", "id": rid, "prompt": {"tokens": ids}, "params": {"max_tokens": n}})
    assert events[-1]["type"] == "done", events[-1]
    return generated_tokens(events), next(e for e in events if e["type"] == "stats")


def test_hybrid_conversation_regenerate_and_edit(w, lfm2):
    w.request({"type": "cache_clear", "id": "cc"})
    ids, previous, starts = _ids(40, 1), None, []
    for turn in range(8):
        out, st = _gen(w, f"t{turn}", ids)
        if previous is not None:
            assert st["cached_tokens"] >= 0.95 * previous, (turn, st, previous)
        assert out == reference.generate(lfm2, ids, 8, dtype="float32"), turn
        previous, prompt = len(ids) + len(out), ids
        starts.append(len(ids))
        ids = ids + out + _ids(30, 10 + turn)
    again, st = _gen(w, "regen", prompt)  # the convolution state cannot be cut back: a snapshot serves it
    assert st["cached_tokens"] == len(prompt) - 1, st
    assert again == out
    edited = prompt[:-10] + _ids(10, 99)
    ed, st = _gen(w, "edit", edited)
    assert st["cached_tokens"] >= starts[-2] + 8, st  # the previous turn, its answer included
    assert ed == reference.generate(lfm2, edited, 8, dtype="float32")


def test_hybrid_chat_messages_follow_up(w, lfm2):
    msgs = [{"role": "user", "content": "Tell me about the river and the mountain, please."}]
    first = w.request({"type": "generate", "id": "m1", "prompt": {"messages": msgs}, "params": {"max_tokens": 8}})
    assert first[-1]["type"] == "done", first[-1]
    follow = msgs + [{"role": "assistant", "content": first[-1]["text"]},
                     {"role": "user", "content": "And the city?"}]
    second = w.request({"type": "generate", "id": "m2", "prompt": {"messages": follow},
                        "params": {"max_tokens": 8}})
    st = next(e for e in second if e["type"] == "stats")
    # the template trims the answer, so the re-rendered answer differs from its first token on: the snapshot
    # at the end of the first prompt (all but its last token) serves the follow-up
    assert st["cached_tokens"] >= next(e for e in first if e["type"] == "stats")["prompt_tokens"] - 1, st
    ids = reference.chat_ids(lfm2, follow)
    assert generated_tokens(second) == reference.generate(lfm2, ids, 8, dtype="float32")
