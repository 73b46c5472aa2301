"""Tiny offline VLM checkpoints (~200k params) for the vision add-on tests.

build_vlm_fixture(family, path, seed) writes an mlx-community style directory: config.json with
text_config/vision_config, model.safetensors (language_model.* + vision_tower.* /
multi_modal_projector.*), a byte-level BPE tokenizer with the family's special tokens and a chat
template that accepts image parts, processor_config.json and preprocessor_config.json. Weights come
from mlx-vlm's own model classes (seeded), so mlx-vlm's loader and mlx-lm's loader both accept it.

CLI: python -m tests.support.vlm_fixtures FAMILY PATH [--seed N]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from . import fixtures as F  # noqa: E402

FAMILIES = ("gemma3", "qwen2_vl", "qwen2_5_vl", "pixtral", "mistral3")
VOCAB = F.VOCAB_SIZE
HIDDEN = 64
MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]

_MISTRAL_TEMPLATE = F._CONTENT_MACRO + (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '[INST]' + render(message['content'], '[IMG]') + '[/INST]' -}}"
    "{%- else -%}{{- render(message['content'], '') + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)

_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
_MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"]

TOKENIZERS = {
    "gemma3": dict(base="gemma3_text", template=F._GEMMA_TEMPLATE, cls="GemmaTokenizer",
                   specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                             "<start_of_image>", "<end_of_image>", "<image_soft_token>"],
                   bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", eos_tokens=["<eos>", "<end_of_turn>"],
                   extra={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                          "image_token": "<image_soft_token>"}),
    "qwen": dict(base="qwen2", template=F._CHATML_TEMPLATE, cls="Qwen2Tokenizer", specials=_QWEN_SPECIALS,
                 bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None,
                 eos_tokens=["<|im_end|>", "<|endoftext|>"], extra=None),
    "mistral": dict(base="llama", template=_MISTRAL_TEMPLATE, cls="PreTrainedTokenizerFast",
                    specials=_MISTRAL_SPECIALS, bos="<s>", eos="</s>", pad="<unk>", unk="<unk>",
                    eos_tokens=["</s>"], extra=None),
}
TOKENIZER_OF = {"gemma3": "gemma3", "qwen2_vl": "qwen", "qwen2_5_vl": "qwen", "pixtral": "mistral",
                "mistral3": "mistral"}


def _tokenizer(kind: str, add_bos: bool = False):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    spec = TOKENIZERS[kind]
    tok = Tokenizer(models.BPE())
    if spec["base"] == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = F._pre_tokenizer(spec["base"])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, show_progress=False,
                                  special_tokens=spec["specials"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(F._corpus(), trainer=trainer)
    if add_bos:  # as the real Gemma 3 / Mistral tokenizers: BOS added unless add_special_tokens=False
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec['bos']} $A", pair=f"{spec['bos']} $A {spec['bos']} $B",
            special_tokens=[(spec["bos"], tok.token_to_id(spec["bos"]))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)  # the template owns BOS
    return tok


def _write_tokenizer(kind: str, path: Path, add_bos: bool = False):
    spec = TOKENIZERS[kind]
    if add_bos and not spec["bos"]:
        raise ValueError(f"the {kind} tokenizer has no BOS token")
    tok = _tokenizer(kind, add_bos)
    (path / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": True} for t in spec["specials"]}
    smap = {k: spec[k] for k in ("bos", "eos", "pad", "unk") if spec[k]}
    smap = {f"{k}_token": v for k, v in smap.items()}
    cfg = {"tokenizer_class": spec["cls"], "added_tokens_decoder": added, **smap,
           "add_bos_token": add_bos, "add_eos_token": False, "clean_up_tokenization_spaces": False,
           "model_max_length": F.MAX_POSITIONS, "chat_template": spec["template"]}
    if spec["extra"]:
        cfg["extra_special_tokens"] = spec["extra"]
    F._write_json(path / "tokenizer_config.json", cfg)
    F._write_json(path / "special_tokens_map.json", smap)
    ids = {t: tok.token_to_id(t) for t in spec["specials"]}
    suppressed = set(ids.values())
    printable = set(range(0x20, 0x7F)) | {0x0A}
    for b, ch in F._byte_chars().items():
        if b not in printable:
            suppressed.add(tok.token_to_id(ch))
    return ids, sorted(suppressed)


def _text_cfg(**over):
    cfg = dict(hidden_size=HIDDEN, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=VOCAB,
               max_position_embeddings=F.MAX_POSITIONS, tie_word_embeddings=False)
    cfg.update(over)
    return cfg


def _config(family: str, ids: dict) -> tuple[dict, dict, dict]:
    """(config.json, processor_config.json, preprocessor_config.json)."""
    if family == "gemma3":
        text = _text_cfg(model_type="gemma3_text", head_dim=16, query_pre_attn_scalar=16,
                         rope_theta=1000000.0, rope_local_base_freq=10000.0, sliding_window=512,
                         sliding_window_pattern=2, hidden_activation="gelu_pytorch_tanh",
                         tie_word_embeddings=True, mm_tokens_per_image=4)
        cfg = dict(model_type="gemma3", architectures=["Gemma3ForConditionalGeneration"], vocab_size=VOCAB,
                   hidden_size=HIDDEN, mm_tokens_per_image=4, image_token_index=ids["<image_soft_token>"],
                   boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
                   pad_token_id=ids["<pad>"], bos_token_id=ids["<bos>"],
                   eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]], text_config=text,
                   vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=2, patch_size=8,
                                      image_size=32, layer_norm_eps=1e-6))
        proc = {"processor_class": "Gemma3Processor", "image_seq_length": 4}
        pre = {"image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor",
               "size": {"height": 32, "width": 32}, "do_resize": True, "resample": 2, "do_rescale": True,
               "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": MEAN, "image_std": STD,
               "do_convert_rgb": True, "do_pan_and_scan": False}
        return cfg, proc, pre
    if family in ("qwen2_vl", "qwen2_5_vl"):
        cfg = dict(_text_cfg(), model_type=family, rope_theta=1000000.0,
                   rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                   image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                   bos_token_id=None, eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
                   pad_token_id=ids["<|endoftext|>"])
        if family == "qwen2_vl":
            cfg["vision_config"] = dict(model_type="qwen2_vl", depth=2, embed_dim=32, hidden_size=HIDDEN,
                                        num_heads=2, mlp_ratio=2, patch_size=8, spatial_patch_size=8,
                                        spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
            cls, ipcls = "Qwen2VLProcessor", "Qwen2VLImageProcessor"
        else:
            cfg["vision_config"] = dict(model_type="qwen2_5_vl", depth=2, hidden_size=32, intermediate_size=64,
                                        out_hidden_size=HIDDEN, num_heads=2, patch_size=8,
                                        spatial_patch_size=8, spatial_merge_size=2, temporal_patch_size=2,
                                        window_size=32, fullatt_block_indexes=[1], in_channels=3,
                                        tokens_per_second=2)
            cls, ipcls = "Qwen2_5_VLProcessor", "Qwen2VLImageProcessor"
        pre = {"image_processor_type": ipcls, "processor_class": cls, "min_pixels": 16 * 16,
               "max_pixels": 64 * 64, "size": {"shortest_edge": 16 * 16, "longest_edge": 64 * 64},
               "patch_size": 8, "temporal_patch_size": 2, "merge_size": 2, "do_resize": True,
               "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": MEAN,
               "image_std": STD, "do_convert_rgb": True}
        return cfg, {"processor_class": cls}, pre
    # pixtral / mistral3 (llava-style: mistral text model + pixtral vision tower)
    merge = 1 if family == "pixtral" else 2
    text = _text_cfg(model_type="mistral", head_dim=16, rope_theta=1000000.0)
    cfg = dict(model_type=family, vocab_size=VOCAB, image_token_index=ids["[IMG]"],
               bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], text_config=text,
               vision_feature_layer=-1, multimodal_projector_bias=False, spatial_merge_size=merge,
               vision_config=dict(model_type="pixtral", hidden_size=32, head_dim=16, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=8,
                                  rope_theta=10000.0, num_channels=3))
    if family == "mistral3":
        text["model_type"] = "mistral"
    pcls = "PixtralProcessor" if family == "pixtral" else "Mistral3Processor"
    proc = {"processor_class": pcls, "patch_size": 8, "spatial_merge_size": merge, "image_token": "[IMG]",
            "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}
    pre = {"image_processor_type": "PixtralImageProcessor", "processor_class": pcls,
           "size": {"longest_edge": 64}, "patch_size": 8, "do_resize": True, "resample": 3,
           "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": MEAN,
           "image_std": STD, "do_convert_rgb": True}
    return cfg, proc, pre


def _weights(family: str, cfg: dict, seed: int, suppressed: list[int]) -> dict:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_vlm.utils import update_module_configs

    mod = importlib.import_module(f"mlx_vlm.models.{family}")
    c = json.loads(json.dumps(cfg))
    mc = update_module_configs(mod.ModelConfig.from_dict(c), mod, c, ["text", "vision"])
    mx.random.seed(seed)
    model = mod.Model(mc)
    params = dict(tree_flatten(model.parameters()))
    out = {}
    for i, name in enumerate(sorted(params)):
        w = params[name].astype(mx.float32)
        vision = not name.startswith("language_model.")
        if w.ndim >= 2 and "embed_tokens" not in name:
            # re-randomize (mlx-vlm inits some projectors to ones/zeros: every image would look alike)
            fan_in = w.shape[-1] if w.ndim == 2 else int(w.size // w.shape[0])
            scale = (1.5 if vision else 3.0) / fan_in ** 0.5
            w = mx.random.normal(w.shape, key=mx.random.key(seed * 7919 + i)) * scale
        elif w.ndim >= 2:
            w = w * (0.3 if family == "gemma3" else 1.0)
        out[name] = w
    if family == "gemma3":  # tied: mlx-lm drops lm_head, mlx-vlm ties it to embed_tokens
        out.pop("language_model.lm_head.weight", None)
    if "language_model.lm_head.weight" in out:
        out_matrix = "language_model.lm_head.weight"
    else:
        out_matrix = "language_model.model.embed_tokens.weight"
    keep = mx.ones((VOCAB, 1), dtype=mx.float32)
    keep[mx.array(suppressed)] = 0.0
    out[out_matrix] = out[out_matrix] * keep
    if family in ("qwen2_vl", "qwen2_5_vl"):  # stored in PyTorch layout; mlx-vlm transposes on load
        k = "vision_tower.patch_embed.proj.weight"
        out[k] = out[k].transpose(0, 4, 1, 2, 3)
    return out


def build_vlm_fixture(family: str, path, seed: int = 0, text_overrides: dict | None = None,
                      overrides: dict | None = None, dtype: str = "float32", add_bos: bool = False) -> Path:
    """``overrides``: {"config": {...}, "vision": {...}, "processor": {...}, "preprocessor": {...}}
    merged into the generated files (for benchmark-sized models); ``dtype`` of the saved weights.
    ``add_bos``: the tokenizer adds BOS itself (as the real Gemma 3 and Mistral tokenizers do) while the
    chat template writes it too (gemma3, pixtral, mistral3); the weights do not change."""
    import mlx.core as mx

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ids, suppressed = _write_tokenizer(TOKENIZER_OF[family], path, add_bos)
    cfg, proc, pre = _config(family, ids)
    if text_overrides:
        (cfg["text_config"] if "text_config" in cfg else cfg).update(text_overrides)  # Qwen's is top-level
    overrides = overrides or {}
    cfg.update(overrides.get("config", {}))
    cfg["vision_config"].update(overrides.get("vision", {}))
    proc.update(overrides.get("processor", {}))
    pre.update(overrides.get("preprocessor", {}))
    F._write_json(path / "config.json", cfg)
    F._write_json(path / "processor_config.json", proc)
    F._write_json(path / "preprocessor_config.json", pre)
    eos = cfg["eos_token_id"]
    F._write_json(path / "generation_config.json", {"eos_token_id": eos, "do_sample": False})
    weights = _weights(family, cfg, seed, suppressed)
    if dtype != "float32":
        weights = {k: v.astype(getattr(mx, dtype)) for k, v in weights.items()}
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    return path


def vlm_fixture_dir(family: str, root, seed: int = 0, add_bos: bool = False) -> Path:
    name = f"vlm-{family}-seed{seed}" + ("-bos" if add_bos else "")
    return F.build_once(Path(root) / name, lambda tmp: build_vlm_fixture(family, tmp, seed, add_bos=add_bos))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Build a tiny offline VLM checkpoint.")
    p.add_argument("family", choices=FAMILIES)
    p.add_argument("path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--add-bos", action="store_true", help="the tokenizer adds BOS (as real Gemma 3 / Mistral)")
    a = p.parse_args(argv)
    print(build_vlm_fixture(a.family, a.path, a.seed, add_bos=a.add_bos))


if __name__ == "__main__":
    main()
