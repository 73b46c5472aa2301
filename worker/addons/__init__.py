"""VisionAddOns: mlx-vlm's vision tower + projector, loaded alone, feeding the mlx-lm text model.

One file per family; ``base.py`` holds the contract (``VisionAddOn``) and what every family shares.
A family file defines ``VisionAddOn`` subclasses whose ``family`` is the config's model_type; they are
found by scanning this package (imported on first use: mlx-vlm loads only for vision models).
"""

import functools
import importlib
import pkgutil
from pathlib import Path

from ..protocol import failing_as

_SHARED = {"base", "images"}  # modules of this package that are not families


@functools.lru_cache(maxsize=1)
def family_map() -> dict:
    """model_type -> VisionAddOn class, over every family module of this package."""
    from .base import VisionAddOn

    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in _SHARED or info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(mod).values():
            ours = isinstance(obj, type) and obj.__module__ == mod.__name__
            if ours and issubclass(obj, VisionAddOn) and obj.family:
                found[obj.family] = obj
    return found


def load_addon(path, config, text_model, options):
    """Returns (addon or None, warning or None) for a checkpoint whose config has a vision_config."""
    family = config.get("model_type")
    cls = family_map().get(family)
    if cls is None:
        return None, (f"this checkpoint has a vision tower ({family}) but no vision add-on supports "
                      "it yet: loaded text-only")
    with failing_as("model_load_failed", f"could not load the {family} vision tower"):
        return cls(Path(path), config, text_model, options), None
