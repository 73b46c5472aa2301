"""Gemma 3 with a small sliding window (64 tokens) and conversations 20x longer, text and vision, through
the real worker: every follow-up reuses >= 95% of the previous turn, a regenerate reuses the whole prompt,
an edited last message reuses at least the previous turn's prompt, an answer re-rendered without its last
tokens resumes from a snapshot taken while decoding, and the greedy tokens equal a cold run."""

import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests import reference  # noqa: E402
from tests.client import Worker, generated_tokens  # noqa: E402
from tests.vlm_fixtures import build_vlm_fixture  # noqa: E402

WINDOW = 64


def _ids(n, seed):
    return [random.Random(seed).randrange(20, 400) for _ in range(n)]


def _done(events):
    assert events[-1]["type"] == "done", events[-1]
    return generated_tokens(events), next(e for e in events if e["type"] == "stats")


@pytest.fixture(scope="module")
def text_dir(gemma3_w64_dir):
    return gemma3_w64_dir  # (conftest.py: the window is WINDOW)


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return build_vlm_fixture("gemma3", tmp_path_factory.mktemp("gemma3-vlm-w64") / "model",
                             text_overrides={"sliding_window": WINDOW, "max_position_embeddings": 8192})


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.mktemp("img") / "a.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture
def w():
    worker = Worker()
    yield worker
    worker.close()


def test_text_conversation_20x_the_window(w, text_dir):
    if True:
        w.load(text_dir)

        def gen(rid, ids, n=8):
            return _done(w.request({"type": "generate", "id": rid, "prompt": {"tokens": ids},
                                    "params": {"max_tokens": n}}))

        ids, previous, starts = _ids(60, 1), None, []
        for turn in range(20):  # ~1,400 tokens: 20x the window
            out, st = gen(f"c{turn}", ids)
            if previous is not None:
                assert st["cached_tokens"] >= 0.95 * previous, (turn, st, previous)
            previous, prompt = len(ids) + len(out), ids
            starts.append(len(ids))
            ids = ids + out + _ids(60, 100 + turn)
        assert len(prompt) >= 20 * WINDOW
        assert out == reference.generate(text_dir, prompt, 8, dtype="float32")

        again, st = gen("regen", prompt)  # regenerate: the whole prompt but its last token
        assert st["cached_tokens"] == len(prompt) - 1, st
        assert again == out
        edited = prompt[:-30] + _ids(30, 7)  # the last user message edited
        ed, st = gen("edit", edited)
        assert st["cached_tokens"] >= len(prompt) - 60, st  # up to the end of the previous turn's answer
        assert ed == reference.generate(text_dir, edited, 8, dtype="float32")

        # the answer re-rendered without its last 2 tokens (a trimmed newline, a stop string cut off):
        # resumed from a snapshot taken while decoding, not from the end of the prompt
        long_answer, _ = gen("long", prompt, n=24)
        assert len(long_answer) == 24
        follow = prompt + long_answer[:-2] + _ids(20, 8)
        out, st = gen("trimmed", follow)
        assert len(prompt) + 24 - 2 - 8 <= st["cached_tokens"] <= len(prompt) + 24 - 2, st
        assert out == reference.generate(text_dir, follow, 8, dtype="float32")


def _user(text, image=None):
    if image is None:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [{"type": "image", "path": image}, {"type": "text", "text": text}]}


def _words(n, seed):
    rng = random.Random(seed)
    return " ".join(rng.choice(["red", "blue", "cat", "tree", "sky", "house", "water", "stone"]) for _ in range(n))


def test_vision_conversation_20x_the_window(w, vlm_dir, image):
    """Sent as messages, the way chat apps send them; the fixture's random answers do not survive the
    template's re-rendering, so each follow-up resumes from the snapshot at the end of the previous prompt."""
    w.load(vlm_dir)

    def chat(rid, messages):
        events = w.request({"type": "generate", "id": rid, "prompt": {"messages": messages},
                            "params": {"max_tokens": 8}})
        out, st = _done(events)
        return out, st, "".join(e["text"] for e in events if e["type"] == "token")

    msgs, previous, prompts = [_user(_words(40, 0), image)], None, []
    for turn in range(12):
        out, st, text = chat(f"v{turn}", msgs)
        if previous is not None:
            assert st["cached_tokens"] >= 0.95 * previous, (turn, st, previous)
        previous = st["prompt_tokens"] + len(out)
        prompts.append(st["prompt_tokens"])
        msgs = msgs + [{"role": "assistant", "content": text}, _user(_words(20, 10 + turn))]
    assert prompts[-1] >= 20 * WINDOW, prompts
    last = msgs[:-2]
    regen, st, _ = chat("vregen", last)  # the same conversation once more
    assert st["cached_tokens"] == prompts[-1] - 1, st
    assert regen == out
    edited = last[:-1] + [_user(_words(20, 99))]
    ed, st, _ = chat("vedit", edited)
    assert st["cached_tokens"] >= prompts[-2], (st, prompts)  # at least the previous turn's prompt
    assert w.request({"type": "cache_clear", "id": "cc"})[-1]["type"] == "done"
    cold, st, _ = chat("vcold", edited)
    assert st["cached_tokens"] == 0 and cold == ed
