"""VisionAddOns: mlx-vlm's vision tower + projector, loaded alone, feeding the mlx-lm text model.

One file per family; ``base.py`` holds the contract (``VisionAddOn``) and what every family shares.
"""

from pathlib import Path

from ..protocol import failing_as


def family_map() -> dict:
    """model_type -> VisionAddOn class (imported on first use: mlx-vlm loads only for vision models)."""
    from . import gemma3, mistral3, pixtral, qwen2_5_vl, qwen2_vl

    return {c.family: c for c in (gemma3.Gemma3AddOn, pixtral.PixtralAddOn, mistral3.Mistral3AddOn,
                                  qwen2_vl.Qwen2VLAddOn, qwen2_5_vl.Qwen25VLAddOn)}


def load_addon(path, config, text_model, options):
    """Returns (addon or None, warning or None) for a checkpoint whose config has a vision_config."""
    family = config.get("model_type")
    cls = family_map().get(family)
    if cls is None:
        return None, (f"this checkpoint has a vision tower ({family}) but no vision add-on supports "
                      "it yet: loaded text-only")
    with failing_as("model_load_failed", f"could not load the {family} vision tower"):
        return cls(Path(path), config, text_model, options), None
