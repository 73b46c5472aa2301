"""The ``ready`` event: who this worker is and what it can do."""

import os
from importlib.metadata import PackageNotFoundError, version

import mlx.core as mx

from . import __version__, blas
from .protocol import PROTOCOL_VERSION, DeviceInfo, Limits, Ready
from .server import MAX_QUEUE

CAPABILITIES = ["load", "generate", "cancel", "tokenize", "status", "unload", "shutdown",
                "chat_template", "stop_strings", "prompt_progress"]


def _version(pkg: str) -> str:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "missing"


def ready_event(max_line_bytes: int) -> Ready:
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
        capabilities=CAPABILITIES,
        limits=Limits(max_line_bytes=max_line_bytes, max_queue=MAX_QUEUE),
    )
