#!/bin/bash
cat /root/stash/cudapart.aa .whl2/cudapart.ab > /tmp/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl /tmp/mlx_cuda_13*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -m bench.gpu_cache --shape 4b --rounds 2 --long 0 --no-mlx-vlm --models-dir /root/models --worker-env MLX_WORKER_LOG=debug --out $OUT "$@" 2>&1 | grep -v -i "warn\|use_fast\|indices" > $OUT/phases.log
grep -c . $OUT/phases.log; tail -3 $OUT/phases.log | cut -c1-300
