"""Tiny offline mlx-lm checkpoints (~1M params) for tests.

build_fixture(family, path, seed) writes a complete model directory (config, float32
safetensors, byte-level BPE tokenizer with the family's special tokens and chat template)
using mlx-lm's own model classes, so no hub and no torch are needed. Rebuilding with the
same seed is byte-identical; the tokenizer depends only on the family, not on the seed.

CLI: python -m tests.support.fixtures FAMILY PATH [--seed N]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FAMILIES = ("llama", "qwen2", "gemma3_text")
VOCAB_SIZE = 512
MAX_POSITIONS = 2048

# One chat template per family. Message content is a string or a list of parts
# ({"type": "text", "text": ...} / {"type": "image"}). Newlines live inside string
# literals only, so whitespace control ({%- -%}) cannot eat them.
_CONTENT_MACRO = (
    "{%- macro render(content, image) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'image' -%}{{- image -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)

_LLAMA_TEMPLATE = _CONTENT_MACRO + (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{{- render(message['content'], '<|image|>') -}}"
    "{{- '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)

_CHATML_TEMPLATE = _CONTENT_MACRO + (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{{- render(message['content'], '<|vision_start|><|image_pad|><|vision_end|>') -}}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# Gemma has no system role: the system text is prepended to the first user turn.
_GEMMA_TEMPLATE = _CONTENT_MACRO + (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = render(message['content'], '<start_of_image>') + '\\n\\n' -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' -}}"
    "{%- if role == 'user' -%}{{- ns.system -}}{%- set ns.system = '' -%}{%- endif -%}"
    "{{- render(message['content'], '<start_of_image>') -}}"
    "{{- '<end_of_turn>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

# specials: in id order (they get the first ids). bos/eos/pad: tokenizer_config values.
# eos_ids: every token that ends a turn (config.json eos_token_id).
TOKENIZER_SPECS = {
    "llama": {
        "specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                     "<|end_header_id|>", "<|eot_id|>", "<|image|>"],
        "bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": "<|end_of_text|>",
        "eos_tokens": ["<|end_of_text|>", "<|eot_id|>"], "add_bos": True,
        "template": _LLAMA_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast",
    },
    "qwen2": {
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                     "<|vision_end|>", "<|image_pad|>"],
        "bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>",
        "eos_tokens": ["<|im_end|>", "<|endoftext|>"], "add_bos": False,
        "template": _CHATML_TEMPLATE, "tokenizer_class": "Qwen2Tokenizer",
    },
    "gemma3_text": {
        "specials": ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                     "<start_of_image>"],
        "bos": "<bos>", "eos": "<eos>", "pad": "<pad>",
        "eos_tokens": ["<eos>", "<end_of_turn>"], "add_bos": True,
        "template": _GEMMA_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast",
    },
}

_HIDDEN = 128
MODEL_SPECS = {
    "llama": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=_HIDDEN,
        intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
    ),
    "qwen2": dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=_HIDDEN,
        intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=False,
    ),
    "gemma3_text": dict(
        model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], hidden_size=_HIDDEN,
        intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, rms_norm_eps=1e-6,
        rope_theta=1000000.0, rope_local_base_freq=10000.0, sliding_window=512,
        sliding_window_pattern=2, hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
    ),
}

# A hybrid: short-convolution layers (state in an ArraysCache, which cannot be cut back) between
# full-attention layers, like LiquidAI's LFM2; it uses the llama fixture's tokenizer.
MODEL_SPECS["lfm2"] = dict(
    model_type="lfm2", architectures=["Lfm2ForCausalLM"], hidden_size=_HIDDEN, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, norm_eps=1e-5, conv_bias=False, conv_L_cache=3,
    block_dim=_HIDDEN, block_ff_dim=352, block_multiple_of=32, block_ffn_dim_multiplier=1.0,
    block_auto_adjust_ff_dim=False, layer_types=["conv", "full_attention", "conv", "full_attention"],
    rope_theta=1000000.0, tie_word_embeddings=True,
)
TOKENIZER_SPECS["lfm2"] = TOKENIZER_SPECS["llama"]

# Random weights as initialized collapse into short token cycles (the last token's
# embedding dominates the residual stream). Scaling the transformer-block weights up
# (llama/qwen2) or the tied embedding down (gemma3) makes context matter, and greedy
# output varies. (embedding scale, block weight scale):
INIT_SCALES = {"llama": (1.0, 3.0), "qwen2": (1.0, 3.0), "gemma3_text": (0.3, 1.0), "lfm2": (1.0, 3.0)}

# Draft model for speculative decoding: llama, same tokenizer, ~10x fewer params.
DRAFT_SPEC = dict(MODEL_SPECS["llama"], hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)

_WORDS = (
    "the a an of to and in is was it that for on with as by at from this be are or not "
    "have has had you he she we they i my your our their his her its one two three four "
    "five ten time day year people way thing man woman child world life hand part place "
    "case week company system program question work number night point home water room "
    "mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car "
    "city name team minute idea kid body information back parent face others level office "
    "door health person art war history party result change morning reason research girl "
    "guy moment air teacher force education good new first last long great little own "
    "other old big high different small large next early young important few public bad "
    "same able say get make go know take see come think look want give use find tell ask "
    "seem feel try leave call keep let begin help talk turn start show hear play run move "
    "like live believe hold bring happen write provide sit stand lose pay meet include "
    "continue set learn lead understand watch follow stop create speak read allow add spend "
    "grow open walk win offer remember love consider appear buy wait serve die send expect "
    "build stay fall cut reach kill remain capital france paris london river mountain "
    "model token answer hello please thank sure because however very really also just "
    "what which who where when why how yes no always never often today tomorrow"
).split()
_PUNCT = [".", ".", ".", "!", "?", ",", ";", ":"]


def _corpus(n_sentences: int = 1500) -> list[str]:
    """Deterministic English-ish text (with digits, capitals and newlines) for BPE training."""
    rng = random.Random(20240601)
    lines = []
    for _ in range(n_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        if rng.random() < 0.3:
            words.insert(rng.randint(0, len(words)), str(rng.randint(0, 2025)))
        words[0] = words[0].capitalize()
        sentence = " ".join(words) + rng.choice(_PUNCT)
        if rng.random() < 0.2:
            sentence = f'"{sentence}" {rng.choice(_WORDS)} said.'
        lines.append(sentence + ("\n" if rng.random() < 0.3 else " "))
    return lines


# Pre-tokenizer split patterns of the real families. transformers 5 rebuilds Qwen2's
# tokenizer from vocab/merges with its hard-coded regex + NFC, so the qwen2 fixture must
# use exactly that pipeline for tokenizer.json and AutoTokenizer to agree.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(family: str):
    from tokenizers import Regex, pre_tokenizers

    if family == "gemma3_text":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    regex = _QWEN2_REGEX if family == "qwen2" else _LLAMA3_REGEX
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def build_tokenizer(family: str):
    """Train a byte-level BPE tokenizer (VOCAB_SIZE entries incl. specials) for a family."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors, trainers

    spec = TOKENIZER_SPECS[family]
    tok = Tokenizer(models.BPE())
    if family == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer(family)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, show_progress=False,
        special_tokens=spec["specials"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    if spec["add_bos"]:
        bos = spec["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos))],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} entries, want {VOCAB_SIZE}")
    return tok


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_tokenizer_files(family: str, path: Path) -> tuple[dict, object]:
    spec = TOKENIZER_SPECS[family]
    tok = build_tokenizer(family)
    (path / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    added = {
        str(tok.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for t in spec["specials"]
    }
    special_map = {"bos_token": spec["bos"], "eos_token": spec["eos"], "pad_token": spec["pad"]}
    if family == "gemma3_text":
        special_map["unk_token"] = "<unk>"
    _write_json(path / "tokenizer_config.json", {
        "tokenizer_class": spec["tokenizer_class"],
        "added_tokens_decoder": added,
        **special_map,
        "add_bos_token": spec["add_bos"],
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MAX_POSITIONS,
        "chat_template": spec["template"],
    })
    _write_json(path / "special_tokens_map.json",
                {k: v for k, v in special_map.items() if v is not None})
    ids = {t: tok.token_to_id(t) for t in spec["specials"]}
    return {
        "bos_token_id": ids[spec["bos"]] if spec["bos"] else None,
        "eos_token_id": [ids[t] for t in spec["eos_tokens"]],
        "pad_token_id": ids[spec["pad"]],
    }, tok


def _config(family: str, model_spec: dict, token_ids: dict) -> dict:
    cfg = dict(model_spec)
    cfg.update(
        vocab_size=VOCAB_SIZE, max_position_embeddings=MAX_POSITIONS, torch_dtype="float32",
        **token_ids,
    )
    return cfg


def _byte_chars() -> dict[int, str]:
    """GPT-2 byte -> printable unicode char map used by ByteLevel (byte token spelling)."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def suppressed_token_ids(family: str, tok=None) -> list[int]:
    """Ids whose output logit is pinned to 0: special tokens and non-printable byte tokens.

    Every other logit is random around 0, so greedy decoding never picks these: outputs
    never stop at EOS by chance and decode to printable text. Force EOS with a logit bias.
    """
    tok = tok or build_tokenizer(family)
    printable = set(range(0x20, 0x7F)) | {0x0A}
    ids = {tok.token_to_id(t) for t in TOKENIZER_SPECS[family]["specials"]}
    for b, ch in _byte_chars().items():
        if b not in printable:
            ids.add(tok.token_to_id(ch))
    return sorted(ids)


def _build_weights(family: str, cfg: dict, seed: int, suppressed: list[int]) -> dict:
    """Instantiate mlx-lm's model class after seeding; return its float32 parameters."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    module = importlib.import_module(f"mlx_lm.models.{cfg['model_type']}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(cfg))
    weights = dict(tree_flatten(model.parameters()))
    if cfg.get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)
    emb_scale, block_scale = INIT_SCALES[family]
    keep = mx.ones((cfg["vocab_size"], 1), dtype=mx.float32)
    keep[mx.array(suppressed)] = 0.0
    out_matrix = "model.embed_tokens.weight" if cfg.get("tie_word_embeddings") else "lm_head.weight"
    out = {}
    for name in sorted(weights):
        w = weights[name].astype(mx.float32)
        if name.endswith("embed_tokens.weight"):
            w = w * emb_scale
        elif ".layers." in name and "norm" not in name and name.endswith(".weight"):
            w = w * block_scale
        if name == out_matrix:
            w = w * keep
        out[name] = w
    return out


def _build(family: str, path: Path, seed: int, model_spec: dict) -> Path:
    import mlx.core as mx

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    token_ids, tok = _write_tokenizer_files(family, path)
    cfg = _config(family, model_spec, token_ids)
    _write_json(path / "config.json", cfg)
    gen = {"bos_token_id": token_ids["bos_token_id"], "eos_token_id": token_ids["eos_token_id"],
           "pad_token_id": token_ids["pad_token_id"], "do_sample": False}
    _write_json(path / "generation_config.json", gen)
    weights = _build_weights(family, cfg, seed, suppressed_token_ids(family, tok))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    return path


def build_fixture(family: str, path: str | Path, seed: int = 0) -> Path:
    """Write a complete mlx-lm loadable tiny checkpoint for `family` into `path`."""
    if family not in MODEL_SPECS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return _build(family, Path(path), seed, MODEL_SPECS[family])


def build_draft_fixture(path: str | Path, seed: int = 0) -> Path:
    """A smaller llama checkpoint sharing the llama fixture's tokenizer (speculative decoding)."""
    return _build("llama", Path(path), seed, DRAFT_SPEC)


def build_noisy_copy(src: str | Path, path: str | Path, scale: float, seed: int = 0) -> Path:
    """``src``'s checkpoint with gaussian noise (``scale`` times each tensor's std) on its weights: a draft model
    that agrees with ``src`` often but not always (speculative decoding's partial acceptance)."""
    import mlx.core as mx

    src, path = Path(src), Path(path)
    shutil.copytree(src, path, dirs_exist_ok=True)
    weights = mx.load(str(src / "model.safetensors"))
    key = mx.random.key(seed)
    out = {}
    for name in sorted(weights):
        w = weights[name]
        key, sub = mx.random.split(key)
        out[name] = w + scale * mx.std(w) * mx.random.normal(w.shape, key=sub).astype(w.dtype)
    mx.save_safetensors(str(path / "model.safetensors"), out)
    return path


def build_once(target: str | Path, build) -> Path:
    """Run ``build(tmp_dir)`` once for ``target``: in a temp dir beside it, renamed into place, so a
    half-written directory is never returned and concurrent builders do not clash."""
    target = Path(target)
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def fixture_dir(family: str, root: str | Path, seed: int = 0) -> Path:
    """Build `family` once under `root` (e.g. a session tmp dir) and return the cached dir.

    family may also be "llama_draft", or "<family>_noisy<scale>" (the family's checkpoint of this seed with
    noise on its weights: a draft that agrees with it often, see build_noisy_copy).
    """
    if "_noisy" in family:
        base, scale = family.split("_noisy")
        src = fixture_dir(base, root, seed)
        return build_once(Path(root) / f"{family}-seed{seed}",
                          lambda tmp: build_noisy_copy(src, tmp, float(scale), seed))
    if family == "llama_draft":
        return build_once(Path(root) / f"{family}-seed{seed}", lambda tmp: build_draft_fixture(tmp, seed))
    return build_once(Path(root) / f"{family}-seed{seed}", lambda tmp: build_fixture(family, tmp, seed))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a tiny offline mlx-lm checkpoint.")
    parser.add_argument("family", choices=FAMILIES + ("llama_draft",))
    parser.add_argument("path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.family == "llama_draft":
        out = build_draft_fixture(args.path, args.seed)
    else:
        out = build_fixture(args.family, args.path, args.seed)
    print(out)


if __name__ == "__main__":
    main()
