#!/bin/bash
cat /root/stash/cudapart.aa .whl2/cudapart.ab > /tmp/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl /tmp/mlx_cuda_13*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
F="grep -v -i warn\|use_fast\|indices"
echo "== diag keep"; python3 -m bench.gpu_diag --shape 4b --doc 250 --n 5 --keep 2>&1 | grep -v -i "warn\|use_fast\|indices" | tail -6
echo "== diag putback"; python3 -m bench.gpu_diag --shape 4b --doc 250 --n 5 2>&1 | grep -v -i "warn\|use_fast\|indices" | tail -3
echo "== spy"; /tmp/site/bin/py-spy record --nonblocking --subprocesses -r 400 -f raw -o /tmp/spy.txt -- python3 -m bench.gpu_cache --shape 4b --rounds 2 --long 0 --only 300 --no-mlx-vlm --models-dir /root/models --out $OUT/spy 2>&1 | grep -v -i "warn\|use_fast\|indices" | tail -2 | cut -c1-400
python3 bench/probe/spy_summary.py /tmp/spy.txt > $OUT/spy-summary.txt; gzip -c /tmp/spy.txt > $OUT/spy.txt.gz; ls -la $OUT
