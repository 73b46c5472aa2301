"""Does MLX's CUDA graph cache throw on thrashing (why worker/__main__.py turns the check off)?

    MLX_CUDA_GRAPH_CACHE_SIZE=2 MLX_ENABLE_CACHE_THRASHING_CHECK=1 python -m bench.probes.thrash

Evaluates chains of 1..N adds (a distinct graph topology each), then a plain op after a failure.
"""
import sys

import mlx.core as mx

errors = []
for i in range(1, int(sys.argv[1]) if len(sys.argv) > 1 else 24):
    try:
        a = mx.ones((4, 4))
        b = a
        for _ in range(i):
            b = b + a
        mx.eval(b)
    except Exception as e:  # noqa: BLE001
        errors.append((i, str(e)[:160]))
try:
    after = (mx.ones((8,)) * 2).sum().item()
except Exception as e:  # noqa: BLE001
    after = f"failed: {str(e)[:160]}"
print(f"errors {len(errors)}: {errors[:2]}; an op afterwards: {after}")
