#!/usr/bin/env bash
# Device pilot of issue 11, one call on one H200 (run from the project root, corpus in .corpus/):
#  1. the H200 grid shortened: stage 1 for 100 steps alone, then its 6 SFT variants x 1 seed x 80
#     steps side by side (grid.workers=6): correctness, step times alone and side by side;
#  2. stage-1 candidates of the CPU default pretrained on the GPU, side by side: B = the file as it
#     stands (seq 512, block 64), A = seq 256, block 32. Their run dirs come back in cpu_stage1.tgz.
set -uo pipefail
RES=${OUT:-/tmp/out}
C=$PWD/.corpus/python3.11.7-stdlib
mkdir -p "$RES"
log() { echo "[$(date +%T)] $*" | tee -a "$RES/phases.log"; }
nvidia-smi --query-gpu=index,name,memory.total --format=csv > "$RES/gpus.csv" 2>&1
log "phase 1: H200 grid, short"
s=$(date +%s)
timeout -s TERM -k 20 "${T1:-240}" moba-jax grid layerwise_hybrid_h200 out_dir=/tmp/p data.path="$C" \
  grid.pretrain.data.response_tokens=0 grid.pretrain.train.steps=100 grid.pretrain.train.lr=2e-3 \
  grid.pretrain.train.warmup_steps=10 grid.pretrain.eval.batches=2 \
  train.steps=80 'seeds=[0]' eval.batches=2 log.every=10 --no-progress > "$RES/h200.log" 2>&1
log "phase 1 rc=$? in $(( $(date +%s) - s ))s"
log "phase 2: CPU stage-1 candidates"
cpu1() {  # $1 = name, rest = overrides
  local n=$1; shift
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 timeout -s TERM -k 20 "${T2:-220}" moba-jax grid \
    layerwise_hybrid_cpu --stage pretrain grid.init_from= out_dir=/tmp/cpu$n data.path="$C" \
    model.dtype=bfloat16 --no-progress "$@" > "$RES/cpu$n.log" 2>&1
  log "cpu$n rc=$?"
}
s=$(date +%s)
cpu1 B &
cpu1 A train.seq_len=256 moba.block_size=32 data.response_tokens=64 eval.trailing_tokens=32 &
wait
log "phase 2 in $(( $(date +%s) - s ))s"
tar czf "$RES/cpu_stage1.tgz" -C /tmp cpuA/pretrain cpuB/pretrain --exclude=jax_cache 2>/dev/null
tar czf "$RES/pilot_runs.tgz" --exclude=checkpoints --exclude=jax_cache -C /tmp p 2>/dev/null
cp /tmp/p/results.md "$RES/" 2>/dev/null
cat "$RES/phases.log"; tail -12 "$RES/h200.log"
