"""A tiny offline Gemma 4 checkpoint (model_type "gemma4", ~330k params) for the vision add-on tests.

Shaped like the small Gemma 4 models (E2B / E4B): per-layer input embeddings, sliding and full
attention layers (the full ones with a larger head and proportional RoPE), and KV-shared layers at the
top (layers 2 and 3 reuse the K/V of layers 0 and 1), embeddings tied. The vision tower is Gemma 4's
own (2-D RoPE patch encoder + pooler) and ``embed_vision`` its projector, all from mlx-vlm's classes
(seeded), saved with mlx-vlm's parameter names, which mlx-lm's ``gemma4`` text module also loads. The
image processor budget makes a 48x64 test image 12 soft tokens.

``sliding_window`` is small (a few image prompts exceed it): the follow-up tests then run through
wrapped rotating caches.

CLI: python -m tests.support.vlm_fixtures_gemma4 PATH [--seed N] [--window N] [--variant e2b|moe] [--audio] [--dtype D]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from . import fixtures as F  # noqa: E402
from . import vlm_fixtures as V  # noqa: E402

FAMILY = "gemma4"
WINDOW = 512
EMBED_SCALE = 0.3
_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>", "<|image>", "<image|>", "<|image|>",
             "<|audio>", "<audio|>", "<|audio|>", "<|video|>"]
_CONTENT_MACRO = (  # tests.support.fixtures' macro, with audio parts
    "{%- macro render(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'image' -%}{{- '<|image|>' -}}"
    "{%- elif part['type'] == 'audio' -%}{{- '<|audio|>' -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)
_TEMPLATE = _CONTENT_MACRO + (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<|turn>' + role + '\\n' -}}"
    "{{- render(message['content']) -}}"
    "{{- '<turn|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|turn>model\\n' -}}{%- endif -%}"
)
V.TOKENIZERS.setdefault(FAMILY, dict(
    base="gemma3_text", template=_TEMPLATE, cls="GemmaTokenizer", specials=_SPECIALS,
    bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", eos_tokens=["<eos>", "<turn|>"],
    extra={"boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
           "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>",
           "video_token": "<|video|>"}))

# text_config changes of the other layouts: the larger models (26B-A4B) have no per-layer inputs and no
# KV-shared layers, share K and V in their full-attention layers, route a mixture of experts, and let the
# tokens of an image attend to each other both ways
VARIANTS = {
    "e2b": {},
    "moe": dict(use_bidirectional_attention="vision", hidden_size_per_layer_input=0, num_kv_shared_layers=0,
                attention_k_eq_v=True, num_global_key_value_heads=1, use_double_wide_mlp=False,
                enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32),
}

AUDIO = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, subsampling_conv_channels=[8, 4],
             conv_kernel_size=5, attention_chunk_size=12, attention_context_left=13, attention_context_right=0,
             output_proj_dims=32, rms_norm_eps=1e-6)

IMAGE = dict(patch_size=8, max_soft_tokens=16, pooling_kernel_size=2, do_resize=True, do_rescale=True,
             rescale_factor=1 / 255, do_normalize=False)


def _config(ids: dict, window: int, variant: str, audio: bool) -> tuple[dict, dict, dict]:
    rope = {"full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0,
                               "rope_type": "proportional"},
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}}
    text = dict(model_type="gemma4_text", hidden_size=V.HIDDEN, intermediate_size=96, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=1, head_dim=32, global_head_dim=64,
                num_kv_shared_layers=2, hidden_size_per_layer_input=16, vocab_size=V.VOCAB,
                vocab_size_per_layer_input=V.VOCAB, rms_norm_eps=1e-6, sliding_window=window,
                sliding_window_pattern=2, layer_types=["sliding_attention", "full_attention"] * 2,
                rope_parameters=rope, max_position_embeddings=F.MAX_POSITIONS, final_logit_softcapping=30.0,
                use_double_wide_mlp=True, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
                pad_token_id=ids["<pad>"])
    text.update(VARIANTS[variant])
    vision = dict(model_type="gemma4_vision", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, head_dim=16, global_head_dim=16,
                  patch_size=8, pooling_kernel_size=2, position_embedding_size=64, default_output_length=16,
                  rms_norm_eps=1e-6, rope_parameters={"rope_theta": 100.0, "rope_type": "default"})
    cfg = dict(model_type="gemma4", architectures=["Gemma4ForConditionalGeneration"], vocab_size=V.VOCAB,
               hidden_size=V.HIDDEN, image_token_id=ids["<|image|>"], audio_token_id=ids["<|audio|>"],
               video_token_id=ids["<|video|>"], boi_token_id=ids["<|image>"], eoi_token_id=ids["<image|>"],
               boa_token_id=ids["<|audio>"], eoa_token_id=ids["<audio|>"], pad_token_id=ids["<pad>"],
               bos_token_id=ids["<bos>"], eos_token_id=[ids["<eos>"], ids["<turn|>"]],
               vision_soft_tokens_per_image=IMAGE["max_soft_tokens"], tie_word_embeddings=True,
               text_config=text, vision_config=vision, audio_config=dict(AUDIO) if audio else None)
    proc = {"processor_class": "Gemma4Processor", "image_processor": dict(IMAGE),
            "image_seq_length": IMAGE["max_soft_tokens"]}
    pre = {"image_processor_type": "Gemma4ImageProcessor", "processor_class": "Gemma4Processor", **IMAGE}
    return cfg, proc, pre


def _audio_weights(cfg: dict, seed: int) -> dict:
    """The audio tower and its embedder from mlx-vlm's classes, re-randomized as ``V._weights`` does."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.models import gemma4

    ac = gemma4.AudioConfig.from_dict(cfg["audio_config"])
    mx.random.seed(seed + 1)
    modules = {"audio_tower": gemma4.AudioEncoder(ac),
               "embed_audio": gemma4.gemma4.MultimodalEmbedder(ac.output_proj_dims, cfg["hidden_size"],
                                                               eps=ac.rms_norm_eps)}
    out = {}
    for prefix, module in modules.items():
        for i, (name, w) in enumerate(sorted(tree_flatten(module.parameters()))):
            w = w.astype(mx.float32)
            if w.ndim >= 2:
                fan_in = w.shape[-1] if w.ndim == 2 else int(w.size // w.shape[0])
                w = mx.random.normal(w.shape, key=mx.random.key(seed * 7907 + i)) * (1.5 / fan_in ** 0.5)
            out[f"{prefix}.{name}"] = w
    return out


def build_gemma4_fixture(path, seed: int = 0, window: int = WINDOW, variant: str = "e2b",
                         audio: bool = False, dtype: str = "float32") -> Path:
    """``audio``: with Gemma 4's audio tower (the small models have one); ``dtype`` of the saved weights."""
    import mlx.core as mx

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ids, suppressed = V._write_tokenizer(FAMILY, path)
    cfg, proc, pre = _config(ids, window, variant, audio)
    F._write_json(path / "config.json", cfg)
    F._write_json(path / "processor_config.json", proc)
    F._write_json(path / "preprocessor_config.json", pre)
    F._write_json(path / "generation_config.json", {"eos_token_id": cfg["eos_token_id"], "do_sample": False})
    weights = V._weights(FAMILY, dict(cfg, audio_config=None), seed, suppressed)
    if audio:
        weights.update(_audio_weights(cfg, seed))
    emb = "language_model.model.embed_tokens.weight"
    weights[emb] = weights[emb] * EMBED_SCALE  # tied: full-size embeddings collapse into one token
    weights = {k: v.astype(getattr(mx, dtype)) if v.ndim else v for k, v in weights.items()}  # (not the clip bounds)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    return path


def gemma4_fixture_dir(root, seed: int = 0, window: int = WINDOW, variant: str = "e2b",
                       audio: bool = False, dtype: str = "float32") -> Path:
    name = f"vlm-gemma4-{variant}{'-audio' if audio else ''}-seed{seed}-w{window}-{dtype}"
    return F.build_once(Path(root) / name,
                        lambda tmp: build_gemma4_fixture(tmp, seed, window, variant, audio, dtype))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Build a tiny offline Gemma 4 checkpoint.")
    p.add_argument("path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window", type=int, default=WINDOW)
    p.add_argument("--variant", choices=sorted(VARIANTS), default="e2b")
    p.add_argument("--audio", action="store_true", help="with an audio tower")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = p.parse_args(argv)
    print(build_gemma4_fixture(a.path, a.seed, a.window, a.variant, a.audio, a.dtype))


if __name__ == "__main__":
    main()
