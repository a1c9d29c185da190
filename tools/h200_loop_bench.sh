#!/usr/bin/env bash
# Steps/s of `moba-jax train` with the synchronous loop (the code of commit 5e3d0b0, carried in .old/)
# against the current one (step n+1 dispatched before step n's metrics are read), one H200:
# the H200 grid's SFT shape (12 x 256, 16 x 4,096, MoBA) and the CPU default's model (12 x 64,
# 4 x 512), where host overhead weighs most. Prints step_time_s per run.
set -uo pipefail
RES=${OUT:-/tmp/out}; C=$PWD/.corpus/python3.11.7-stdlib
run() {  # $1 = label, $2 = PYTHONPATH prefix, $3 = config file, rest = overrides
  local label=$1 pp=$2 file=$3; shift 3
  PYTHONPATH=$pp${PYTHONPATH:+:$PYTHONPATH} timeout 120 python3 -m moba_jax.cli train "$file" \
    run_dir=/tmp/lb_$label data.path="$C" checkpoint.every=0 eval.batches=1 log.every=50 \
    log.progress=false "$@" > "$RES/$label.log" 2>&1
  python3 -c "
import json; rows=[json.loads(l) for l in open('/tmp/lb_$label/metrics.jsonl')]
print('$label', [round(r['step_time_s'],5) for r in rows])" | tee -a "$RES/loop_bench.txt"
}
H200="experiments/layerwise_hybrid_h200.toml train.steps=300"
CPU="experiments/layerwise_hybrid_cpu.toml train.steps=600 model.dtype=bfloat16 log.every=100"
for i in 1; do
  run h200_old$i "$PWD/.old" $H200; run h200_new$i "" $H200
  run cpu_old$i "$PWD/.old" $CPU; run cpu_new$i "" $CPU
done
