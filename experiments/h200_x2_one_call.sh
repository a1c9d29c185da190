#!/usr/bin/env bash
# The layer-wise hybrid grid (issue 6) in ONE device call on a 2 x H200 machine, plus the 2-GPU
# data-parallel throughput check. Each run uses one GPU; the two GPUs split the SFT variants.
#
#   bash experiments/h200_x2_one_call.sh [key=value ...]     # extra overrides for every grid run
#
# Phases (each bounded by `timeout` so the call returns its files in time):
#   1. stage 1 (shared pretraining) on GPU 0; meanwhile GPU 1 measures 1-GPU training tokens/s,
#      then (if BENCH=1) runs `moba-jax bench --breakdown` at 8K/32K (Pallas vs jax-triton forward)
#   2. stage 2: GPU 0 runs variants $V0 and GPU 1 runs $V1 (all seeds), in parallel
#   3. the same training on both GPUs, data parallel (mesh.data=2), for tokens/s
#   4. `moba-jax report`, then the small result files are copied to $OUT (no checkpoints)
# If stage 1 fails with the default MoBA implementation ("auto" = pallas_gpu), everything is rerun
# with moba.implementation=reference (dense mask) and the log says so.
set -uo pipefail
EXP=${EXP:-experiments/layerwise_hybrid_h200.toml}
G=${GRID_DIR:-/tmp/grid}
RES=${OUT:-/tmp/out}
L=/tmp/logs  # logs travel inside runs.tgz ($OUT brings back at most 8 files)
T_PRE=${T_PRE:-140} T_SFT=${T_SFT:-440} T_TP=${T_TP:-100} BENCH=${BENCH:-0} T_BENCH=${T_BENCH:-110}
TP=${TP:-1}  # 0: skip the throughput runs (phase 1 on GPU 1 and phase 3)
# Variants per GPU, balanced by measured step time (MoBA-heavy variants are slower).
V0=${V0:-"0 3 10"} V1=${V1:-"1 5 all"}
mkdir -p "$RES" "$G" "$L"
EXTRA=("$@")
log() { echo "[$(date +%T)] $*" | tee -a "$RES/phases.log"; }

nvidia-smi --query-gpu=index,name,memory.total,clocks.max.sm --format=csv > "$L/gpus.csv" 2>&1
log "start; gpus: $(nvidia-smi -L | wc -l); overrides: ${EXTRA[*]}"

throughput() {  # $1 = run dir, $2 = mesh.data, $3 = global batch; rest = env prefix handled by caller
  timeout "$T_TP" moba-jax train "$EXP" "${EXTRA[@]}" run_dir="$1" mesh.data="$2" \
    train.batch_size="$3" data.task=lm train.steps=60 log.every=10 checkpoint.every=0 \
    eval.batches=1 \
    > "$L/$(basename "$1").log" 2>&1
}

log "phase 1: pretrain on GPU 0, 1-GPU throughput on GPU 1"
(
  if [ "$TP" = 1 ]; then
    CUDA_VISIBLE_DEVICES=1 throughput /tmp/tp1 1 32
    echo "1-GPU throughput rc=$?" >> "$L/gpu1.log"
  fi
  if [ "$BENCH" = 1 ]; then
    CUDA_VISIBLE_DEVICES=1 timeout "$T_BENCH" moba-jax bench --breakdown --seqs 8192,32768 \
      --configs 512:3 --repeats 10 --json "$RES/breakdown_triton.json" > "$L/bench.log" 2>&1
    echo "bench rc=$?" >> "$L/gpu1.log"
  fi
) &
tp1=$!
CUDA_VISIBLE_DEVICES=0 timeout "$T_PRE" moba-jax grid "$EXP" out_dir="$G" --stage pretrain \
  --no-progress "${EXTRA[@]}" > "$L/pretrain.log" 2>&1
pre_rc=$?
if [ $pre_rc -ne 0 ]; then
  log "pretrain failed (rc=$pre_rc); retrying everything with moba.implementation=reference"
  EXTRA+=("moba.implementation=reference")
  rm -rf "$G/pretrain"
  CUDA_VISIBLE_DEVICES=0 timeout "$T_PRE" moba-jax grid "$EXP" out_dir="$G" --stage pretrain \
    --no-progress "${EXTRA[@]}" > "$L/pretrain_retry.log" 2>&1
  log "pretrain retry rc=$?"
fi
wait $tp1; log "GPU 1 phase 1: $(cat $L/gpu1.log 2>/dev/null | tr '\n' ' ')"

log "phase 2: SFT variants split over the two GPUs"
vflags() { for v in $1; do printf -- '--variant %s ' "$v"; done; }
CUDA_VISIBLE_DEVICES=0 timeout "$T_SFT" moba-jax grid "$EXP" out_dir="$G" --stage sft \
  $(vflags "$V0") --no-progress "${EXTRA[@]}" > "$L/sft_gpu0.log" 2>&1 &
a=$!
CUDA_VISIBLE_DEVICES=1 timeout "$T_SFT" moba-jax grid "$EXP" out_dir="$G" --stage sft \
  $(vflags "$V1") --no-progress "${EXTRA[@]}" > "$L/sft_gpu1.log" 2>&1 &
b=$!
wait $a; log "SFT GPU 0 rc=$?"
wait $b; log "SFT GPU 1 rc=$?"

if [ "$TP" = 1 ]; then
  log "phase 3: 2-GPU data-parallel throughput"
  throughput /tmp/tp2 2 32; log "2-GPU throughput rc=$?"
fi

log "phase 4: report"
moba-jax report "$G" > "$L/report.log" 2>&1; log "report rc=$?"
cp "$G"/results.* "$G"/loss_vs_layers.png "$RES"/ 2>/dev/null
cp "$RES/phases.log" "$L/"
tar czf "$RES/runs.tgz" --exclude=checkpoints --exclude=jax_cache "$G" /tmp/tp1 /tmp/tp2 "$L" \
  2>/dev/null
log "done"
cat "$L/report.log"
