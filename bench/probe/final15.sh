#!/bin/bash
# bench/probe/final15.sh: issue 15's acceptance run on the device, one call (after setup.sh).
# 1) the lean loop (bench/probe/batch_host.py) per batch size and kernel choice: attention kernel only
#    (attn), + rows_qmv for the head (head), + for the MLP matrices (both); 2) the best choice per size
#    becomes MLX_WORKER_QMV_LEAST for 3) bench.gpu_concurrency (both workers interleaved, round by round).
M=${MODELS:-/tmp/gpu-models}
python3 -m bench.probe.batch_host --models-dir $M --sizes ${SIZES:-1,2,3,4,6,8} --variants base,attn,head,both \
  --rounds ${HOST_ROUNDS:-3} --steps 64 2>&1 | grep -v transformers | tee $OUT/probe.log
export MLX_WORKER_QMV_LEAST=$(python3 - $OUT/probe.log <<'PY'
import re, sys
best = {}
for ln in open(sys.argv[1]):
    m = re.match(r"B=(\d+) (attn|head|both)\s.*step ([\d.]+) ms", ln)
    if m and int(m[1]) > 1:
        b, v, t = int(m[1]), m[2], float(m[3])
        if b not in best or t < best[b][1]:
            best[b] = (v, t)
least = {"attn": 1 << 40, "head": 1 << 26, "both": 1 << 23}
print(",".join(f"{b}:{least[v]}" for b, (v, _) in sorted(best.items())), end="")
PY
)
echo "policy from the lean loop: MLX_WORKER_QMV_LEAST=$MLX_WORKER_QMV_LEAST" | tee -a $OUT/probe.log
python3 -m bench.gpu_concurrency --models-dir $M --out $OUT --rounds ${ROUNDS:-5} 2>&1 | grep -v transformers | tee $OUT/conc.log | tail -12
