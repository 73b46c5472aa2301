#!/bin/bash
# bench/probe/next15.sh: the device runs issue 15 still needs, after setup.sh (two calls back to back).
#   call A: bash bench/probe/next15.sh drift   ~3 min: does one stream slow down over requests? (solo_drift.py)
#   call B: bash bench/probe/next15.sh final   ~8 min: final15.sh (lean loop with the fused kernels, agreement,
#                                              then the worker's 4/8-stream ratios)
#   call C: bash bench/probe/next15.sh gemma   ~4 min: the lean loop and agreement on a Gemma-3-1B shape
#                                              (sliding-window layers: rotating batch caches with the kernels)
M=${MODELS:-/tmp/gpu-models}
case "$1" in
  drift) python3 -m bench.probe.solo_drift --models-dir $M --requests ${REQUESTS:-6} 2>&1 | grep -v transformers | tee $OUT/drift.log ;;
  final) bash bench/probe/final15.sh ;;
  gemma) python3 -m bench.probe.batch_host --models-dir $M --shape gemma3-1b --prompt 700 --sizes 1,2,4,8 \
           --variants base,both,fused --agree --rounds 2 --steps 64 2>&1 | grep -v transformers | tee $OUT/gemma.log ;;
  *) echo "usage: next15.sh drift|final|gemma"; exit 2 ;;
esac
