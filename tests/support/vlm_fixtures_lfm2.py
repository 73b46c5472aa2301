"""A tiny offline LFM2-VL checkpoint (model_type "lfm2-vl", ~150k params) for the vision add-on tests.

The text model is LFM2 (short-convolution layers between full-attention ones, embeddings tied), the
vision tower a SigLIP2-style packed-patch encoder, the projector a pixel-unshuffle + MLP, all from
mlx-vlm's own classes (seeded), saved with mlx-vlm's parameter names (language_model.model.* etc.),
which mlx-lm's ``lfm2-vl`` text module also loads. The image processor settings make the test images
(48x64) large enough to be split into tiles plus a thumbnail, as real LFM2-VL does with big images.

CLI: python -m tests.support.vlm_fixtures_lfm2 PATH [--seed N]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from . import fixtures as F  # noqa: E402
from . import vlm_fixtures as V  # noqa: E402

FAMILY = "lfm2_vl"  # mlx-vlm's module; the checkpoint's model_type is "lfm2-vl"
_ROWS = [f"<|img_row_{r}_col_{c}|>" for r in range(1, 5) for c in range(1, 5)]
_SPECIALS = ["<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>",
             "<|image_start|>", "<|image_end|>", "<|img_thumbnail|>", *_ROWS]
_TEMPLATE = F._CONTENT_MACRO + (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{{- render(message['content'], '<image>') -}}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
V.TOKENIZERS.setdefault(FAMILY, dict(
    base="llama", template=_TEMPLATE, cls="PreTrainedTokenizerFast", specials=_SPECIALS,
    bos="<|startoftext|>", eos="<|im_end|>", pad="<|pad|>", unk=None, eos_tokens=["<|im_end|>"],
    extra={"image_token": "<image>"}))


def _config(ids: dict) -> tuple[dict, dict, dict]:
    text = dict(model_type="lfm2", hidden_size=V.HIDDEN, num_hidden_layers=4, num_attention_heads=2,
                num_key_value_heads=1, norm_eps=1e-5, conv_bias=False, conv_L_cache=3, block_dim=V.HIDDEN,
                block_ff_dim=160, block_multiple_of=32, block_ffn_dim_multiplier=1.0,
                block_auto_adjust_ff_dim=False, vocab_size=V.VOCAB, max_position_embeddings=F.MAX_POSITIONS,
                layer_types=["conv", "full_attention", "conv", "full_attention"], rope_theta=1000000.0,
                tie_word_embeddings=True)
    vision = dict(model_type="lfm2_vl", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_channels=3, image_size=32, patch_size=8, num_patches=16,
                  layer_norm_eps=1e-6, vision_use_head=False)
    tiling = dict(downsample_factor=2, encoder_patch_size=8, max_image_tokens=16, min_image_tokens=4,
                  tile_size=32, max_pixels_tolerance=0.5, min_tiles=2, max_tiles=10,
                  do_image_splitting=True, use_thumbnail=True)
    cfg = dict(model_type="lfm2-vl", architectures=["Lfm2VlForConditionalGeneration"], vocab_size=V.VOCAB,
               image_token_id=ids["<image>"], eos_token_id=ids["<|im_end|>"], bos_token_id=ids["<|startoftext|>"],
               pad_token_id=ids["<|pad|>"], projector_hidden_size=64, projector_bias=True,
               projector_hidden_act="gelu", projector_use_layernorm=True, vision_feature_layer=-1,
               max_num_patches=64, text_config=text, vision_config=vision, **tiling)
    proc = {"processor_class": "Lfm2VlProcessor", "use_image_special_tokens": True, **tiling}
    pre = {"image_processor_type": "Lfm2VlImageProcessor", "processor_class": "Lfm2VlProcessor",
           "do_resize": False, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
           "do_normalize": True, "image_mean": V.MEAN, "image_std": V.STD, "do_pad": True, **tiling}
    return cfg, proc, pre


def _sharpen(weights: dict) -> dict:
    """Random LFM2 lets only nearby tokens matter (its convolutions and MLPs dwarf a near-uniform
    attention), so every image would give the same answer: sharper, louder attention and quieter
    local blocks make the image (and the rest of the prompt) reach the output."""
    scale = {"q_layernorm": 2.0, "k_layernorm": 2.0, "self_attn.out_proj": 4.0, "feed_forward.w2": 0.3,
             "conv.out_proj": 0.3}
    for name in weights:
        for part, s in scale.items():
            if name.startswith("language_model.") and part in name:
                weights[name] = weights[name] * s
    return weights


def build_lfm2_vl_fixture(path, seed: int = 0) -> Path:
    import mlx.core as mx

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ids, suppressed = V._write_tokenizer(FAMILY, path)
    cfg, proc, pre = _config(ids)
    F._write_json(path / "config.json", cfg)
    F._write_json(path / "processor_config.json", proc)
    F._write_json(path / "preprocessor_config.json", pre)
    F._write_json(path / "generation_config.json", {"eos_token_id": cfg["eos_token_id"], "do_sample": False})
    weights = _sharpen(V._weights(FAMILY, cfg, seed, suppressed))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    return path


def lfm2_vl_fixture_dir(root, seed: int = 0) -> Path:
    return F.build_once(Path(root) / f"vlm-lfm2-vl-seed{seed}", lambda tmp: build_lfm2_vl_fixture(tmp, seed))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Build a tiny offline LFM2-VL checkpoint.")
    p.add_argument("path")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(build_lfm2_vl_fixture(a.path, a.seed))


if __name__ == "__main__":
    main()
