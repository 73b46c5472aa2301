"""VisionAddOns: mlx-vlm's vision tower + projector, loaded alone, feeding the mlx-lm text model."""


def load_addon(path, config, text_model, options):
    """Returns (addon or None, warning or None) for a checkpoint whose config has a vision_config."""
    family = config.get("model_type")
    return None, (f"this checkpoint has a vision tower ({family}) but no vision add-on supports "
                  "it yet: loaded text-only")
