#!/bin/bash
# bench/probe/next15.sh: the device runs issue 15 still needs, after setup.sh (two calls back to back).
#   call A: bash bench/probe/next15.sh drift   ~3 min: does one stream slow down over requests? (solo_drift.py)
#   call B: bash bench/probe/next15.sh final   ~8 min: final15.sh (lean loop with the fused kernels, agreement,
#                                              then the worker's 4/8-stream ratios)
#   spy:    bash bench/probe/next15.sh spy     py-spy of the worker's threads at 1/4/8 streams (conc_spy.py)
#   call C: bash bench/probe/next15.sh gemma   ~4 min: the lean loop and agreement on a Gemma-3-1B shape
#                                              (sliding-window layers: rotating batch caches with the kernels)
M=${MODELS:-/tmp/gpu-models}
case "$1" in
  drift) python3 -m bench.probe.solo_drift --models-dir $M --requests ${REQUESTS:-6} 2>&1 | grep -v transformers | tee $OUT/drift.log ;;
  final) bash bench/probe/final15.sh ;;
  gemma) python3 -m bench.probe.batch_host --models-dir $M --shape gemma3-1b --prompt 700 --sizes 1,2,4,8 \
           --variants base,both,fused --agree --rounds 2 --steps 64 2>&1 | grep -v transformers | tee $OUT/gemma.log ;;
  spy) [ -x /tmp/spy/bin/py-spy ] || python3 -m pip install -q --no-deps --target /tmp/spy .whl2/py_spy*.whl
       export PATH=/tmp/spy/bin:$PATH
       python3 -m bench.probe.conc_spy --models-dir $M --out $OUT --plan ${PLAN:-1:1,8:1,8:4,8:8} 2>&1 | grep -v transformers | tee $OUT/spy.log
       [ -n "$DRIFT" ] && python3 -m bench.probe.solo_drift --models-dir $M --requests 6 --variants $DRIFT 2>&1 | grep -v transformers | tee $OUT/drift.log ;;
  *) echo "usage: next15.sh drift|final|gemma"; exit 2 ;;
esac
