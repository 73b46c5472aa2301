#!/bin/bash
# GPU diagnostics for the follow-up overhead (see bench/README.md); run from the repo root on the device.
cat /root/stash/cudapart.aa .whl2/cudapart.ab > /tmp/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl /tmp/mlx_cuda_13*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
B="python3 -m bench.gpu_cache --shape 4b --rounds 2 --long 0 --only 300 --no-mlx-vlm --models-dir /root/models"
run() {  # name, extra args...
  local name=$1; shift
  $B --out $OUT/$name "$@" 2>&1 | grep -v -i "warn\|use_fast\|indices" | tail -2 | cut -c1-600
}
echo "== spy"; /tmp/site/bin/py-spy record --nonblocking --subprocesses -r 400 -f raw -o $OUT/spy.txt -- $B --out $OUT/spy 2>&1 | grep -v -i "warn\|use_fast\|indices" | tail -3 | cut -c1-600
for v in gc_off switch; do echo "== $v"; run $v --worker-env PYTHONPATH=$PWD/bench/probe/$v:/tmp/site:$PWD; done
echo "== base"; run base
