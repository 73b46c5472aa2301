"""VisionAddOns: mlx-vlm's vision tower + projector, loaded alone, feeding the mlx-lm text model."""


def load_addon(path, config, text_model, options):
    """Returns (addon or None, warning or None) for a checkpoint whose config has a vision_config."""
    from .base import load_addon as _load

    return _load(path, config, text_model, options)
