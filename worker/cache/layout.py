"""The KV cache a model gets: mlx-lm's own layout, with ``max_kv_size`` and ``kv_bits`` made to work for
every family (mlx-lm drops ``max_kv_size`` for models with their own ``make_cache``, and cannot quantize
the rotating layers of sliding-window models such as Gemma 3)."""

from mlx_lm.models import cache as mlx_cache
from mlx_lm.models.cache import KVCache, make_prompt_cache


class RotatingKVCache(mlx_cache.RotatingKVCache):
    """A rotating (sliding-window) layer that stays exact under ``kv_bits``.

    mlx-lm's ``maybe_quantize_kv_cache`` converts every layer that has ``to_quantized``; a rotating
    layer's raises NotImplementedError. Here the attribute is absent, so the full-attention layers are
    quantized and the window layers (bounded by their window) are kept as they are. The class keeps
    mlx-lm's name: ``save_prompt_cache`` records it, and ``load_prompt_cache`` gives back mlx-lm's class,
    which ``adapt`` turns into this one again.
    """

    @property
    def to_quantized(self):
        raise AttributeError("rotating KV layers stay unquantized")


def make_cache(model, max_kv_size=None, kv_bits=None) -> list:
    """A fresh cache for ``model``: with ``max_kv_size``, every full-attention layer becomes a window of
    that size (keeping the first 4 tokens, as mlx-lm does for models without ``make_cache``)."""
    cache = make_prompt_cache(model, max_kv_size=max_kv_size)
    if max_kv_size is not None and hasattr(model, "make_cache"):
        cache = [mlx_cache.RotatingKVCache(max_size=max_kv_size, keep=4) if type(c) is KVCache else c
                 for c in cache]
    return adapt(cache, kv_bits)


def adapt(cache: list, kv_bits) -> list:
    """Make a cache (fresh, or loaded from disk) safe for ``kv_bits``: rotating layers stay exact."""
    if kv_bits is not None:
        for c in cache:
            if type(c) is mlx_cache.RotatingKVCache:
                c.__class__ = RotatingKVCache
    return cache


def quantizable(cache: list) -> bool:
    """Whether ``kv_bits`` would quantize any layer of this cache."""
    return any(hasattr(c, "to_quantized") for c in cache)


def trimmable_span(cache: list):
    """How many tokens this cache can hold and still be cut back anywhere (speculative decoding rewinds
    rejected drafts): the smallest rotating window, 0 for other layers that never trim (SSM state), None
    when every layer trims."""
    limits = []
    for c in cache:
        if isinstance(c, mlx_cache.RotatingKVCache):
            limits.append(c.max_size)
        elif not (hasattr(c, "is_trimmable") and c.is_trimmable()):
            limits.append(0)
    return min(limits) if limits else None
