"""No network, ever: the worker only loads local directories.

Environment switches keep huggingface_hub / transformers offline, and the download entry points
that mlx-lm and mlx-vlm import are replaced by functions that refuse loudly.
"""

import os

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "HF_DATASETS_OFFLINE": "1", "DO_NOT_TRACK": "1"}


class DownloadRefused(RuntimeError):
    pass


def _refuse(*args, **kwargs):
    raise DownloadRefused(f"the worker never downloads models (asked for {args[:1]}); "
                          "pass a local model directory")


def set_offline_env() -> None:
    """Call before huggingface_hub / transformers are imported (they read these at import)."""
    os.environ.update(OFFLINE_ENV)


def patch_downloads() -> None:
    """Replace the hub download functions that loaders hold references to."""
    import importlib

    for mod_name, attrs in (("huggingface_hub", ("snapshot_download", "hf_hub_download")),
                            ("mlx_lm.utils", ("snapshot_download",)),
                            ("mlx_vlm.utils", ("snapshot_download", "hf_hub_download"))):
        try:
            mod = importlib.import_module(mod_name)
        except Exception:  # an optional package that is missing or broken: nothing to patch
            continue
        for attr in attrs:
            if hasattr(mod, attr):
                setattr(mod, attr, _refuse)
