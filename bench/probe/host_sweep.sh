#!/bin/bash
# bench/probe/host_sweep.sh: issue 15's host-bound question on the device, in one call (after setup.sh).
# 1) batch_host (build / encode / wait per step) under MLX CUDA encoder settings; 2) py-spy --native of
# the lean loop at 1 and 4 rows. Logs and raw profiles go to $OUT.
M=${MODELS:-/tmp/gpu-models}
python3 -c "import sys; sys.path.insert(0,'.'); from pathlib import Path; from bench.gpu import build; build(Path('$M'),'llama-3.2-1b',4)"
run() {  # $1 label, rest: env assignments
  local label=$1; shift
  echo "=== $label ($*)" | tee -a $OUT/sweep.log
  env "$@" timeout ${T:-150} python3 -m bench.probe.batch_host --models-dir $M --sizes ${SIZES:-1,4,8} \
    --variants ${VARIANTS:-base,both,allqmv} --rounds ${ROUNDS:-2} --steps 64 2>&1 | tee -a $OUT/sweep.log
}
run default X=1
run ops60 MLX_MAX_OPS_PER_BUFFER=60
run ops200 MLX_MAX_OPS_PER_BUFFER=200
run nographs MLX_USE_CUDA_GRAPHS=0
SPY=/tmp/site/bin/py-spy; [ -x $SPY ] || SPY=$(ls /tmp/site/*/scripts/py-spy /tmp/site/bin/py-spy 2>/dev/null | head -1)
for spec in "1 base" "4 both" "4 allqmv"; do
  set -- $spec
  python3 -m bench.probe.batch_host --models-dir $M --sizes $1 --variants $2 --rounds 200 --steps 64 > $OUT/spy-run-$1-$2.log 2>&1 &
  pid=$!; sleep ${SPY_DELAY:-12}
  $SPY record --native -r 400 -d 5 -f raw -o $OUT/spy-native-$1-$2.txt --pid $pid > $OUT/spy-$1-$2.err 2>&1
  kill $pid; wait $pid 2>/dev/null
done
ls -la $OUT
