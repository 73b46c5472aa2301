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


def _indivisible(config: dict, n: int) -> list:
    """The sizes a tensor split over ``n`` ranks must divide and does not (attention heads, the MLP)."""
    text = config.get("text_config") or config
    keys = ("num_attention_heads", "num_key_value_heads", "intermediate_size")
    return [(k, text[k]) for k in keys if isinstance(text.get(k), int) and text[k] % n]


def _ranks_that_work(config: dict, n_max: int = 16) -> list:
    return [n for n in range(2, n_max + 1) if not _indivisible(config, n)]


def split(model: nn.Module, config: dict, wanted: Optional[str], group) -> Optional[str]:
    """Split ``model`` over ``group`` (None: one rank, nothing to split); returns the mode used."""
    if group is None or group.size() < 2:
        return None
    model_type, n = config["model_type"], group.size()
    can = modes(model)
    odd = _indivisible(config, n)
    if odd and "tensor" in can:
        can.remove("tensor")
        if not can and wanted in (None, "tensor"):
            sizes = ", ".join(f"{k} {v}" for k, v in odd)
            works = _ranks_that_work(config)
            raise WorkerError("invalid_params", f"{model_type} cannot be split over {n} ranks: {sizes} not "
                              f"divisible by {n}; tensor parallel works with "
                              f"{', '.join(map(str, works)) or 'no'} ranks (pipeline: mlx-lm has none for it)")
    if not can:
        raise WorkerError("invalid_params", f"{model_type} cannot be split over {n} ranks: mlx-lm has "
                          "neither shard() nor pipeline() for it; run it with one rank")
    mode = wanted or can[0]
    if mode not in can:
        why = f" ({', '.join(f'{k} {v}' for k, v in odd)} not divisible by {n})" if odd and mode == "tensor" else ""
        raise WorkerError("invalid_params", f"options.parallel {mode!r} is not available for {model_type} over "
                          f"{n} ranks{why}; what works: {', '.join(repr(m) for m in can)}")
    with failing_as("invalid_params", f"{model_type} cannot be split {mode}-parallel over {n} ranks"):
        if mode == "tensor":
            model.shard(group)
        else:
            _pipeline_owner(model).pipeline(group)
    return mode
