"""VisionAddOns: mlx-vlm's vision tower + projector, loaded alone, feeding the mlx-lm text model.

One file per family; ``base.py`` holds the contract (``VisionAddOn``) and what every family shares.
``ADDONS`` maps a config's model_type to its add-on class ("module:Class" in this package, the class's
``family`` being that model_type); the module is imported on first use, so mlx-vlm loads only for
vision models. A new family adds its line here.
"""

import importlib
from pathlib import Path

from ..protocol import failing_as

ADDONS = {
    "gemma3": "gemma3:Gemma3AddOn",
    "gemma3n": "gemma3n:Gemma3nAddOn",
    "gemma4": "gemma4:Gemma4AddOn",
    "idefics3": "idefics3:Idefics3AddOn",
    "smolvlm": "idefics3:SmolVLMAddOn",
    "lfm2-vl": "lfm2_vl:Lfm2VlAddOn",
    "mistral3": "mistral3:Mistral3AddOn",
    "pixtral": "pixtral:PixtralAddOn",
    "qwen2_vl": "qwen2_vl:Qwen2VLAddOn",
    "qwen2_5_vl": "qwen2_5_vl:Qwen25VLAddOn",
    "qwen3_vl": "qwen3_vl:Qwen3VLAddOn",
    "qwen3_vl_moe": "qwen3_vl:Qwen3VLMoeAddOn",
    "qwen3_5": "qwen3_5:Qwen35AddOn",
    "qwen3_5_moe": "qwen3_5:Qwen35MoeAddOn",
}


def addon_class(model_type: str):
    """The VisionAddOn class for a model_type (its module imported now), or None."""
    entry = ADDONS.get(model_type)
    if entry is None:
        return None
    module, name = entry.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def load_addon(path, config, text_model, options):
    """Returns (addon or None, warning or None) for a checkpoint whose config has a vision_config."""
    family = config.get("model_type")
    cls = addon_class(family)
    if cls is None:
        return None, (f"this checkpoint has a vision tower ({family}) but no vision add-on supports "
                      "it yet: loaded text-only")
    with failing_as("model_load_failed", f"could not load the {family} vision tower"):
        return cls(Path(path), config, text_model, options), None
