"""Tiny offline Idefics3 / SmolVLM checkpoints (~150k params) for the vision add-on tests.

Built from mlx-vlm's own classes (seeded) and saved with its parameter names (language_model.*,
vision_model.*, connector.*). The text model is llama-shaped (mlx-lm has no idefics3 module: the worker
maps it to mlx-lm's llama). The image processor splits the 48x64 test images into 2x2 tiles of 32x32
plus a global image, each tile 4 image tokens, with the <fake_token_around_image>, <row_r_col_c> and
<global-img> markers of the real processors.

CLI: python -m tests.support.vlm_fixtures_idefics3 {idefics3,smolvlm} PATH [--seed N]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from . import fixtures as F  # noqa: E402
from . import vlm_fixtures as V  # noqa: E402

FAMILIES = ("idefics3", "smolvlm")
TILE, PATCH = 32, 8
_ROWS = [f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)]
_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
             "<global-img>", *_ROWS]
_TEMPLATE = F._CONTENT_MACRO + (
    "{{- '<|im_start|>' -}}"
    "{%- for message in messages -%}"
    "{{- message['role'] | capitalize -}}"
    "{%- if message['content'] is not string and message['content'][0]['type'] == 'image' -%}{{- ':' -}}"
    "{%- else -%}{{- ': ' -}}{%- endif -%}"
    "{{- render(message['content'], '<image>') + '<end_of_utterance>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
)
V.TOKENIZERS.setdefault("idefics3", dict(
    base="llama", template=_TEMPLATE, cls="PreTrainedTokenizerFast", specials=_SPECIALS, bos="<|im_start|>",
    eos="<end_of_utterance>", pad="<|endoftext|>", unk="<|endoftext|>", eos_tokens=["<end_of_utterance>"],
    extra=None))


def _config(family: str, ids: dict) -> tuple[dict, dict, dict]:
    text = dict(model_type="llama", hidden_size=V.HIDDEN, intermediate_size=176, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, rms_norm_eps=1e-5, vocab_size=V.VOCAB,
                rope_theta=100000.0, max_position_embeddings=F.MAX_POSITIONS, tie_word_embeddings=False)
    vision = dict(model_type="idefics3_vision" if family == "idefics3" else "smolvlm_vision", hidden_size=32,
                  intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=PATCH,
                  image_size=TILE, num_channels=3, layer_norm_eps=1e-6)
    cls = "Idefics3" if family == "idefics3" else "SmolVLM"
    cfg = dict(model_type=family, architectures=[f"{cls}ForConditionalGeneration"], vocab_size=V.VOCAB,
               image_token_id=ids["<image>"], scale_factor=2, bos_token_id=ids["<|im_start|>"],
               eos_token_id=[ids["<end_of_utterance>"]], pad_token_id=ids["<|endoftext|>"],
               tie_word_embeddings=False, text_config=text, vision_config=vision)
    seq = (TILE // PATCH) ** 2 // 4
    proc = {"processor_class": f"{cls}Processor", "image_seq_len": seq}
    pre = {"image_processor_type": f"{cls}ImageProcessor", "processor_class": f"{cls}Processor",
           "do_convert_rgb": True, "do_resize": True, "size": {"longest_edge": 2 * TILE}, "resample": 1,
           "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": V.MEAN,
           "image_std": V.STD, "do_image_splitting": True, "max_image_size": {"longest_edge": TILE},
           "do_pad": True}
    return cfg, proc, pre


def build_idefics3_fixture(family: str, path, seed: int = 0) -> Path:
    import mlx.core as mx

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    ids, suppressed = V._write_tokenizer("idefics3", path)
    cfg, proc, pre = _config(family, ids)
    F._write_json(path / "config.json", cfg)
    F._write_json(path / "processor_config.json", proc)
    F._write_json(path / "preprocessor_config.json", pre)
    F._write_json(path / "generation_config.json", {"eos_token_id": cfg["eos_token_id"], "do_sample": False})
    weights = V._weights(family, cfg, seed, suppressed)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    return path


def idefics3_fixture_dir(family: str, root, seed: int = 0) -> Path:
    return F.build_once(Path(root) / f"vlm-{family}-seed{seed}",
                        lambda tmp: build_idefics3_fixture(family, tmp, seed))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Build a tiny offline Idefics3 / SmolVLM checkpoint.")
    p.add_argument("family", choices=FAMILIES)
    p.add_argument("path")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(build_idefics3_fixture(a.family, a.path, a.seed))


if __name__ == "__main__":
    main()
