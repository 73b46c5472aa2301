"""Loading a model directory into a ModelKit: the mlx-lm text model, its tokenizer and facts about it."""

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.utils import get_total_parameters, load_model, load_tokenizer

from ..addons import load_addon
from ..cache import DiskCache, PromptCacheStore, layout_identity, model_identity
from ..cache.layout import make_cache, quantizable
from ..patches import gemma4_shared_kv, idefics3_llama
from ..prompting.prefix_tokens import PrefixTokenizer, probe_texts
from ..protocol import LoadOptions, ModelInfo, WorkerError, failing_as
from ..prompting.tools import tool_format
from . import sharding
from .weights import nbytes, stored_dtype

log = logging.getLogger("worker")

# Prefill chunk: on the CPU small chunks are faster (a 2048-token chunk's attention scores are memory
# bound: SmolLM2 prefills 2k tokens in 9.3 s at 256 vs 15.3 s at 2048) and cancel sooner.
CPU_PREFILL_STEP, GPU_PREFILL_STEP = 256, 2048

DEFAULT_GPU_CONCURRENCY = 8  # sequences decoded together by default on a GPU (1 on a CPU: batching
# does not pay there, bench/README.md)

_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
_CONTEXT_KEYS = ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length")


@dataclass
class ModelKit:
    path: Path
    model: nn.Module
    tokenizer: object  # mlx_lm TokenizerWrapper
    config: dict
    options: LoadOptions
    info: ModelInfo
    cache: PromptCacheStore
    warnings: list = field(default_factory=list)
    addon: object = None  # a VisionAddOn (worker/addons/) when the checkpoint has a supported vision tower
    draft: object = None  # a DraftKit for speculative decoding
    weights_bytes: int = 0  # the text model and the vision tower (max_memory counts the draft too)
    encoder: object = None  # a PrefixTokenizer: prompts tokenized reusing the previous prompt's ids
    tool_format: object = None  # a tools.ToolFormat: how this model's tool calls look and parse
    parallel: Optional[str] = None  # with several ranks: "tensor" or "pipeline" (sharding.py)
    # with several ranks: a request's input failure (or None) -> the first rank's, the same on every rank
    agree_failure: Optional[Callable] = None
    kv: object = None  # the KV memory ledger (generation/memory.py), set by the engine at load


def read_config(path: Path) -> dict:
    if not path.exists():
        raise WorkerError("model_not_found", f"model path does not exist: {path}")
    if not path.is_dir():
        raise WorkerError("model_not_found", f"model path is not a directory: {path}")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise WorkerError("model_not_found", f"no config.json in {path}: not a model directory")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WorkerError("model_load_failed", f"config.json is not readable JSON: {exc}")
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise WorkerError("model_load_failed", "config.json has no `model_type`")
    return config


def check_remote_code(path: Path, config: dict, trust: bool) -> None:
    """Refuse checkpoints that ask for their own Python code, before any of it can run."""
    wants = [k for k in ("model_file", "auto_map") if k in config]
    tok_cfg = path / "tokenizer_config.json"
    if tok_cfg.is_file():
        try:
            if "auto_map" in json.loads(tok_cfg.read_text(encoding="utf-8")):
                wants.append("tokenizer_config.auto_map")
        except (OSError, ValueError):
            pass
    if wants and not trust:
        raise WorkerError(
            "remote_code_refused",
            f"the checkpoint asks to run its own code ({', '.join(wants)}); "
            "load it with options.trust_remote_code=true only if you trust its source",
        )


def compute_dtype(options: LoadOptions, stored: mx.Dtype) -> Optional[mx.Dtype]:
    """The float dtype to run in, or None to keep the stored one.

    On the CPU, bf16/fp16 matmuls have no BLAS path, so "auto" computes in float32 there.
    """
    if options.dtype in _DTYPES:
        return _DTYPES[options.dtype]
    if options.dtype == "auto" and mx.default_device().type == mx.DeviceType.cpu:
        if stored in (mx.bfloat16, mx.float16):
            return mx.float32
    return None


def check_kv_layout(model: nn.Module, config: dict, options: LoadOptions) -> None:
    """KV quantization groups run along the head dimension: they must divide it; and some layer must be
    quantizable (with max_kv_size every layer is a rotating window, which mlx-lm cannot quantize)."""
    if options.kv_bits is None:
        return
    text = config.get("text_config") or config
    heads = text.get("num_attention_heads") or config.get("num_attention_heads")
    hidden = text.get("hidden_size") or config.get("hidden_size")
    head_dim = text.get("head_dim") or (hidden // heads if hidden and heads else None)
    if isinstance(head_dim, int) and head_dim % options.kv_group_size:
        raise WorkerError("invalid_params", f"options.kv_group_size {options.kv_group_size} must divide the "
                          f"model's attention head size {head_dim}; this model cannot use kv_bits with it")
    if not quantizable(make_cache(model, options.max_kv_size, options.kv_bits)):
        why = " with options.max_kv_size (every layer is then a rotating window)" if options.max_kv_size else ""
        raise WorkerError("invalid_params", f"options.kv_bits cannot quantize any KV layer of this model{why}; "
                          "mlx-lm quantizes full-attention layers only")


def check_memory(model: nn.Module, max_memory: Optional[int], used: int = 0, what_else: str = "") -> int:
    """Refuse, before reading any weights, a model that cannot fit beside what is loaded already
    (``used`` bytes: the main model and its vision tower, for a draft). Returns this model's bytes."""
    need = nbytes(model)
    limit, what = max_memory, "options.max_memory"
    if limit is None:
        try:
            limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            what = "this machine's memory"
        except (ValueError, OSError, AttributeError):
            return need
    if used + need > limit:
        beside = f" beside the {used / 2**30:.2f} GiB of {what_else}" if used else ""
        raise WorkerError("out_of_memory", f"the weights need {need / 2**30:.2f} GiB in memory{beside}; "
                          f"{what} is {limit / 2**30:.2f} GiB")
    return need


def _dtype_name(d: mx.Dtype) -> str:
    return str(d).split(".")[-1]


def _load_text_model(path_str: str, options: LoadOptions, progress: Callable[[float], None],
                     used: int = 0, what_else: str = "", group=None):
    """mlx-lm model + tokenizer + config + ModelInfo (vision left False) for a checkpoint directory; with a
    ``group`` of several ranks, split over them (``info.parallel`` says how)."""
    tic = time.perf_counter()
    if options.prefill_step_size is None:
        on_cpu = mx.default_device().type == mx.DeviceType.cpu
        options.prefill_step_size = CPU_PREFILL_STEP if on_cpu else GPU_PREFILL_STEP
    path = Path(path_str).expanduser()
    config = read_config(path)
    check_remote_code(path, config, options.trust_remote_code)
    if not any(path.glob("*.safetensors")):
        raise WorkerError("model_load_failed", f"no *.safetensors weights in {path}")
    progress(0.05)
    with failing_as("model_load_failed", "could not build the model"):
        model, config = load_model(path, lazy=True, trust_remote_code=options.trust_remote_code,
                                   **idefics3_llama.text_model_classes(config))
    progress(0.3)
    stored = stored_dtype(model)
    target = compute_dtype(options, stored)
    if target is not None and target != stored:
        model.set_dtype(target, lambda d: mx.issubdtype(d, mx.floating))
    parallel = sharding.split(model, config, options.parallel, group)
    weights = check_memory(model, options.max_memory, used, what_else)
    check_kv_layout(model, config, options)
    with failing_as("model_load_failed", "could not read the weights"):
        mx.eval(model.parameters())
    if parallel:
        mx.clear_cache()  # the whole tensors each rank read to cut its share from
    progress(0.8)
    with failing_as("model_load_failed", "could not load the tokenizer"):
        tokenizer = load_tokenizer(path, {"trust_remote_code": options.trust_remote_code},
                                   eos_token_ids=config.get("eos_token_id"))
    progress(0.95)
    text_cfg = config.get("text_config") or {}
    context = next(
        (c[k] for c in (config, text_cfg) for k in _CONTEXT_KEYS if isinstance(c.get(k), int)), None
    )
    vocab = config.get("vocab_size") or text_cfg.get("vocab_size") or len(tokenizer.vocab)
    info = ModelInfo(
        path=str(path.resolve()),
        model_type=config["model_type"],
        context_length=context,
        vocab_size=int(vocab),
        eos_token_ids=sorted(int(t) for t in tokenizer.eos_token_ids),
        chat_template=bool(getattr(tokenizer, "chat_template", None)),
        compute_dtype=_dtype_name(stored_dtype(model)),
        stored_dtype=_dtype_name(stored),
        prefill_step_size=options.prefill_step_size,
        parameters=int(get_total_parameters(model)),
        load_s=round(time.perf_counter() - tic, 4),
    )
    gemma4_shared_kv.fit(model, config, options)
    return path, model, tokenizer, config, info, weights, parallel


def load(path_str: str, options: LoadOptions, progress: Callable[[float], None], group=None) -> ModelKit:
    """The model at ``path_str``; with a ``group`` of several ranks, its text model split over them."""
    path, model, tokenizer, config, info, weights, parallel = _load_text_model(
        path_str, options, progress, group=group)
    if options.seed is not None:
        mx.random.seed(options.seed)
    warnings = []
    addon = None
    if "vision_config" in config:
        addon, warning = load_addon(path, config, model, options)
        if warning:
            warnings.append(warning)
        if addon is not None:
            weights += nbytes(addon.parts)
            if options.max_memory is not None and weights > options.max_memory:
                raise WorkerError("out_of_memory", f"the text model and its vision tower need "
                                  f"{weights / 2**30:.2f} GiB; options.max_memory is "
                                  f"{options.max_memory / 2**30:.2f} GiB")
    progress(0.96)
    info.vision = addon is not None
    info.audio = bool(getattr(addon, "accepts_audio", False))
    fmt = tool_format(tokenizer) if info.chat_template else None
    info.tool_parser, info.tool_prompt = (fmt.parser, fmt.source) if fmt else (None, None)
    if getattr(tokenizer, "has_thinking", False):
        info.reasoning_markers = [tokenizer.think_start, tokenizer.think_end]
    rank = f"rank{group.rank()}of{group.size()}" if parallel else None
    kit = ModelKit(path, model, tokenizer, config, options, info, make_store(path, model, options, info, rank),
                   warnings, addon, weights_bytes=weights, parallel=parallel,
                   encoder=PrefixTokenizer(tokenizer._tokenizer, probe_texts(tokenizer)), tool_format=fmt)
    if options.draft_model_path:  # its own load stages report 0.96-0.97 (and check cancel)
        kit.draft = load_draft(kit, options.draft_model_path, lambda f: progress(round(0.96 + f / 100, 4)))
    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    info.max_concurrent = options.max_concurrent or (DEFAULT_GPU_CONCURRENCY if on_gpu else 1)
    return kit


@dataclass
class DraftKit:
    model: nn.Module
    info: ModelInfo
    cache: PromptCacheStore


def load_draft(kit: ModelKit, path_str: str, progress: Callable[[float], None]) -> DraftKit:
    """A draft model for speculative decoding; it must share the main model's vocabulary."""
    opts = kit.options
    path, model, tokenizer, _, info, _, _ = _load_text_model(
        path_str, opts, progress, kit.weights_bytes, "the main model (and its vision tower)")
    if info.vocab_size != kit.info.vocab_size:
        raise WorkerError("draft_incompatible", f"the draft model has {info.vocab_size} token ids and the main "
                          f"model {kit.info.vocab_size}; speculative decoding needs the same tokenizer")
    if tokenizer._tokenizer.get_vocab() != kit.tokenizer._tokenizer.get_vocab():
        raise WorkerError("draft_incompatible", f"the draft model's vocabulary has as many ids "
                          f"({info.vocab_size}) as the main model's but maps them to other tokens; "
                          "speculative decoding needs the same tokenizer")
    store = PromptCacheStore(model, opts.max_kv_size, cache_budget(opts), opts.cache_max_entries,
                             kv_bits=opts.kv_bits)
    return DraftKit(model, info, store)


def make_store(path: Path, model: nn.Module, options: LoadOptions, info: ModelInfo,
               rank: Optional[str] = None) -> PromptCacheStore:
    """The prompt cache; on disk under ``cache_dir`` (with several ranks, one folder per rank: each holds its
    own share of every entry)."""
    disk = None
    if options.cache_dir:
        layout = layout_identity(dtype=info.compute_dtype, max_kv_size=options.max_kv_size,
                                 kv_bits=options.kv_bits, kv_group_size=options.kv_group_size)
        try:
            disk = DiskCache(Path(options.cache_dir) / (rank or ""), model_identity(path), layout,
                             len(make_cache(model)), options.cache_disk_bytes)
        except OSError as exc:
            raise WorkerError("invalid_params", f"options.cache_dir is not usable: {exc}")
    return PromptCacheStore(model, options.max_kv_size, cache_budget(options),
                            options.cache_max_entries, disk, options.kv_bits)


def cache_budget(options: LoadOptions) -> int:
    """``cache_max_bytes``, or by default 2 GiB on a CPU and a quarter of the GPU's memory (2-64 GiB) on a
    GPU: one 16k-token conversation of a 12B model holds ~2 GB of KV plus its window snapshots."""
    if options.cache_max_bytes is not None:
        return options.cache_max_bytes
    if mx.default_device().type != mx.DeviceType.gpu:
        return 2 << 30
    info = mx.device_info()
    memory = info.get("memory_size") or info.get("total_memory") or (64 << 30)
    return int(min(64 << 30, max(2 << 30, memory // 4)))
