"""LFM2-VL through the real worker, against mlx-vlm's own generate (the checks of tests/process/test_vision.py),
plus kv_bits on a follow-up, a speculative text turn (refused: LFM2's convolution state cannot be cut
back) and a batch. The checks are tests/support/vision_checks.py's."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.support import reference  # noqa: E402
from tests.process.test_vision import MAX, images, root, worker  # noqa: E402,F401
from tests.support.vision_checks import (check_batch, check_ids_match_processor, check_kv_bits_follow_up,  # noqa: E402
                                 check_parity_and_cache, speculative_text_turn)
from tests.support.vlm_fixtures_lfm2 import lfm2_vl_fixture_dir  # noqa: E402


@pytest.fixture(scope="module")
def lfm2_path(root):
    return lfm2_vl_fixture_dir(root)


def test_lfm2_vl_parity_and_cache(worker, lfm2_path, images):
    def mlx_lm(msgs):
        return reference.generate(lfm2_path, reference.chat_ids(lfm2_path, msgs), MAX)

    check_parity_and_cache(worker, lfm2_path, images, "lfm2", mlx_lm)


def test_lfm2_vl_two_images_alone_equal_the_processor(lfm2_path, images):
    check_ids_match_processor(lfm2_path, images)


def test_lfm2_vl_kv_bits_follow_up(worker, lfm2_path, images):
    check_kv_bits_follow_up(worker, lfm2_path, images, "lfm2")


def test_lfm2_vl_speculative_is_refused_clearly(lfm2_path, images):
    assert speculative_text_turn(lfm2_path, images, "lfm2") == "off: recurrent state"


def test_lfm2_vl_batch(lfm2_path, images):
    check_batch(lfm2_path, images)
