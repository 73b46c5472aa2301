#!/bin/bash
# bench/probe/after_install.sh: issue 15 after the per-step install fix, one device call (after setup.sh).
M=${MODELS:-/tmp/gpu-models}
for c in 1 0; do
  echo "thrash check $c: $(MLX_CUDA_GRAPH_CACHE_SIZE=2 MLX_ENABLE_CACHE_THRASHING_CHECK=$c python3 -m bench.probe.thrash 2>&1 | tail -1)" | tee -a $OUT/probe.log
done
python3 -m bench.probe.batch_host --models-dir $M --sizes 1,4,8 --variants base,both --rounds 3 --steps 64 2>&1 \
  | grep -v transformers | tee -a $OUT/probe.log
python3 -m bench.gpu_concurrency --models-dir $M --out $OUT --rounds ${ROUNDS:-2} 2>&1 | grep -v transformers | tee $OUT/conc.log | tail -20
