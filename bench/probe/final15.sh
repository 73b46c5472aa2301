#!/bin/bash
# bench/probe/final15.sh: issue 15's acceptance run on the device, one call (after setup.sh).
# 1) the lean loop (bench/probe/batch_host.py) per batch size and kernel choice (its docstring), first
#    checking each choice's greedy tokens against MLX's; 2) the best choice per size among the worker's
#    (both: 8M+ matrices through rows_qmv; fused: the same, q/k/v and gate/up one launch each; fusedo:
#    fused, 4M+) becomes MLX_WORKER_QMV_LEAST, and MLX_WORKER_FUSE=1 where a fused choice wins at 4 rows,
#    for 3) bench.gpu_concurrency (both workers interleaved, round by round).
M=${MODELS:-/tmp/gpu-models}
python3 -m bench.probe.batch_host --models-dir $M --shape ${SHAPE:-llama-3.2-1b} --sizes ${SIZES:-1,2,4,8} --variants ${VARIANTS:-base,both,fused,fusedo} --agree \
  --rounds ${HOST_ROUNDS:-3} --steps 64 2>&1 | grep -v transformers | tee $OUT/probe.log
grep -q "^B=2" $OUT/probe.log || { echo "the lean loop failed"; exit 1; }
read MLX_WORKER_QMV_LEAST MLX_WORKER_FUSE < <(python3 - $OUT/probe.log <<'PY'
import re, sys
best = {}
for ln in open(sys.argv[1]):
    m = re.match(r"B=(\d+) (both|fused|fusedo)\s.*step ([\d.]+) ms", ln)
    if m and int(m[1]) > 1:
        best.setdefault(int(m[1]), {})[m[2]] = float(m[3])
fuse = 4 in best and min(best[4], key=best[4].get) != "both"
least = {"both": 1 << 23, "fused": 1 << 23, "fusedo": 1 << 22}
pick = {b: min((v for v in t if fuse or v == "both"), key=t.get) for b, t in best.items()}
print(",".join(f"{b}:{least[v]}" for b, v in sorted(pick.items())), int(fuse))
PY
)
export MLX_WORKER_QMV_LEAST MLX_WORKER_FUSE
echo "policy from the lean loop: MLX_WORKER_QMV_LEAST=$MLX_WORKER_QMV_LEAST MLX_WORKER_FUSE=$MLX_WORKER_FUSE" | tee -a $OUT/probe.log
python3 -m bench.gpu_concurrency --models-dir $M --shape ${SHAPE:-llama-3.2-1b} --out $OUT --rounds ${ROUNDS:-5} 2>&1 | grep -v transformers | tee $OUT/conc.log | tail -12
