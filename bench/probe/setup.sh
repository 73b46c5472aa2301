#!/bin/bash
# bench/probe/setup.sh: install the carried GPU wheels into /tmp/site once per machine (see bench/README.md)
if [ ! -d /tmp/site/mlx ]; then
  cat /root/stash/cudapart.aa .whl2/cudapart.ab > /tmp/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl /tmp/mlx_cuda_13*.whl 2>&1 | tail -2
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
