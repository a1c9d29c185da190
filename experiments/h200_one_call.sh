#!/usr/bin/env bash
# The layer-wise hybrid grid in ONE device call of at most 10 minutes (issue 11): shared MoBA
# pretraining, then every SFT run of every seed, grid.workers at a time on the GPUs it is given.
#
#   bash experiments/h200_one_call.sh [key=value ...]      # extra overrides for every grid run
#   EXP=layerwise_hybrid_h200 T_GRID=560 bash experiments/h200_one_call.sh
#
# The grid is stopped by SIGTERM at T_GRID seconds if it runs long: workers checkpoint, the runs
# that finished are reported, and a rerun of the same command resumes the rest. Results (table,
# charts, run records without checkpoints) land in $OUT (default /tmp/out).
set -uo pipefail
EXP=${EXP:-layerwise_hybrid_h200}
G=${GRID_DIR:-/tmp/grid}
RES=${OUT:-/tmp/out}
T_GRID=${T_GRID:-560}
mkdir -p "$RES" "$G"
nvidia-smi --query-gpu=index,name,memory.total --format=csv > "$RES/gpus.csv" 2>&1
start=$(date +%s)
timeout -s TERM -k 30 "$T_GRID" moba-jax grid "$EXP" out_dir="$G" --no-progress "$@" \
  2>&1 | tee "$RES/grid.log"
echo "grid rc=${PIPESTATUS[0]} wall_s=$(( $(date +%s) - start ))" | tee -a "$RES/grid.log"
cp "$G"/results.* "$G"/*.png "$RES"/ 2>/dev/null
tar czf "$RES/runs.tgz" --exclude=checkpoints --exclude=jax_cache -C "$(dirname "$G")" \
  "$(basename "$G")" 2>/dev/null
