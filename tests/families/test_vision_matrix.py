"""The first vision families (gemma3, pixtral, mistral3, qwen2_vl, qwen2_5_vl) across the features the
README's families table lists, as the newer families' tests check them (tests/support/vision_checks.py): kv_bits
on a follow-up, a speculative text turn, and a batch of image and text requests. Their fixtures get a head
size of 32, so kv_group_size 32 divides it (MLX quantizes in groups of 32 at least)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.support.fixtures import build_once  # noqa: E402
from tests.process.test_vision import images, root, worker  # noqa: E402,F401
from tests.support.vision_checks import check_batch, check_kv_bits_follow_up, speculative_text_turn  # noqa: E402
from tests.support.vlm_fixtures import FAMILIES, build_vlm_fixture  # noqa: E402

HEAD32 = {
    "gemma3": {"head_dim": 32, "query_pre_attn_scalar": 32},
    "pixtral": {"head_dim": 32},
    "mistral3": {"head_dim": 32},
    # Qwen's head size is hidden / heads; M-RoPE's sections fill half of it
    "qwen2_vl": {"num_attention_heads": 2, "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}},
    "qwen2_5_vl": {"num_attention_heads": 2, "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]}},
}


@pytest.fixture(scope="module", params=FAMILIES)
def family_path(request, root):
    fam = request.param
    return fam, build_once(root / f"vlm-{fam}-head32-seed0",
                           lambda tmp: build_vlm_fixture(fam, tmp, text_overrides=HEAD32[fam]))


def test_kv_bits_follow_up(worker, family_path, images):
    check_kv_bits_follow_up(worker, family_path[1], images, family_path[0])


def test_speculative_text_turn(family_path, images):
    assert speculative_text_turn(family_path[1], images, family_path[0]) == "on"


def test_batch(family_path, images):
    check_batch(family_path[1], images)
