"""Issue 5 for vision models: speculative decoding on a VLM's text-only turns, KV quantization with images."""

import numpy as np
import pytest
from PIL import Image

from tests import reference as ref
from tests.client import Worker, generated_tokens
from tests.vlm_fixtures import vlm_fixture_dir


@pytest.fixture(scope="module")
def qwen_vl(tmp_path_factory):
    return vlm_fixture_dir("qwen2_vl", tmp_path_factory.mktemp("vlmf"))


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "x.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
    return str(path)


def _gen(w, rid, messages, **params):
    events = w.request({"type": "generate", "id": rid, "prompt": {"messages": messages},
                        "params": {"max_tokens": 8, **params}})
    assert events[-1]["type"] == "done", events[-1]
    return events, next(e for e in events if e["type"] == "stats")


def test_speculative_on_vlm_text_turns(qwen_vl, image):
    w = Worker()
    try:
        info = w.load(qwen_vl, draft_model_path=str(qwen_vl))
        assert info["vision"] is True
        chat = [{"role": "user", "content": "Tell me a story."}]
        spec, stats = _gen(w, "s", chat)
        assert stats["speculative"] == "on" and stats["draft_tokens_accepted"] > 0
        ids = ref.chat_ids(qwen_vl, chat)
        assert generated_tokens(spec) == ref.generate(qwen_vl, ids, 8)
        with_image = [{"role": "user", "content": [{"type": "image", "path": image},
                                                   {"type": "text", "text": "What is this?"}]}]
        _, stats = _gen(w, "img", with_image)
        assert stats["speculative"] == "off: images or audio"
    finally:
        w.close()


def test_kv_bits_with_an_image_reuses_the_cache(qwen_vl, image, tmp_path):
    from tests.vlm_fixtures import build_vlm_fixture

    w = Worker()
    try:
        err = w.request({"type": "load", "id": "bad", "model_path": str(qwen_vl),
                         "options": {"kv_bits": 8, "kv_group_size": 32}})[-1]
        assert err["code"] == "invalid_params" and "kv_group_size" in err["message"]  # head size 16
        vlm = build_vlm_fixture("pixtral", tmp_path / "pixtral32", text_overrides={"head_dim": 32})
        w.load(vlm, kv_bits=8, kv_group_size=32)
        turn = [{"role": "user", "content": [{"type": "image", "path": image},
                                             {"type": "text", "text": "What is this?"}]}]
        first, s1 = _gen(w, "k1", turn)
        assert s1["cached_tokens"] == 0 and len(generated_tokens(first)) > 0
        follow = turn + [{"role": "assistant", "content": first[-1]["text"]},
                         {"role": "user", "content": "And then?"}]
        second, s2 = _gen(w, "k2", follow)
        assert s2["cached_tokens"] > s1["prompt_tokens"] // 2, s2
        # identical to a cold run of the same follow-up with the same quantized cache settings
        w.request({"type": "cache_clear", "id": "cc"})
        cold, s3 = _gen(w, "k3", follow)
        assert s3["cached_tokens"] == 0
        assert generated_tokens(cold) == generated_tokens(second)
    finally:
        w.close()
