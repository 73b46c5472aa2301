"""Warm-up at load: the decode kernels compiled before the first request (on a GPU the first call of each shape
compiles for seconds), for one sequence and, when the model batches, for every batch size."""

import time
from contextlib import nullcontext

import mlx.core as mx
from mlx_lm.generate import generate_step

from ..cache.layout import make_cache
from ..cuda.batch_kernels import batch_kernels
from .decode_batch import merge


def wanted(options) -> bool:
    """``load.options.warmup``, by default on a GPU only."""
    on_gpu = mx.default_device().type == mx.DeviceType.gpu
    return options.warmup if options.warmup is not None else on_gpu


def warm_up(kit, most: int) -> float:
    """A short throwaway generation, then batched steps of every size 2..``most``; returns the seconds spent."""
    tic = time.perf_counter()
    opts = kit.options
    for _ in generate_step(mx.array([0, 1, 2, 3]), kit.model, max_tokens=4,
                           prompt_cache=make_cache(kit.model, opts.max_kv_size, opts.kv_bits),
                           kv_bits=opts.kv_bits, kv_group_size=opts.kv_group_size,
                           quantized_kv_start=opts.quantized_kv_start):
        pass
    _batch_sizes(kit.model, kit.cache.fresh, most)
    mx.clear_cache()
    return round(time.perf_counter() - tic, 4)


def _batch_sizes(model, fresh, most: int) -> None:
    kernels = batch_kernels(model)
    for b in range(2, most + 1):
        caches = []
        for i in range(b):
            c = fresh()
            model(mx.array([list(range(1, 3 + i))]), cache=c)
            caches.append(c)
        cache, y = merge(caches), mx.zeros((b,), dtype=mx.uint32)
        for _ in range(3):
            with kernels(b) if kernels else nullcontext():
                y = mx.argmax(model(y[:, None], cache=cache)[:, -1, :], axis=-1)
            mx.eval(y)
