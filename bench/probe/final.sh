#!/bin/bash
# bench/probe/final.sh SHAPE ROUNDS: the GPU prompt-cache bench, installing the wheels first if needed
if [ ! -d /tmp/site/mlx ]; then
  cat /root/stash/cudapart.aa .whl2/cudapart.ab > /tmp/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl /tmp/mlx_cuda_13*.whl 2>&1 | tail -2
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -m bench.gpu_cache --shape $1 --rounds $2 --no-mlx-vlm --models-dir /root/models --worker-env MLX_WORKER_LOG=debug --out $OUT 2>&1 | grep -v -i "warn\|use_fast\|indices" > $OUT/gpu-cache-$1.log
grep "\] \(300\|2.5k\|messages-16k\): {" $OUT/gpu-cache-$1.log | cut -c1-1200
