"""Issue 5 for vision models: speculative decoding on a VLM's text-only turns, and kv_bits refused where the
group size does not divide the head size."""

import numpy as np
import pytest
from PIL import Image

from tests.support import reference as ref
from tests.support.client import generated_tokens
from tests.support.vlm_fixtures import vlm_fixture_dir


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


def test_speculative_on_vlm_text_turns(w, qwen_vl, image):
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


def test_kv_group_size_must_divide_the_head_size(w, qwen_vl):
    """kv_bits on an image model whose head size (16) the group size does not divide is refused at load. The
    kv_bits checks of every vision family against a quantizing reference are tests/support/vision_checks.py's
    ``check_kv_bits_follow_up`` (pixtral's in tests/families/test_vision_matrix.py)."""
    err = w.request({"type": "load", "id": "bad", "model_path": str(qwen_vl),
                     "options": {"kv_bits": 8, "kv_group_size": 32}})[-1]
    assert err["code"] == "invalid_params" and "kv_group_size" in err["message"]  # head size 16
