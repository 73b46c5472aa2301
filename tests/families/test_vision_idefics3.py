"""Idefics3 and SmolVLM through the real worker, against mlx-vlm's own generate: their text model runs as
mlx-lm's llama (worker/patches/idefics3_llama.py maps the checkpoint to it). The checks are
tests/support/vision_checks.py's."""

import functools
import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.support.client import generated_tokens  # noqa: E402
from tests.process.test_vision import MAX, chat, images, root, user, vlm_generate, worker  # noqa: E402,F401
from tests.support.vision_checks import (check_batch, check_ids_match_processor, check_kv_bits_follow_up,  # noqa: E402
                                 check_parity_and_cache, speculative_text_turn)
from tests.support.vlm_fixtures_idefics3 import FAMILIES, idefics3_fixture_dir  # noqa: E402


@pytest.fixture(scope="module", params=FAMILIES)
def family_path(request, root):
    return request.param, idefics3_fixture_dir(request.param, root)


@functools.lru_cache(maxsize=2)
def _llama(path):
    """mlx-lm's llama built from the checkpoint's text_config, its text weights under llama's names
    (``language_model.lm_head.*`` -> ``lm_head.*``, ``language_model.*`` -> ``model.*``), and its tokenizer."""
    import mlx.core as mx
    from mlx_lm.models import llama
    from mlx_lm.utils import load_tokenizer

    config = json.loads((Path(path) / "config.json").read_text())
    model = llama.Model(llama.ModelArgs.from_dict(config["text_config"]))
    weights = {}
    for k, v in mx.load(str(Path(path) / "model.safetensors")).items():
        if k.startswith("language_model.lm_head."):
            weights[k[len("language_model."):]] = v
        elif k.startswith("language_model."):
            weights["model." + k[len("language_model."):]] = v
    model.load_weights(list(weights.items()))  # strict: every llama weight, nothing else
    return model, load_tokenizer(Path(path), eos_token_ids=config["eos_token_id"])


def mlx_lm_llama(path, messages):
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    model, tok = _llama(str(path))
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    out = []
    for t, _ in generate_step(mx.array(ids), model, max_tokens=MAX, sampler=make_sampler(0.0)):
        if t in tok.eos_token_ids:
            break
        out.append(t)
    return out


def test_parity_and_cache(worker, family_path, images):
    family, path = family_path
    check_parity_and_cache(worker, path, images, family, functools.partial(mlx_lm_llama, path))


def test_two_images_alone_equal_the_processor(family_path, images):
    check_ids_match_processor(family_path[1], images)


def test_kv_bits_follow_up(worker, family_path, images):
    check_kv_bits_follow_up(worker, family_path[1], images, family_path[0])


def test_speculative_text_turn(family_path, images):
    assert speculative_text_turn(family_path[1], images, family_path[0]) == "on"


def test_batch(family_path, images):
    check_batch(family_path[1], images)


def test_hf_weight_names_load_the_same(worker, family_path, images, tmp_path):
    """A checkpoint in the Hugging Face layout (model.text_model.*, model.vision_model.* with a PyTorch
    conv weight, model.connector.*, lm_head.*) gives the same tokens."""
    import mlx.core as mx

    family, path = family_path
    hf = tmp_path / "hf"
    shutil.copytree(path, hf)
    weights = {}
    for k, v in mx.load(str(path / "model.safetensors")).items():
        if k.startswith("language_model.lm_head."):
            k = k[len("language_model."):]
        elif k.startswith("language_model."):
            k = "model.text_model." + k[len("language_model."):]
        else:
            k = "model." + k
        weights[k] = v.transpose(0, 3, 1, 2) if k.endswith("patch_embedding.weight") else v
    mx.save_safetensors(str(hf / "model.safetensors"), weights)
    assert json.loads((hf / "config.json").read_text())["model_type"] == family
    worker.load(hf)
    got = generated_tokens(chat(worker, f"{family}-hf", [user([images["a"], images["b"]])]))
    assert got == vlm_generate(path, [images["a"], images["b"]])


def test_llama_weight_names():
    from worker.patches.idefics3_llama import llama_weight_name

    assert llama_weight_name("language_model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert llama_weight_name("language_model.lm_head.weight") == "lm_head.weight"
    assert llama_weight_name("model.text_model.norm.weight") == "model.norm.weight"
    assert llama_weight_name("lm_head.scales") == "lm_head.scales"
    for vision in ("vision_model.post_layernorm.bias", "model.vision_model.encoder.layers.0.mlp.fc1.weight",
                   "connector.modality_projection.proj.weight", "model.connector.modality_projection.proj.weight"):
        assert llama_weight_name(vision) is None
