"""The Gemma 4 vision add-on through the real worker process, against mlx-vlm's own generate.

The fixture (tests/vlm_fixtures_gemma4.py) has per-layer inputs, sliding + full layers and KV-shared
layers; it is run with a 512-token window and with a 32-token one (image prompts then wrap the
rotating layers). Also: kv_bits on a follow-up, speculative decoding on a text turn, and a batch of
concurrent image and text requests giving the tokens they give alone.
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests import reference  # noqa: E402
from tests.client import Worker, generated_tokens  # noqa: E402
from tests.test_batching import _compare, _ids, _stats, run_all  # noqa: E402
from tests.test_vision import (QUESTION, _first_image_token, _last_image_token, chat, images, root,  # noqa: E402,F401
                               stats, user, vlm_generate, worker)
from tests.vlm_fixtures_gemma4 import gemma4_fixture_dir  # noqa: E402

MAX = 12


def _nontrivial(tokens):
    assert len(set(tokens)) >= 4, tokens  # a collapsed random model would compare nothing
    return tokens


def _follow_up(worker, tag, images, first_image="a", max_tokens=MAX):
    first = chat(worker, f"{tag}-f1", [user([images[first_image]])], max_tokens)
    answer = "".join(e["text"] for e in first if e["type"] == "token")
    return [user([images[first_image]]), {"role": "assistant", "content": answer},
            {"role": "user", "content": "Tell me more."}]


def _cold(worker, tag, messages, max_tokens=MAX):
    assert worker.request({"type": "cache_clear", "id": f"{tag}-cc"})[-1]["type"] == "done"
    cold = chat(worker, tag, messages, max_tokens)
    assert stats(cold)["cached_tokens"] == 0
    return generated_tokens(cold)


@pytest.mark.parametrize("window", [512, 32])
def test_parity_and_cache(worker, root, images, window):
    path = gemma4_fixture_dir(root, window=window)
    info = worker.load(path)
    assert info["vision"] is True
    tag = f"g4w{window}"

    one = _nontrivial(generated_tokens(chat(worker, f"{tag}-1", [user([images["a"]])], MAX)))
    assert one == vlm_generate(path, [images["a"]], max_tokens=MAX)
    two = _nontrivial(generated_tokens(chat(worker, f"{tag}-2", [user([images["a"], images["b"]])], MAX)))
    assert two == vlm_generate(path, [images["a"], images["b"]], max_tokens=MAX)
    other = generated_tokens(chat(worker, f"{tag}-c", [user([images["c"]])], MAX))
    assert other != one  # the image reaches the model
    text_msgs = [{"role": "user", "content": QUESTION}]
    text = _nontrivial(generated_tokens(chat(worker, f"{tag}-t", text_msgs, MAX)))
    assert text == vlm_generate(path, [], max_tokens=MAX)
    assert text == reference.generate(path, reference.chat_ids(path, text_msgs), MAX)

    # a follow-up on the same image: served from the cache past the image, identical to a cold run
    follow = _follow_up(worker, tag, images)
    warm = chat(worker, f"{tag}-f2", follow, MAX)
    assert stats(warm)["cached_tokens"] > _last_image_token(path, [images["a"]])
    assert _cold(worker, f"{tag}-f3", follow) == _nontrivial(generated_tokens(warm))

    # a changed image (same size) is a miss at the image, not a stale hit
    changed = [user([images["c"]])] + follow[1:]
    ch = chat(worker, f"{tag}-f4", changed, MAX)
    assert stats(ch)["cached_tokens"] <= _first_image_token(path, [images["c"]])
    assert _cold(worker, f"{tag}-f5", changed) == generated_tokens(ch)


def test_kv_bits_follow_up(root, images):
    """kv_bits quantizes the full-attention layers (the sliding ones stay exact): a follow-up on the same
    image reuses the quantized cache and equals a cold run."""
    path = gemma4_fixture_dir(root)
    w = Worker()
    try:
        w.load(path, kv_bits=8, kv_group_size=32)
        first = chat(w, "q1", [user([images["a"]])], MAX)
        assert first[-1]["type"] == "done", first[-1]
        follow = _follow_up(w, "q", images)
        warm = chat(w, "q2", follow, MAX)
        assert warm[-1]["type"] == "done", warm[-1]
        assert stats(warm)["cached_tokens"] > _last_image_token(path, [images["a"]])
        assert _cold(w, "q3", follow) == _nontrivial(generated_tokens(warm))
    finally:
        w.close()


def test_speculative_text_turn(root, images):
    """The model as its own draft: a text turn speculates and gives the plain tokens; an image turn does
    not speculate ("off: images") and still equals mlx-vlm."""
    path = gemma4_fixture_dir(root)
    w = Worker()
    try:
        w.load(path, draft_model_path=str(path))
        text_msgs = [{"role": "user", "content": QUESTION}]
        spec = chat(w, "s1", text_msgs, 24)
        assert stats(spec)["speculative"] == "on", stats(spec)
        ids = reference.chat_ids(path, text_msgs)
        assert generated_tokens(spec) == reference.generate(path, ids, 24)
        assert stats(spec)["draft_tokens_accepted"] > 0
        img = chat(w, "s2", [user([images["a"]])], MAX)
        assert stats(img)["speculative"] == "off: images"
        assert generated_tokens(img) == vlm_generate(path, [images["a"]], max_tokens=MAX)
    finally:
        w.close()


@pytest.mark.parametrize("window", [512, 32])
def test_batch_of_images_and_text(root, images, window):
    """Two image questions decoded beside text requests (one cancelled midway) give their solo tokens."""
    path = gemma4_fixture_dir(root, window=window)
    reqs = [
        {"id": "img-a", "prompt": {"messages": [user([images["a"]])]}, "params": {"max_tokens": MAX}},
        {"id": "img-bc", "prompt": {"messages": [user([images["b"], images["c"]])]},
         "params": {"max_tokens": 16}},
        {"id": "text", "prompt": {"messages": [{"role": "user", "content": "Tell me a story."}]},
         "params": {"max_tokens": 16}},
        {"id": "tokens", "prompt": {"tokens": _ids(40, 6)}, "params": {"max_tokens": 20}},
        {"id": "cancelled", "prompt": {"tokens": _ids(25, 7)}, "params": {"max_tokens": 400}},
    ]
    alone, _ = run_all(path, reqs, 1)
    together, _ = run_all(path, reqs, 8, cancel="cancelled")
    _compare(alone, together)
    assert _stats(together["img-a"])["concurrent"] >= 2
    assert generated_tokens(alone["img-a"]) == vlm_generate(path, [images["a"]], max_tokens=MAX)
