"""Facts about a module's parameters, shared by the text model, the draft and the vision add-ons."""

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten


def stored_dtype(module: nn.Module) -> mx.Dtype:
    """The floating dtype holding most of the parameters (float32 when there are none)."""
    counts = {}
    for _, p in tree_flatten(module.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            counts[p.dtype] = counts.get(p.dtype, 0) + p.size
    return max(counts, key=counts.get) if counts else mx.float32


def nbytes(module: nn.Module) -> int:
    """Bytes of the parameters (computed from shapes: lazy parameters are not read)."""
    return sum(p.nbytes for _, p in tree_flatten(module.parameters()))
