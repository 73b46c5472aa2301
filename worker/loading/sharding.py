"""Splitting the text model over the ranks: mlx-lm's ``model.shard(group)`` (tensor parallel) or
``model.model.pipeline(group)`` (pipeline parallel), applied to the lazily loaded model before its weights
are read, so each rank reads only its share (mlx-lm's ``sharded_load`` does the same).

The draft model and a vision tower are not split: every rank holds them whole (they are small) and runs them
on the same inputs, so their outputs agree without any traffic between the ranks.
"""

from typing import Optional

import mlx.nn as nn

from ..patches import gemma3_text_shard
from ..protocol import WorkerError, failing_as


def _pipeline_owner(model: nn.Module):
    """The module with mlx-lm's ``pipeline()`` (``model.model``, or a VLM's ``language_model.model``)."""
    for owner in (getattr(model, "model", None), getattr(getattr(model, "language_model", None), "model", None)):
        if owner is not None and hasattr(owner, "pipeline"):
            return owner
    return None


def modes(model: nn.Module) -> list:
    """The ways this model can be split, best first."""
    gemma3_text_shard.ensure()
    out = []
    if hasattr(model, "shard"):
        out.append("tensor")
    if _pipeline_owner(model) is not None:
        out.append("pipeline")
    return out


def split(model: nn.Module, model_type: str, wanted: Optional[str], group) -> Optional[str]:
    """Split ``model`` over ``group`` (None: one rank, nothing to split); returns the mode used."""
    if group is None or group.size() < 2:
        return None
    can = modes(model)
    if not can:
        raise WorkerError("invalid_params", f"{model_type} cannot be split over {group.size()} ranks: mlx-lm has "
                          "neither shard() nor pipeline() for it; run it with one rank")
    mode = wanted or can[0]
    if mode not in can:
        raise WorkerError("invalid_params", f"options.parallel {mode!r} is not available for {model_type}; "
                          f"what works: {', '.join(repr(m) for m in can)}")
    with failing_as("invalid_params", f"{model_type} cannot be split {mode}-parallel over {group.size()} ranks"):
        if mode == "tensor":
            model.shard(group)
        else:
            _pipeline_owner(model).pipeline(group)
    return mode
