"""The ``ready`` event: who this worker is and what it can do."""

import os
from importlib.metadata import PackageNotFoundError, version

import mlx.core as mx

from .. import __version__
from . import blas
from ..protocol import (
    PROTOCOL_VERSION, REQUEST_TYPES, DeviceInfo, Generate, GenerateParams, Limits, LoadOptions, Progress, Prompt,
    Ready, Token,
)

# Features beyond the request types, each named after the protocol element that carries it, so the list
# cannot claim what the wire types lack (tests/process/test_promises.py checks each is documented in PROTOCOL.md).
FEATURES = {
    "chat_template": (Prompt, "messages"),
    "images": (Prompt, "images"),
    "audio": (Prompt, "audio"),
    "stop_strings": (GenerateParams, "stop"),
    "stop_token_ids": (GenerateParams, "stop_token_ids"),
    "logprobs": (GenerateParams, "top_logprobs"),
    "penalties": (GenerateParams, "repetition_penalty"),
    "logit_bias": (GenerateParams, "logit_bias"),
    "json_schema": (GenerateParams, "json_schema"),
    "speculative": (GenerateParams, "speculative"),
    "prompt_lookup": (GenerateParams, "prompt_lookup"),
    "prompt_cache": (Generate, "cache_key"),
    "prompt_cache_disk": (LoadOptions, "cache_dir"),
    "kv_bits": (LoadOptions, "kv_bits"),
    "max_kv_size": (LoadOptions, "max_kv_size"),
    "max_memory": (LoadOptions, "max_memory"),
    "kv_memory": (LoadOptions, "kv_memory"),
    "warmup": (LoadOptions, "warmup"),
    "prompt_progress": (Progress, "processed"),
    "tools": (Prompt, "tools"),
    "reasoning": (Token, "channel"),
    "template_kwargs": (Prompt, "template_kwargs"),
    "batching": (LoadOptions, "max_concurrent"),
    "distributed": (LoadOptions, "parallel"),
}


def capabilities() -> list:
    """Every request type, then every feature whose field the wire types have."""
    features = [name for name, (cls, fld) in FEATURES.items() if fld in cls.__struct_fields__]
    return list(REQUEST_TYPES) + features


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "missing"


def ready_event(max_line_bytes: int, max_queue: int, ranks=None) -> Ready:
    dev = mx.default_device()
    is_gpu = dev.type == mx.DeviceType.gpu
    info = DeviceInfo(
        type="gpu" if is_gpu else "cpu",
        name=str(dev),
        blas=None if is_gpu else blas.log_blas_status(),
        compute_dtype="auto" if is_gpu else "float32",
    )
    return Ready(
        id=None,
        protocol_version=PROTOCOL_VERSION,
        versions={"worker": __version__, "mlx": _version("mlx"), "mlx-lm": _version("mlx-lm"),
                  "mlx-vlm": _version("mlx-vlm"), "python": os.sys.version.split()[0]},
        device=info,
        pid=os.getpid(),
        capabilities=capabilities(),
        limits=Limits(max_line_bytes=max_line_bytes, max_queue=max_queue),
        ranks=ranks,
    )
