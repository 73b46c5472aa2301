"""Tiny offline Qwen3-VL / Qwen3-VL-MoE / Qwen3.5 / Qwen3.5-MoE checkpoints (350k-420k params) for the
vision tests. Heads are 32 wide so that KV quantization (group size 32) applies.

Built like tests/support/vlm_fixtures.py (same tokenizer, same seeded re-randomized mlx-vlm weights): the
Qwen3 families add a vision tower with deepstack mergers (qwen3_vl, qwen3_vl_moe: features added to
the first decoder layers' hidden states), interleaved M-RoPE in the text model, and for qwen3_5 a
hybrid text model (gated-delta layers with a full-attention layer every ``full_attention_interval``);
the MoE variants have 4 experts, 2 per token.

CLI: python -m tests.support.vlm_fixtures_qwen3 FAMILY PATH [--seed N]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from . import fixtures as F  # noqa: E402
from .vlm_fixtures import HIDDEN, MEAN, STD, _text_cfg, _weights, _write_tokenizer  # noqa: E402

FAMILIES = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")


def _vision(family: str) -> dict:
    return dict(model_type=family, depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=HIDDEN,
                num_heads=2, patch_size=8, spatial_patch_size=8, spatial_merge_size=2, temporal_patch_size=2,
                in_channels=3, num_position_embeddings=64,
                deepstack_visual_indexes=[] if family.startswith("qwen3_5") else [0, 1])


def _text(family: str) -> dict:
    if family.startswith("qwen3_5"):
        text = _text_cfg(model_type=family + "_text", num_hidden_layers=4, head_dim=32, full_attention_interval=2,
                         linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
                         linear_value_head_dim=16, linear_conv_kernel_dim=4,
                         rope_parameters={"type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0,
                                          "partial_rotary_factor": 0.25, "mrope_interleaved": True})
        if family == "qwen3_5_moe":
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                        shared_expert_intermediate_size=64, norm_topk_prob=True)
        return text
    text = _text_cfg(model_type=family + "_text", num_hidden_layers=3, head_dim=32, rope_theta=5000000.0,
                     rope_scaling={"rope_type": "default", "mrope_section": [4, 6, 6], "mrope_interleaved": True})
    if family == "qwen3_vl_moe":
        text.update(num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                    moe_intermediate_size=48, norm_topk_prob=True)
    return text


def _config(family: str, ids: dict) -> tuple[dict, dict, dict]:
    """(config.json, processor_config.json, preprocessor_config.json)."""
    cfg = dict(model_type=family, text_config=_text(family), vision_config=_vision(family), vocab_size=F.VOCAB_SIZE,
               image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
               vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
               eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad_token_id=ids["<|endoftext|>"],
               tie_word_embeddings=False)
    pre = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen3VLProcessor",
           "min_pixels": 16 * 16, "max_pixels": 64 * 64,
           "size": {"shortest_edge": 16 * 16, "longest_edge": 64 * 64}, "patch_size": 8, "temporal_patch_size": 2,
           "merge_size": 2, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
           "do_normalize": True, "image_mean": MEAN, "image_std": STD, "do_convert_rgb": True}
    return cfg, {"processor_class": "Qwen3VLProcessor"}, pre


def build_qwen3_fixture(family: str, path, seed: int = 0) -> Path:
    import mlx.core as mx

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ids, suppressed = _write_tokenizer("qwen", path)
    cfg, proc, pre = _config(family, ids)
    F._write_json(path / "config.json", cfg)
    F._write_json(path / "processor_config.json", proc)
    F._write_json(path / "preprocessor_config.json", pre)
    F._write_json(path / "generation_config.json", {"eos_token_id": cfg["eos_token_id"], "do_sample": False})
    weights = _weights(family, cfg, seed, suppressed)
    for i, k in enumerate(sorted(k for k in weights if ".switch_mlp." in k)):  # [experts, out, in]: _weights
        w = weights[k]  # scales these by the whole expert's size, which makes the MoE output vanish
        weights[k] = mx.random.normal(w.shape, key=mx.random.key(seed * 104729 + i)) * (3.0 / w.shape[-1] ** 0.5)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    return path


_NORMS = (".input_layernorm.weight", ".post_attention_layernorm.weight", "model.norm.weight", ".q_norm.weight",
          ".k_norm.weight")


def _hf_name(family: str, k: str, v):
    """A tensor's Hugging Face name and layout (what mlx-lm's and mlx-vlm's sanitize undo)."""
    if k.startswith("vision_tower."):
        if k.endswith("patch_embed.proj.weight"):
            v = v.transpose(0, 4, 1, 2, 3)  # MLX [O, T, H, W, C] -> PyTorch [O, C, T, H, W]
        return "model.visual." + k[len("vision_tower."):], v
    if k == "language_model.lm_head.weight":
        return "lm_head.weight", v
    k = "model.language_model." + k[len("language_model.model."):]
    if family.startswith("qwen3_5") and "conv1d.weight" in k:
        v = v.moveaxis(1, 2)  # [C, K, 1] -> PyTorch [C, 1, K]
    elif family.startswith("qwen3_5") and k.endswith(_NORMS) and v.ndim == 1:
        v = v - 1.0  # Qwen3.5 stores RMSNorm weights as (w - 1)
    return k, v


def to_hf_layout(family: str, src, dst) -> Path:
    """A copy of a fixture with the tensor names and layouts of a Hugging Face checkpoint (fused experts)."""
    import shutil

    import mlx.core as mx

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst)
    w = mx.load(str(src / "model.safetensors"))
    out = dict(_hf_name(family, k, v) for k, v in w.items() if ".switch_mlp." not in k)
    for k in [k for k in w if k.endswith(".switch_mlp.gate_proj.weight")]:
        pre = "model.language_model." + k[len("language_model.model."):].split(".switch_mlp.")[0] + ".experts."
        gate_up = mx.concatenate([w[k], w[k.replace("gate_proj", "up_proj")]], axis=1)  # [E, 2 * mid, in]
        down = w[k.replace("gate_proj", "down_proj")]
        vl = family == "qwen3_vl_moe"  # stores them transposed
        out[pre + "gate_up_proj"] = gate_up.swapaxes(1, 2) if vl else gate_up
        out[pre + "down_proj"] = down.swapaxes(1, 2) if vl else down
    mx.save_safetensors(str(dst / "model.safetensors"), out, metadata={"format": "pt"})
    return dst


def qwen3_fixture_dir(family: str, root, seed: int = 0) -> Path:
    return F.build_once(Path(root) / f"vlm-{family}-seed{seed}", lambda tmp: build_qwen3_fixture(family, tmp, seed))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Build a tiny offline Qwen3-family VLM checkpoint.")
    p.add_argument("family", choices=FAMILIES)
    p.add_argument("path")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(build_qwen3_fixture(a.family, a.path, a.seed))


if __name__ == "__main__":
    main()
