#!/bin/bash
# One H200 session step: correctness check + benchmarks, logs under $OUT (see docs/benchmarks.md).
# usage: bash tools/run_h200.sh PHASE [TILES...]
#   1: check + 8K/32K table (pallas_gpu, cudnn, xla) + 128K table, then a tile sweep at 32K
#   3: check + breakdown (with the jax-triton forward side by side) + the full table (pallas_gpu
#      default tiles, cudnn)
#   2: check + breakdown + tile sweep at 32K, then the full table with the fastest tiles
#   4: (removed: the fused-dQ backward it timed is gone, see docs/kernel_notes.md)
#   33, 34: (run 23: the fused dQ, measured and not landed; these phases are in
#       docs/results/h200_2026-12-03_run23/fused_dq.patch with the code they ran)
#   6: check, 8K/32K/128K b512 k3 table (default tiles), 32K tile sweep over TILES, profiles at
#      PROFILE_SEQS (default 32768)
#   5: per-kernel profiles of the fwd+bwd step (tools/profile_gpu.py), default tiles [and TILES]
#   7: check (the compiled suite, decode included) + the full table with ratios to cuDNN and the
#      floor (pallas_gpu, cudnn) + the decode table (attention and whole model)
#   8: the compiled suite (slow cases included) as SHARDS processes side by side
#   10: the compiled suite without the slow cases (6 shards), then the decode gate / step timing
#       (tools/decode_sweep.py, default tiles) and the Mosaic GPU probe (tools/mgpu_probe.py)
#   12: the Mosaic GPU kernels' compiled check with every case reported (-rA; each kernel alone on
#       the case that failed in run 15e), then the opt-in Mosaic tiles at the default bench shapes
#   13: three side-by-side processes: the compiled test_mosaic.py (-rA), its benchmark-scale cases
#       (Mosaic against Triton), and the ptxas report (registers, spills) of the ragged d128 cases
#   14: the compiled suite with the Hopper default (the Mosaic kernels): test_moba, test_kernels,
#       test_attention_api as 6 shards and test_mosaic as 3, side by side; logs in $OUT/logs.tgz
#   15: the default table with ratios to cuDNN and the floor (pallas_gpu, cudnn), as in phase 7
#   16: the slow compiled checks of the Hopper default (benchmark shapes, gate, lowering), then
#       per-kernel profiles at 16K block 128 top-8 and 8K block 512 top-3: default tiles against
#       the Triton dK/dV
#   17: the compiled rechecks after run 16: the slow benchmark-shapes test (2 shards), the Triton
#       lowering test, the gate's near tie and the Mosaic query-offset cases, side by side
#   18: A/B of the persistent kernels' item order: per-kernel profiles (8K b512 k3, 16K b128 k8,
#       32K b512 k3) of this tree, then of the tree in $BAL (installed over it), then BAL's table
#   19: the compiled test_mosaic.py as 3 shards side by side (-rA)
#   20: per-kernel profiles with the GPU's idle gaps inside the step (8K b512 k3, 16K b128 k8,
#       32K b512 k3), default tiles
#   21: idle gaps at 8K b512 k3 and 16K b128 k8 (tools/profile_gpu.py), the back-to-back table
#       (--pipeline 8) at 8K/16K b128 k8/32K, then test_mosaic's first third (--shard 0/3) compiled
#       as two processes
#   22: the default table (as phase 15), the peak buffers of XLA's plan (tools/memory_gpu.py) at
#       8K b512 k3 and 16K b128 k8, 8K b512 k3 synced with XLA's command buffers on against off,
#       then per-kernel profiles with idle gaps (as phase 20)
#   23: the memory plans of pallas_gpu (tools/memory_gpu.py) at 8K b512 k3 and 16K b128 k8 (or
#       MEM_SPECS, e.g. "8192:512:3 131072:4096:12"), the
#       default table (as phase 15), then the back-to-back table (--pipeline 8) at 8K, 16K b128 k8
#       and 32K
#   24: the compiled test_mosaic.py (3 shards) beside the no-segment-ids, row-count and bf16
#       gradient checks of test_kernels.py and test_moba.py
#   25: mosaic_bwd_chunks (the 11th tiles field; since run 19c mosaic_head_chunks, which splits the
#       forward too): memory plans (tools/memory_gpu.py) and fwd+bwd times, synced and back
#       to back, with N = 1, 2, 4 at 8K b512 k3 and N = 1, 4, 8 at 16K b128 k8
#   26: head chunks two ways (tools/head_chunks_gpu.py: the whole attention under lax.map against
#       mosaic_bwd_chunks) at 8K b512 k3 (1, 2, 4 chunks) and 16K b128 k8 (1, 4, 8), then
#       per-kernel profiles at 8K b512 k3 with mosaic_bwd_chunks 1 and 2
#   27: the compiled test_mosaic.py (3 shards) beside the no-segment-ids, row-count and bf16
#       gradient checks (as phase 24, shorter limits)
#   28: mosaic_head_chunks (forward and backward; tools/head_chunks_gpu.py) at 8K b512 k3 (2
#       chunks) and 16K b128 k8 (4, 8), 128K b4096 k12 in 4 chunks both ways, then the default
#       rows at 32K and 128K b512 k3 (pallas_gpu)
#   29: phase 28's head-chunk measurements without the default rows, then phase 27's compiled
#       tests (limit TEST_S, default 300 s)
#   30: a short compiled check (test_mosaic's head-chunk and in-place cases beside the
#       no-segment-ids checks), then mosaic_head_chunks at 8K b512 k3 (2 chunks), 16K b128 k8 (4)
#       and 128K b4096 k12 (4, both ways: lax.map's and the kernels' own)
#   31: A/B of the kernels' wgmma schedule (run 20): per-kernel profiles (8K b512 k3, 16K b128 k8,
#       32K b512 k3) of the tree in $BASE, then of this tree (installed last), then the compiled
#       test_mosaic.py as 6 shards side by side (limit TEST_S; in run 20a it ran as phase 19's 3
#       shards, which did not finish in 230 s); the shard logs come back as mosaic_logs.tgz
#   32: phase 31 behind a first check: the row-gather test and each kernel alone (the ragged GQA
#       cases, compiled, side by side, limit FIRST_S, default 150 s: a hang names its kernel);
#       the A/B and the shards run only if all four passed
#   35: (run 24: dQ added by the dQ kernel, measured and not landed; the phase is in
#       docs/results/h200_2026-12-03_run24/dq_add.patch with the code it ran)
#   36: per tiles spec in TILES ("-": the default), the memory plan (tools/memory_gpu.py) and
#       the synced fwd+bwd (moba-jax bench, pallas_gpu) at SPEC (default 16384:128:8)
#   37: the default after run 24 (kv heads split past 4 selected blocks a query): per-kernel
#       profiles with the top 40 kernels at PROFILE_SPECS (default "16384:128:8 8192:512:3"),
#       phase 36 at 16K b128 k8 (memory plan, synced fwd+bwd), then the back-to-back table
#       (--pipeline 8) at 8K, 16K and 32K, blocks 512 top-3 and 128 top-8
#   38: A/B of the loop-free step (run 25: no `while` outside the kernels): the synced table
#       (pallas_gpu, 8K and 16K, blocks 512 top-3 and 128 top-8) of the tree in $BASE, then of
#       this tree; then per-kernel profiles with the host's share of each synced call
#       (tools/profile_gpu.py --host) at PROFILE_SPECS (default "8192:512:3 16384:128:8") of
#       BASE, this tree and cuDNN, and at 32K b512 k3 of this tree and cuDNN
#   39: phase 38's A/B table with REPEATS (default 30) synced calls a row, then per-kernel
#       profiles naming each kernel's source line (tools/profile_gpu.py --sources --host) of this
#       tree at SOURCE_SPECS (default "8192:512:3 16384:128:8 32768:512:3"), top 60
#   40: A/B of the routing's one flat sort (run 25): a compiled check first (the flat sort
#       against per-row sorts at scale, the oracle cases of every Mosaic kernel, the 8K and 16K
#       benchmark-scale cases; side by side, limit FIRST_S, default 150 s), then per-kernel
#       profiles with the host's share (8K b512 k3, 16K b128 k8 of BASE and this tree, 32K of
#       this tree), then the synced rows (REPEATS, default 30) at 8K b512 k3 and 16K b128 k8 and
#       the back-to-back row at 16K b128 k8, BASE and this tree
#   41: four oracle cases of the three Mosaic kernels compiled (documents, two batch rows, wrapping
#       rings, the Triton fallback; two processes side by side, limit TEST_S, default 200 s), then the synced rows at 32K and 128K b512 k3 and 128K b4096 k12
#       and the back-to-back row at 8K b512 k3 (pallas_gpu)
#   42: per-kernel profiles naming each kernel's source line at 8K, 32K and 128K b512 k3 (this
#       tree, SOURCE_SPECS); the synced rows (REPEATS, default 30) at 8K/32K b512 k3 and 8K/16K
#       b128 k8 of this tree with `_routing.FLAT_SORT_MIN_KEYS` at each of FLAT_MINS (default
#       "0 off": 0 sorts flat always, off never); then 8K b512 k3 back to back and 128K b4096 k12
#       synced (this tree as it is)
#   43: the gate kernel (run 26, kernels/moba_gate.py): a compiled check first (the gate and
#       routing tests of test_kernels.py, the Mosaic benchmark-scale cases at 8K and 16K, two
#       float32-oracle cases; side by side, limit FIRST_S, default 170 s), per-kernel profiles of
#       this tree at PROFILE_SPECS (default 8K, 32K, 128K b512 k3 and 16K b128 k8), then the
#       synced rows (REPEATS, default 30) of _nogate (this tree with XLA's gate) and this tree at
#       8K/32K b512 k3 and 16K b128 k8, and 128K b512 k3 (10 repeats) of this tree
#   44: the back-to-back rows (--pipeline 8) at 8K and 32K b512 k3 and 16K b128 k8, then 128K
#       b4096 k12 synced (pallas_gpu, this tree)
#   45: the compiled gate checks after run 26's shared kernel body (test_kernels.py -k gate,
#       test_mosaic's 8K benchmark-scale case; side by side, limit FIRST_S, default 120 s), then
#       the synced rows at 32K and 128K b512 k3 (pallas_gpu)
#   46: packed documents on the fast path (run 27: the gate kernel for any documents, the Mosaic
#       dK/dV's masked groups): a compiled check first (the gate tests of test_kernels.py, the
#       Mosaic float32-oracle and query-offset cases with documents, the 32K GQA d64 documents
#       benchmark-scale case; side by side, limit FIRST_S, default 170 s), then the synced rows
#       (REPEATS, default 20) of the tree in $BASE (its bench.py replaced by this tree's, for
#       --docs) and of this tree: DOCS_SPECS (default 8K and 32K b512 k3 with 8 and 16
#       documents, 16K b128 k8 with 8, 32K GQA 16/2 head_dim 64 with 16) and the one-document
#       rows at 8K and 32K b512 k3
#   47: the compiled test_mosaic.py as 3 shards side by side (limit TEST_S, default 220 s; logs
#       in mosaic_logs.tgz), then per-kernel profiles naming source lines of packed documents at
#       DOCS_PROFILES (default 32K b512 k3 and 16K b128 k8, 16 and 8 documents)
#   48: the compiled test_mosaic.py as 7 shards beside test_kernels.py's no-segment-ids and gate
#       checks, slow cases included (limit TEST_S, default 300 s; logs in mosaic_logs.tgz and
#       kernels_logs.tgz)
#   49: packed documents split by kv-head chunks like single ones (run 27): the synced rows with
#       memory (REPEATS, default 20) at 16K b128 k8 with 8 documents, 8K and 32K b512 k3 with 8
#       and 32K with 16 (this tree), then the compiled chunk and split tests of test_mosaic.py
#   50: A/B of the Mosaic forward's softmax (run 28: the scale folded into each probability's
#       fused multiply-add, one division a row in the epilogue): a compiled check (oracle and
#       benchmark-scale cases of test_mosaic.py, limit FIRST_S, default 170 s), then per-kernel
#       profiles at PROFILE_SPECS (default 32K b512 k3 and 128K b4096 k12) of BASE and this tree.
#       (Run 28 also timed FA3's ping-pong of the forward's warpgroups here, with the tree of
#       docs/results/h200_2026-12-04_run28/forward_turns.patch: not landed.)
#   51: the compiled test_mosaic.py as 6 shards beside test_kernels.py's gate and
#       no-segment-ids checks (limit TEST_S, default 270 s; logs in mosaic_logs.tgz), then the
#       synced rows (pallas_gpu, REPEATS, default 20) at the issue's shapes: 8K, 32K, 128K b512 k3,
#       16K b128 k8, 128K b4096 k12 (5 repeats at 128K)
#   52: run 29: the ptxas report (registers, spills, wgmma serialization) of the Mosaic kernels of
#       BASE, this tree and OVL (a third tree, optional), each from one compiled oracle case
#       (all_ragged_gqa_d128: forward, dQ and dK/dV at head_dim 128) side by side with a compiled
#       check of this tree (limit FIRST_S, default 170 s), then per-kernel profiles of BASE and
#       this tree at PROFILE_SPECS (default 32K b512 k3 and 128K b4096 k12), then (unless NO_GLUE)
#       this tree's 128K b4096 k12 step by source line (GLUE_TOP, default 45 rows) and its
#       optimized HLO (step_hlo.txt.gz)
#   53: run 29: the compiled test_mosaic.py as 6 shards beside test_kernels.py's gate and
#       no-segment-ids checks (limit TEST_S, default 240 s; logs in mosaic_logs.tgz), the synced
#       128K b4096 k12 row (REPEATS, default 5), then per-kernel profiles of this tree at
#       OVERLAP_SPECS (default 16K b1024 k2 and b2048 k3) with the forward's overlap at every
#       block size and at none (BlockSizes.mosaic_overlap_block 0 and 1<<20)
#   54: run 30: the compiled test_mosaic.py as SHARDS (default 8) shards (MEM, default 0.09 of
#       the GPU's memory each; run 30 ran 10 at 0.08 and ran out of memory) beside test_kernels.py's gate and no-segment-ids checks, and the
#       ptxas report of the cases PTXAS_K selects (limit TEST_S, default 240 s; logs in
#       mosaic_logs.tgz), then per-kernel profiles of BASE and this tree at PROFILE_SPECS, then
#       this tree's at FORCED_SPECS with --gpu-block-sizes FORCED_SIZES (e.g. the overlap forced
#       on at block 512)
#   55: run 31: for each tree of TREES (default "."), installed in turn: the ptxas report of its
#       kernels (registers, spills, serialized wgmma) compiled at the first of PROFILE_SPECS, and
#       its per-kernel profiles at PROFILE_SPECS (default 32K b512 k3 and 128K b4096 k12); this
#       tree installed last
#   56: run 31's landing: the compiled test_mosaic.py as SHARDS (default 8) shards at MEM (default
#       0.09; limit TEST_S, default 200 s) beside test_kernels.py's gate and no-segment-ids checks,
#       then phase 55 (TREES, PROFILE_SPECS), then the synced 32K b512 k3 (REPEATS, default 20) and
#       128K b4096 k12 (5) rows of this tree
#   57: Nsight Compute on the three Mosaic kernels of one fwd+bwd step at each of NCU_SPECS
#       (seq:block:topk, default 32K b512 k3): speed of light, warp states (stall reasons: local
#       memory of spills, waits on wgmma, barriers), scheduler and instruction statistics, with
#       --clock-control none (METHOD.md); reports as ncu_*.txt (KINDS.md: the counters read on
#       Firecracker machines, not on gVisor)
#   58: power and clocks during the 128K b4096 k12 step: `nvidia-smi --query-gpu` every 100 ms
#       (power draw, SM and memory clocks, temperature, the active clock-event reasons: power
#       cap, thermal; read only) beside the synced bench (REPEATS, default 20) of each tree of
#       TREES (default "."), installed in turn (power_<tree>.csv), after the card's power limits
#       (`nvidia-smi -q -d POWER`)
#   59: the table's rows after a kernel change: the synced fwd+bwd of every target shape (8K and
#       32K b512 k3, 16K b128 k8, 128K b512 k3: REPEATS, default 20; 128K b4096 k12: 10) and 8K
#       back to back (table.txt), 32K b512 k3 and 16K b128 k8 profiles with the host's share
#       and every gap between kernels kept (prof32k.txt, prof16k.txt), then tools/mgpu_trace.py
#       at TRACE_SPECS
#       (seq:block:topk[:regions], default 8K b512 k3 with every region and 16K b128 k8 with the
#       epilogue's parts only, which fit its 68 tiles a CTA in 256 ranges; trace_<seq>.txt, the
#       8K traces in tr8k.tgz), last 128K b512 k3's 60 largest kernels (appended to prof32k.txt)
#   60: the gate kernel alone at each program shape of GATE_TILES (bt:bn:num_warps:num_stages,
#       default tools/gate_sweep.py's ten) and spec of GATE_SPECS (seq:block:topk, default the
#       five target shapes): ms of a call back to back, ratio to the first tiles, choices
#       differing from its (gate.txt; limit STEP_S, default 240 s)
#   61: the host's share of a synced call: pallas_gpu and cuDNN at 8K b512 k3 and 16K b128 k8,
#       synced and back to back, under XLA's default and with its command buffers off
#       (XLA_FLAGS=--xla_gpu_enable_command_buffer=; run 18 saw no effect, with a cond in the
#       step then; run 25's trace: 0.47-0.50 ms before the first kernel, command-buffer update
#       and graph launch); hostshare.txt
#   62: XLA's command buffers per program (run 37): bench's rows with `--xla-option
#       xla_gpu_enable_command_buffer=` (this program's compile option, not XLA_FLAGS) and
#       without, in turn: synced 8K b512 k3 (pallas_gpu, cuDNN), 32K b512 k3, 16K b128 k8, with
#       LONG set 128K b512 k3 (REPEATS, default 20; 10 at 128K), 8K back to back; then again the
#       synced 8K rows (A B A B: the drift of one machine; cmdbuf.txt)
#   63: XLA's command-buffer options per program (`--xla-option`; each row's outputs are also
#       checked against XLA's defaults, bench exits 1 on a difference): synced fwd+bwd at 8K b512
#       k3 and 16K b128 k8 (CB_SPECS, seq:block:topk; REPEATS, default 20) under each of
#       CB_OPTIONS (';'-separated sets of space-separated NAME=VALUE, '-' for XLA's defaults;
#       default: defaults, command buffers off, the update modes SKIP_TEMP and SKIP_PROFILED,
#       scheduling CONCURRENT, and XLA's own sort kernels for the routing's flat sort instead of
#       CUB's, which runs between the step's two graphs: run 38), PASSES times in turn (default
#       1; about 30 s a row: 6 sets x 2 shapes ~6 min) (cbopts.txt; the names and values jax
#       0.11.2's XLA accepts, checked on the CPU in runs 37 and 38)
#   64: run 38's in-place dK/dV of the kv-head chunks (the dK/dV kernel writes each chunk's heads
#       into the whole gradients: no pad or update assembles them): a compiled check first
#       (test_mosaic.py's head-chunk cases, four float32-oracle cases, the benchmark-scale cases
#       at 16K b128 k8 and 32K b4096 k12, which run by chunks; limit FIRST_S, default 240 s),
#       then for BASE (the tree before it) and this tree, installed in turn: the 16K b128 k8
#       step's kernels with the host's share (prof16k_<tree>.txt) and its synced row (REPEATS,
#       default 20; table.txt)
#   65: phase 64 and run 38's release_early variant (VARIANT: main with it) in one call: compiled
#       checks side by side, each limited to FIRST_S (default 210 s) at a fifth of the GPU's
#       memory (this tree's head-chunk cases; its float32-oracle and benchmark-scale subset; the
#       variant's row-tile cases, in its own tree; the variant's 8K and 16K benchmark-scale
#       cases), then the 16K b128 k8 profile with the host's share and synced row of BASE, this
#       tree and VARIANT in turn (prof16k_<tree>.txt, table.txt), then, time left, 32K b512 k3
#       profiles of this tree and VARIANT (prof32k_<tree>.txt). Run 40 ran 64 and 65 on an H100:
#       docs/results/h100_2026-12-05_run40/ (the in-place dK/dV landed, the variant did not)
#   66: a row-tile kernel variant (VARIANT: main with it) against this tree: its compiled checks
#       side by side (every float32-oracle and overlap case of test_mosaic.py; the benchmark-scale
#       cases at 8K, 16K and the d64 documents), each limited to FIRST_S (default 210 s), then
#       the 16K b128 k8 profile with the host's share and synced row of this tree and VARIANT
#       (prof16k_<tree>.txt, table.txt), 32K b512 k3 profiles (prof32k_<tree>.txt), then, time
#       left, both trees' epilogue regions at 16K b128 k8 (tools/mgpu_trace.py; trace_<tree>.txt).
#       Run 41: the forward and dQ storing their rows from registers (direct_store.patch)
#   67: the compiled behavioural suite apart from test_mosaic.py (phase 48 runs that): every
#       test file that reads `--compiled`, slow cases included (`-m ""`), as SHARDS (default 10)
#       processes side by side at MEM (default 0.09) of the GPU each, limit TEST_S (default 480
#       s); each shard's last line and every failure in the log, the logs (and the host's load)
#       in suite_logs.tgz, the tests no shard finished in suite_not_run.txt (IDS for phase 69);
#       with SHARD_FROM/SHARD_TO only shards [from, to) of SHARDS (run 45: SHARDS=16 in two
#       calls; run 46, an H100, after the float32 tiles: 10 shards reached 419 of 443 tests in
#       450 s, the host compile-bound)
#   68: phases 48 and 67 in one call: test_mosaic.py and the rest of the compiled suite (slow
#       cases included), SHARDS (default 7) processes each side by side, each at MEM (default
#       0.06: 8.4 GB of an H200's 141) of the GPU and limited to TEST_S (default 480 s; logs in
#       mosaic_logs.tgz and suite_logs.tgz). Too much for one call: run 42 (an H100, TEST_S=480)
#       finished 4 of the 7 test_mosaic.py shards and none of the rest's (about 37 of each
#       shard's 54 tests had run); run 48 and 67 in two calls
#   69: the pytest node ids listed in IDS (one a line, required: e.g. the suite_not_run.txt
#       phase 67 writes; run 47 passed docs/results/h100_2026-12-06_run47/ids.txt, run 46's 24
#       unreached tests and 24 more), compiled as SHARDS (default 8) processes at MEM (default
#       0.1) of the GPU, limit TEST_S (default 480 s)
#   70: (run 47: the sparse pairs' places by a counting sort instead of CUB's, measured on an
#       H100 and not landed; the phase is in docs/results/h100_2026-12-06_run47/count_places.patch
#       with the code it ran)
#   71: the settings issue 14 says it will measure beyond its targets (GQA groups 1-8, head_dim
#       64 and 128, packed documents, batch rows, other blocks and lengths): pallas_gpu beside
#       cuDNN, synced fwd+bwd (REPEATS, default 10), one bench call per spec of OTHER_SPECS
#       (seq:block:topk:heads:kv_heads:head_dim:docs:batch; default the twelve below) in
#       other.txt, each call limited to BENCH_S (default 120 s)
#   72: A/B of run 48's two dK/dV changes at GQA shapes: the dK/dV over every kv head in one call
#       (the kv-head chunks split only the forward and the dQ) and the longest key tiles split into
#       pieces (`mosaic_dkdv_split=1`, the tiles' 13th field, SPLIT_TILES). tools/dkdv_balance.py
#       predicts the dK/dV's busiest CTA at 16K b128 k8: one call -6.5% (16/16 heads), -39%
#       (16/2), -37% (16/4); split, of what is left, -50% (16/2), -27% (16/4), 32K b512 k3 16/2
#       -28%. A compiled check first (test_mosaic.py's head-chunk, split and 16K benchmark-scale
#       cases; limit FIRST_S, default 240 s), then synced rows with XLA's memory plan (REPEATS,
#       default 20; table.txt) in turn while the call is younger than 540 s: BASE (the tree
#       before both), this tree, this tree split, at 16K b128 k8 with 2 and 16 kv heads; 16K 4 kv
#       heads and 32K b512 k3 2 kv heads, this tree and split; cuDNN beside the first of each
#       shape; then per-kernel profiles at 16K b128 k8 with 2 kv heads of this tree whole and
#       split (prof16k_gqa8_<whole|split>.txt)
#   11: the Mosaic GPU forward (tests/test_mosaic.py compiled), then pallas_gpu at SEQS x CONFIGS
#       with the default tiles and each of TILES (kernel_notes.md: "The Mosaic GPU forward")
set -o pipefail
phase=${1:-1}; shift
# a phase that is not here (a removed one, a typo) is said at once, not a silent empty call
[[ $phase =~ ^[0-9]+$ ]] && grep -q "\"\$phase\" = $phase \]" "$0" \
  || { echo "run_h200.sh: no phase $phase here (the header lists them)" >&2; exit 2; }
bench() { timeout "${STEP_S:-150}" python3 -m moba_jax.cli bench "$@"; }
# correctness on this GPU: the behavioural suite with the kernels compiled, slow cases included
check() { timeout "${STEP_S:-150}" python3 -m pytest -q --compiled -m "" -p no:cacheprovider \
  tests/test_moba.py tests/test_kernels.py ${CHECK_EXTRA:-} 2>&1 | tail -15 > "$OUT/check.txt"; cat "$OUT/check.txt"; }
# installs the tree $1 (editable, no dependencies): the one `moba_jax` the next commands import
install() { (cd $1 && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .); }
# a compiled check started in the background: first NAME LIMIT MEM_FRACTION K TEST_FILE... (FIRST_S
# overrides LIMIT); first_report NAME... waits for them, logs each one's last lines, tars the logs
first() { local name=$1 limit=${FIRST_S:-$2} mem=$3 k=$4; shift 4
  XLA_PYTHON_CLIENT_MEM_FRACTION=$mem timeout "$limit" python3 -m pytest -q -rfEs -W ignore \
    --compiled -p no:cacheprovider -k "$k" "$@" > $OUT/first_$name.txt 2>&1
  echo "exit $?" >> $OUT/first_$name.txt; }
first_report() { wait; for f in "$@"; do echo "$f: $(tail -n 2 $OUT/first_$f.txt | tr '\n' ' ')"; done \
    | tee -a $log; (cd $OUT && tar czf first_logs.tgz first_*.txt && rm first_*.txt); }
# per-kernel profiles (8K b512 k3, 16K b128 k8, 32K b512 k3) of each tree in turn, each installed
# before its profiles (the last one stays installed): ab_profiles TOP TREE...
ab_profiles() { local top=$1; shift; for tree in "$@"; do
    name=$(basename $(cd $tree && pwd))
    (cd $tree && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .)
    for spec in "8192 512 3" "16384 128 8" "32768 512 3"; do set -- $spec
      echo "== $name seq $1 block $2 topk $3" | tee -a $OUT/profiles.txt
      (cd $tree && timeout 100 python3 tools/profile_gpu.py --seq $1 --block $2 --topk $3 \
        --top $top 2>&1 | grep -v "WARNING\|device lines" | tee -a $OUT/profiles.txt)
    done
  done; }
log=$OUT/log.txt
# per-kernel profiles named NAME at PROFILE_SPECS (seq:block:topk, default 32K b512 k3 and 128K
# b4096 k12) of the installed tree: prof NAME
prof() { for spec in ${PROFILE_SPECS:-32768:512:3 131072:4096:12}; do IFS=: read s b t <<< "$spec"
    echo "== $1 seq $s block $b topk $t ${PROF_SIZES:-}" | tee -a $OUT/profiles.txt
    timeout 150 python3 tools/profile_gpu.py --seq $s --block $b --topk $t --steps 3 --top 14 \
      ${PROF_SIZES:+--gpu-block-sizes $PROF_SIZES} 2>&1 | grep -v "WARNING\|device lines" \
      | tee -a $OUT/profiles.txt
  done; }
# for each tree of TREES (default "."), installed in turn: the ptxas report of its kernels
# compiled at the first of PROFILE_SPECS (ptxas.txt) and its per-kernel profiles at PROFILE_SPECS
# (default 32K b512 k3 and 128K b4096 k12); this tree installed last: tree_profiles
tree_profiles() { for tree in ${TREES:-.}; do local name=$(basename $(cd $tree && pwd)) dump=1
    install $tree
    for spec in ${PROFILE_SPECS:-32768:512:3 131072:4096:12}; do IFS=: read s b t <<< "$spec"
      echo "== $name seq $s block $b topk $t" | tee -a $OUT/profiles.txt
      (cd $tree && ${dump:+env MOSAIC_GPU_DUMP_PTXAS=1} timeout 150 python3 tools/profile_gpu.py \
        --seq $s --block $b --topk $t --steps 3 --top 8 > $OUT/one.txt 2>&1)
      [ -n "$dump" ] && { echo "== $name ptxas at seq $s block $b topk $t"
        grep -iE "Function properties for|spill|Used [0-9]+ registers|serializ" $OUT/one.txt
        } | tee -a $OUT/ptxas.txt
      grep -v "WARNING\|device lines\|ptxas\|^  gap\|bytes stack\|^Compiling\|^Function" \
        $OUT/one.txt | tail -n 12 | tee -a $OUT/profiles.txt
      dump=""
    done
  done
  rm -f $OUT/one.txt; install .; }
# each tree in turn, installed: its 16K b128 k8 step's kernels with the host's share
# (prof16k_<tree>.txt) and its synced row (REPEATS, default 20; table.txt): rows16k TREE...
rows16k() { for tree in "$@"; do install $tree; local name=$(basename $(cd $tree && pwd))
    (cd $tree && timeout 100 python3 tools/profile_gpu.py --seq 16384 --block 128 --topk 8 \
      --steps 5 --top 30 --host 12 2>&1 | grep -v "WARNING\|device lines" > $OUT/prof16k_$name.txt)
    grep -v "^  gap" $OUT/prof16k_$name.txt | head -n 12 | tee -a $log
    STEP_S=100 bench --impls pallas_gpu --seqs 16384 --configs 128:8 --repeats ${REPEATS:-20} \
      2>&1 | grep "^pallas_gpu" | sed "s/^/$name: /" | tee -a $OUT/table.txt
  done; }
# 32K b512 k3 profiles of each tree in turn, each installed before its profile, while the call
# is younger than LIMIT seconds (prof32k_<tree>.txt): prof32k_trees LIMIT TREE...
prof32k_trees() { local limit=$1; shift; for tree in "$@"; do [ $SECONDS -lt $limit ] || break
    install $tree; local name=$(basename $(cd $tree && pwd))
    (cd $tree && timeout 80 python3 tools/profile_gpu.py --seq 32768 --block 512 --topk 3 \
      --steps 5 --top 12 2>&1 | grep -v "WARNING\|device lines" > $OUT/prof32k_$name.txt)
    grep -v "^  gap" $OUT/prof32k_$name.txt | head -n 8 | tee -a $log
  done; }
# the compiled test_mosaic.py as SHARDS (default 6) shards beside test_kernels.py's gate and
# no-segment-ids checks, each limited to TEST_S (default: $1 s); with PTXAS_K, one more process
# runs the test_mosaic.py cases it selects with MOSAIC_GPU_DUMP_PTXAS=1 (ptxas_new.txt, its
# registers, spills and warnings in the log); logs in mosaic_logs.tgz
mosaic_suite() { local n=${SHARDS:-6} mem=${MEM:-0.12}
  # each process preallocates MEM of the GPU; CUDA contexts, cuBLAS and XLA's autotuning need
  # the rest (run 30: 9 processes at 0.1 ran, 12 at 0.08 ran out of memory outside the kernels)
  local procs=$((n + 1)); [ -n "${PTXAS_K:-}" ] && procs=$((procs + 1))
  python3 -c "import sys; sys.exit(int(sys.argv[1]) * float(sys.argv[2]) > 0.92)" $procs $mem \
    || { echo "mosaic_suite: $procs processes x MEM=$mem exceed 0.92 of the GPU" | tee -a $log
         return 2; }
  t() { XLA_PYTHON_CLIENT_MEM_FRACTION=$mem timeout "${TEST_S:-$1}" python3 -m pytest -q -rfEs \
    -W ignore --compiled -p no:cacheprovider "${@:2}"; }
  for ((i = 0; i < n; i++)); do t $1 --shard $i/$n tests/test_mosaic.py > $OUT/mosaic$i.txt 2>&1 &
  done
  t $1 -k "gate or no_segment_ids" tests/test_kernels.py > $OUT/mosaic$n.txt 2>&1 &
  [ -n "${PTXAS_K:-}" ] && { MOSAIC_GPU_DUMP_PTXAS=1 t $1 -s -k "$PTXAS_K" tests/test_mosaic.py \
    > $OUT/ptxas_new.txt 2>&1 & }
  wait
  for ((i = 0; i <= n; i++)); do echo "$i: $(tail -n 1 $OUT/mosaic$i.txt)"; done | tee -a $log
  grep -h "^FAILED\|^ERROR" $OUT/mosaic*.txt | tee -a $log
  [ -f $OUT/ptxas_new.txt ] && { echo "== ptxas: $(tail -n 1 $OUT/ptxas_new.txt)"
    grep -iE "spill|registers|serializ|Performance|warning" $OUT/ptxas_new.txt | sort | uniq -c \
      | head -30; } | tee -a $log
  # one file for the logs (at most 8 files come back; run 30's third call lost its table to
  # a tar that failed on a missing ptxas log and left the logs in place)
  (cd $OUT && logs=$(ls mosaic[0-9]*.txt ptxas_*.txt 2>/dev/null); tar czf mosaic_logs.tgz \
    $logs && rm -f $logs); }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.used,temperature.gpu --format=csv | tee -a $log
python3 -c "import jax, jax_triton; print(jax.__version__, jax.devices())" 2>&1 | tee -a $log
if [ "$phase" = 1 ]; then
  STEP_S=100 check 2>&1 | tee -a $log
  bench --seqs 8192,32768 --configs 512:3 --impls pallas_gpu,cudnn,xla --json $OUT/b1.json 2>&1 | tee -a $log
  STEP_S=120 bench --seqs 131072 --impls pallas_gpu,cudnn --repeats 5 --json $OUT/b128.json 2>&1 | tee -a $log
fi
if [ "$phase" = 2 ]; then
  STEP_S=80 check 2>&1 | tee -a $log
  STEP_S=100 bench --breakdown --seqs 8192,32768,131072 --configs 512:3 --gpu-block-sizes ${1:-64,64,64,64,4,2} --repeats 10 2>&1 | tee -a $log
fi
if [ "$phase" -le 2 ]; then
  for s in "$@"; do
    STEP_S=60 bench --seqs 32768 --configs 512:3 --impls pallas_gpu --gpu-block-sizes $s --repeats 10 2>&1 | tee -a $OUT/tune.txt
  done
fi
if [ "$phase" = 3 ]; then
  STEP_S=80 check 2>&1 | tee -a $log
  STEP_S=200 bench --breakdown --seqs 8192,32768,131072 --configs 512:3 --repeats 10 --json $OUT/breakdown.json 2>&1 | tee -a $log
  STEP_S=250 bench --impls pallas_gpu,cudnn --repeats 10 --json $OUT/table.json 2>&1 | tee -a $log
fi
if [ "$phase" = 2 ]; then
  best=$(grep '^{' $OUT/tune.txt | python3 -c "import sys,json; r=[json.loads(l) for l in sys.stdin]; r=[x for x in r if 'fwdbwd_ms' in x]; print(min(r,key=lambda x:x['fwdbwd_ms'])['sizes'])")
  echo "best tiles: $best" | tee -a $log
  STEP_S=200 bench --impls pallas_gpu,cudnn --gpu-block-sizes $best --repeats 10 --json $OUT/table.json 2>&1 | tee -a $log
fi
if [ "$phase" = 5 ]; then
  for seq in 8192 32768 131072; do
    for t in default "$@"; do
      extra=""; [ "$t" != default ] && extra="--gpu-block-sizes $t"
      timeout 120 python3 tools/profile_gpu.py --seq $seq $extra --out $OUT/trace_${seq}_${t//,/_} 2>&1 | grep -v "^WARNING" | tee -a $OUT/profile.txt
    done
  done
  find $OUT -name '*.json.gz' ! -name 'perfetto_trace.json.gz' -delete
fi
if [ "$phase" = 6 ]; then
  STEP_S=150 check 2>&1 | tee -a $log
  STEP_S=150 bench --impls pallas_gpu --seqs 8192,32768,131072 --configs 512:3 --repeats 10 --json $OUT/table.json 2>&1 | grep -v "^WARNING" | tee -a $log
  for t in "$@"; do
    STEP_S=60 bench --impls pallas_gpu --seqs 32768 --configs 512:3 --gpu-block-sizes $t --repeats 10 2>&1 | grep '^{' | tee -a $OUT/tune.txt
  done
  for seq in ${PROFILE_SEQS:-32768}; do
    timeout 120 python3 tools/profile_gpu.py --seq $seq --out $OUT/trace_$seq 2>&1 | grep -v "^WARNING" | tee -a $OUT/profile.txt
  done
  find $OUT -name '*.json.gz' ! -name 'perfetto_trace.json.gz' -delete
fi
# the compiled suite in shards side by side (compilation is CPU-bound), each at MEM of the GPU and limited to TEST_S
# (default 480 s): shards NAME N MEM PYTEST_ARGS... (logs $OUT/NAME<i>.txt, then NAME_logs.tgz;
# each shard's last line and every failure in the log)
shards() { local name=$1 n=$2 mem=$3; shift 3; local i from=${SHARD_FROM:-0} to=${SHARD_TO:-$n} pids=()
  # SHARD_FROM/SHARD_TO: shards [from, to) of n only (a suite too long for one call, in two);
  # the shards balanced by SHARD_TIMES (default tools/compiled_test_times.json: runs 46-47's H100
  # and run 48's H200 durations, tools/test_times.py; a test it lacks counts its default_s)
  local times=${SHARD_TIMES:-tools/compiled_test_times.json}
  ((to > n)) && to=$n  # e.g. phase 48's one kernels shard beside SHARD_TO=7
  # the machine's load every 20 s beside the shards (is compilation CPU-bound at this width?)
  (while sleep 20; do echo "$(date +%T) $(cut -d' ' -f1-3 /proc/loadavg) $(nvidia-smi \
    --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null)"; done) \
    > $OUT/${name}load.txt 2>&1 & local sampler=$!
  for ((i = from; i < to; i++)); do
    # SIGINT at the limit: pytest stops and prints its summary once the compile it is in returns
    # (run 42: one shard of seven did within 30 s); --failures-now keeps each failure's report
    # in the log as it happens
    XLA_PYTHON_CLIENT_MEM_FRACTION=$mem timeout -s INT -k 30 "${TEST_S:-480}" python3 -m pytest -q -rfEs \
      --failures-now -W ignore --durations=0 --durations-min=5 --compiled -m "" \
      -p no:cacheprovider --shard $i/$n --shard-times "$times" \
      --not-run-file $OUT/$name$i.notrun "$@" > $OUT/$name$i.txt 2>&1 &
    pids+=($!)
  done
  [ ${#pids[@]} = 0 ] || wait "${pids[@]}"; kill $sampler 2>/dev/null
  for ((i = from; i < to; i++)); do echo "$name $i: $(tail -n 1 $OUT/$name$i.txt)"; done | tee -a $log
  grep -h "^FAILED\|^ERROR\|^-* FAILED " $OUT/$name[0-9]*.txt | tee -a $log
  # the tests no shard finished (one id a line: IDS for phase 69 in the next call)
  cat $OUT/$name[0-9]*.notrun > $OUT/${name}_not_run.txt 2>/dev/null; rm -f $OUT/$name[0-9]*.notrun
  echo "$name: $(wc -l < $OUT/${name}_not_run.txt) tests not finished (${name}_not_run.txt)" | tee -a $log
  (cd $OUT && tar czf ${name}_logs.tgz $name[0-9]*.txt ${name}load.txt && rm $name[0-9]*.txt ${name}load.txt); }
# every test file but test_mosaic.py that reads `--compiled`
rest_files() { grep -l "COMPILED\|compiled" tests/test_*.py | grep -v "tests/test_mosaic.py"; }
if [ "$phase" = 8 ]; then
  TEST_S=${TEST_S:-540} shards shard ${SHARDS:-6} 0.12 --durations=5 tests/test_moba.py \
    tests/test_kernels.py tests/test_attention_api.py tests/test_decode.py
fi
if [ "$phase" = 9 ]; then  # shard 0 of 6 as 3 shards of 18, and named tests ($@), side by side
  for i in 0 6 12; do XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 timeout "${STEP_S:-450}" python3 -m pytest \
    -q --compiled -m "" -p no:cacheprovider --shard $i/18 tests/test_moba.py tests/test_kernels.py \
    tests/test_attention_api.py tests/test_decode.py > "$OUT/shard0_$i.txt" 2>&1 & done
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.2 timeout "${STEP_S:-450}" python3 -m pytest -q --compiled -m "" \
    -p no:cacheprovider "$@" > "$OUT/named.txt" 2>&1 &
  wait; tail -n 4 "$OUT"/shard0_*.txt "$OUT/named.txt"
fi
if [ "$phase" = 7 ]; then
  STEP_S=170 CHECK_EXTRA="tests/test_attention_api.py tests/test_decode.py" check 2>&1 | tee -a $log
  STEP_S=230 bench --impls pallas_gpu,cudnn --repeats 10 --json $OUT/table.json 2>&1 | grep -v "^WARNING" | tee -a $log
  STEP_S=150 bench --decode --model --repeats 20 --json $OUT/decode.json 2>&1 | grep -v "^WARNING" | tee -a $log
fi
if [ "$phase" = 10 ]; then
  for i in 0 1 2 3 4 5; do XLA_PYTHON_CLIENT_MEM_FRACTION=0.12 timeout "${STEP_S:-300}" python3 -m \
    pytest -q --compiled -p no:cacheprovider --shard $i/6 tests/test_moba.py tests/test_kernels.py \
    tests/test_attention_api.py tests/test_decode.py tests/test_model.py > "$OUT/shard$i.txt" 2>&1 &
  done; wait; tail -n 2 "$OUT"/shard*.txt | tee -a $log
  timeout 100 python3 tools/decode_sweep.py --grid default --caches 8192,131072,1048576 \
    --batches 1,16 --inner 100 2>&1 | grep -v WARNING | grep -E "gate_only|^ *[0-9]|batch" | tee $OUT/gate.txt
  timeout 90 python3 tools/mgpu_probe.py --seqs 32768 --causal 0 2>&1 | grep -vi warning | tail -5 | tee $OUT/mgpu.txt
fi
if [ "$phase" = 11 ]; then  # the Mosaic GPU forward: compiled tests, then default tiles and TILES
  timeout "${STEP_S:-240}" python3 -m pytest -q --compiled -p no:cacheprovider tests/test_mosaic.py \
    2>&1 | tail -8 | tee $OUT/check.txt
  for t in default "$@"; do
    extra=""; [ "$t" != default ] && extra="--gpu-block-sizes $t"
    echo "== tiles $t" | tee -a $OUT/mosaic.txt
    STEP_S=${BENCH_S:-120} bench --impls pallas_gpu --seqs ${SEQS:-32768} --configs ${CONFIGS:-512:3} \
      --repeats 10 $extra 2>&1 | grep -v "^WARNING" | tee -a $OUT/mosaic.txt
  done
fi
if [ "$phase" = 12 ]; then
  timeout "${STEP_S:-420}" python3 -m pytest -q -rA --compiled -p no:cacheprovider \
    tests/test_mosaic.py 2>&1 | grep -E "PASS|FAIL|Error|passed|failed|assert" | tee $OUT/check.txt
  STEP_S=${BENCH_S:-250} bench --impls pallas_gpu,cudnn --repeats 10 \
    --gpu-block-sizes ${TILES:-128,64,64,64,4,3,4,64,1} --json $OUT/table.json 2>&1 \
    | grep -v "^WARNING" | tee $OUT/table.txt
fi
if [ "$phase" = 13 ]; then
  py() { XLA_PYTHON_CLIENT_MEM_FRACTION=$1 timeout "${STEP_S:-480}" python3 -m pytest -q -rA \
    --compiled -p no:cacheprovider tests/test_mosaic.py "${@:2}" 2>&1; }
  py 0.3 -k "not benchmark_scale" | grep -E "PASS|FAIL|Error|passed|failed|assert" > $OUT/check.txt &
  py 0.45 -k benchmark_scale | grep -E "PASS|FAIL|Error|passed|failed|assert" > $OUT/scale.txt &
  MOSAIC_GPU_DUMP_PTXAS=1 py 0.2 -s -k "ragged and reference" > $OUT/ptxas.txt &
  wait; cat $OUT/check.txt $OUT/scale.txt; grep -iE "spill|registers|used" $OUT/ptxas.txt | sort | uniq -c | head -40
fi
if [ "$phase" = 14 ]; then
  mkdir -p /tmp/logs
  t() { XLA_PYTHON_CLIENT_MEM_FRACTION=$1 timeout "${STEP_S:-480}" python3 -m pytest -q -rfE \
    --compiled -p no:cacheprovider "${@:3}" > /tmp/logs/$2.txt 2>&1; }
  for i in 0 1 2 3 4 5; do t 0.09 shard$i --shard $i/6 tests/test_moba.py tests/test_kernels.py \
    tests/test_attention_api.py & done
  t 0.09 mosaic_ref0 --shard 0/2 -k reference tests/test_mosaic.py &
  t 0.09 mosaic_ref1 --shard 1/2 -k reference tests/test_mosaic.py &
  t 0.15 mosaic_rest -k "not reference" tests/test_mosaic.py &
  wait; tail -qn 1 /tmp/logs/*.txt; grep -h "^FAILED\|^ERROR" /tmp/logs/*.txt
  tar czf $OUT/logs.tgz -C /tmp logs
fi
if [ "$phase" = 15 ]; then
  STEP_S=${BENCH_S:-300} bench --impls pallas_gpu,cudnn --repeats 10 --json $OUT/table.json 2>&1 \
    | grep -v "^WARNING" | tee $OUT/table.txt
fi
if [ "$phase" = 16 ]; then
  timeout 200 python3 -m pytest -q -rfE --compiled -m "" -p no:cacheprovider tests/test_moba.py \
    tests/test_kernels.py -k "benchmark_shapes or lower_for_cuda or near_tie or gate_scores" 2>&1 \
    | tail -6 | tee $OUT/check.txt
  for spec in "16384 128 8" "8192 512 3"; do set -- $spec
    for t in default 128,64,64,64,4,3,4,128,1,0; do
      extra=""; [ $t != default ] && extra="--gpu-block-sizes $t"
      echo "== seq $1 block $2 topk $3 tiles $t" | tee -a $OUT/profiles.txt
      timeout 100 python3 tools/profile_gpu.py --seq $1 --block $2 --topk $3 $extra --top 14 2>&1 \
        | grep -v "WARNING\|device lines" | tee -a $OUT/profiles.txt
    done
  done
fi
if [ "$phase" = 17 ]; then
  t() { XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 timeout "${STEP_S:-140}" python3 -m pytest -q -rfE \
    --compiled -m "" -p no:cacheprovider "${@:2}" > $OUT/$1.txt 2>&1; }
  t shapes0 --shard 0/2 -k benchmark_shapes tests/test_moba.py &
  t shapes1 --shard 1/2 -k benchmark_shapes tests/test_moba.py &
  t rest -k "lower_for_cuda or near_tie or gate_scores or query_offset" tests/test_kernels.py \
    tests/test_mosaic.py &
  wait; tail -n 4 $OUT/shapes0.txt $OUT/shapes1.txt $OUT/rest.txt
fi
if [ "$phase" = 18 ]; then
  [ -d "${BAL:-}" ] || { echo "phase 18 needs BAL=<a second tree>"; exit 2; }
  ab_profiles 12 . $BAL
  (cd $BAL && STEP_S=${BENCH_S:-300} bench --impls pallas_gpu,cudnn --repeats 10 \
    --json $OUT/table.json 2>&1 | grep -v "^WARNING" | tee $OUT/table.txt)
fi
if [ "$phase" = 19 ]; then
  t() { XLA_PYTHON_CLIENT_MEM_FRACTION=${MOSAIC_FRAC:-0.3} timeout "${STEP_S:-500}" python3 -m \
    pytest -q -rA --compiled -p no:cacheprovider "${@:2}" tests/test_mosaic.py 2>&1 \
    | grep -E "PASS|FAIL|SKIP|Error|passed|failed|assert" > $OUT/$1.txt; }
  t mosaic0 --shard 0/3 & t mosaic1 --shard 1/3 & t mosaic2 --shard 2/3 & wait
  tail -qn 1 $OUT/mosaic*.txt; grep -h "^FAILED\|^ERROR" $OUT/mosaic*.txt
fi
if [ "$phase" = 20 ]; then
  for spec in "8192 512 3" "16384 128 8" "32768 512 3"; do set -- $spec
    echo "== seq $1 block $2 topk $3" | tee -a $OUT/profiles.txt
    timeout 100 python3 tools/profile_gpu.py --seq $1 --block $2 --topk $3 --top 12 2>&1 \
      | grep -v "WARNING\|device lines" | tee -a $OUT/profiles.txt
  done
fi
if [ "$phase" = 21 ]; then
  for spec in "8192 512 3" "16384 128 8"; do set -- $spec
    echo "== seq $1 block $2 topk $3" | tee -a $OUT/profiles.txt
    timeout 80 python3 tools/profile_gpu.py --seq $1 --block $2 --topk $3 --top 8 2>&1 \
      | grep -v "WARNING\|device lines" | tee -a $OUT/profiles.txt
  done
  STEP_S=100 bench --impls pallas_gpu,cudnn --seqs 8192,16384,32768 --configs 512:3,128:8 \
    --repeats 10 --pipeline 8 --json $OUT/pipelined.json 2>&1 | grep -v "^WARNING" | tail -8
  t() { XLA_PYTHON_CLIENT_MEM_FRACTION=0.4 timeout "${STEP_S:-300}" python3 -m pytest -q -rA \
    --compiled -p no:cacheprovider --shard $2 tests/test_mosaic.py 2>&1 \
    | grep -E "PASS|FAIL|SKIP|Error|passed|failed|assert" > $OUT/$1.txt; }
  t mosaic_0of6 0/6 & t mosaic_3of6 3/6 & wait
  tail -qn 1 $OUT/mosaic_*.txt; grep -h "^FAILED\|^ERROR" $OUT/mosaic_*.txt
fi
if [ "$phase" = 22 ]; then
  STEP_S=${BENCH_S:-240} bench --impls pallas_gpu,cudnn --repeats 10 --json $OUT/table.json 2>&1 \
    | grep -v "^WARNING" | tee $OUT/table.txt
  for spec in "8192 512 3" "16384 128 8"; do set -- $spec
    timeout 120 python3 tools/memory_gpu.py --seq $1 --block $2 --topk $3 --out /tmp/memdump/s$1_b$2 \
      2>&1 | grep -v "^WARNING" | tee -a $OUT/memory.txt
  done
  (cd /tmp && find memdump -name "*jit_step*" \( -name "*live-range.txt" -o -name "*memory-usage-report.txt" -o -name "*after_optimizations.txt" \) | tar czf $OUT/memdump.tgz -T -) || true
  for flags in "" "--xla_gpu_enable_command_buffer="; do
    echo "== XLA_FLAGS='$flags'" | tee -a $OUT/cmdbuf.txt
    XLA_FLAGS="$flags" STEP_S=80 bench --impls pallas_gpu,cudnn --seqs 8192 --configs 512:3 \
      --repeats 20 2>&1 | grep -v "^WARNING" | tail -3 | tee -a $OUT/cmdbuf.txt
  done
  bash tools/run_h200.sh 20 > /dev/null 2>&1; cat $OUT/profiles.txt  # the profiles, as phase 20
fi
if [ "$phase" = 23 ]; then
  for spec in ${MEM_SPECS:-8192:512:3 16384:128:8}; do set -- ${spec//:/ }
    timeout 100 python3 tools/memory_gpu.py --seq $1 --block $2 --topk $3 --impls pallas_gpu \
      --out /tmp/memdump/s$1_b$2 2>&1 | grep -v "^WARNING" | tee -a $OUT/memory.txt
  done
  STEP_S=${BENCH_S:-240} bench --impls pallas_gpu,cudnn --repeats 10 --json $OUT/table.json 2>&1 \
    | grep -v "^WARNING" | tee $OUT/table.txt
  STEP_S=100 bench --impls pallas_gpu,cudnn --seqs 8192,16384,32768 --configs 512:3,128:8 \
    --repeats 10 --pipeline 8 2>&1 | grep -v "^WARNING" | tee $OUT/pipelined.txt
fi
if [ "$phase" = 24 ]; then
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.08 timeout 400 python3 -m pytest -q -rfE --compiled -m "" \
    -p no:cacheprovider -k "no_segment_ids or sized_to or bf16_gradients" tests/test_kernels.py \
    tests/test_moba.py > $OUT/segs.txt 2>&1 &
  bash tools/run_h200.sh 19 > /dev/null 2>&1
  wait; tail -n 3 $OUT/segs.txt; tail -qn 1 $OUT/mosaic*.txt; grep -h "^FAILED\|^ERROR" $OUT/mosaic*.txt
fi
if [ "$phase" = 25 ]; then
  base=128,64,64,64,4,3,4,128,1,1
  for spec in "8192 512 3 1 2 4" "16384 128 8 1 4 8"; do set -- $spec
    for n in $4 $5 $6; do
      timeout 100 python3 tools/memory_gpu.py --seq $1 --block $2 --topk $3 --impls pallas_gpu \
        --gpu-block-sizes $base,$n --top 8 --out /tmp/memdump/s$1_b$2_n$n 2>&1 \
        | grep -v "^WARNING" | tee -a $OUT/memory.txt
      for pipe in 1 8; do
        echo "== seq $1 block $2 topk $3 chunks $n pipeline $pipe" | tee -a $OUT/chunks.txt
        STEP_S=100 bench --impls pallas_gpu --seqs $1 --configs $2:$3 --gpu-block-sizes $base,$n \
          --repeats 20 --pipeline $pipe 2>&1 | grep -v "^WARNING" | tail -2 | tee -a $OUT/chunks.txt
      done
    done
  done
fi
if [ "$phase" = 26 ]; then
  for spec in "8192 512 3 2 4" "16384 128 8 4 8"; do set -- $spec
    timeout 90 python3 tools/head_chunks_gpu.py --seq $1 --block $2 --topk $3 --way kernels --chunks 1 \
      2>&1 | grep "^seq" | tee -a $OUT/chunks.txt
    for n in $4 $5; do for way in map kernels; do
      timeout 90 python3 tools/head_chunks_gpu.py --seq $1 --block $2 --topk $3 --way $way \
        --chunks $n 2>&1 | grep "^seq" | tee -a $OUT/chunks.txt
    done; done
  done
  for n in 1 2; do
    echo "== seq 8192 block 512 topk 3 mosaic_bwd_chunks $n" | tee -a $OUT/profiles.txt
    timeout 90 python3 tools/profile_gpu.py --seq 8192 --block 512 --topk 3 --top 16 \
      --gpu-block-sizes 128,64,64,64,4,3,4,128,1,1,$n 2>&1 | grep -v "WARNING\|device lines" \
      | tee -a $OUT/profiles.txt
  done
fi
if [ "$phase" = 27 ]; then
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.08 timeout ${TEST_S:-300} python3 -m pytest -q -rfE --compiled \
    -m "" -p no:cacheprovider -k "no_segment_ids or sized_to or bf16_gradients" \
    tests/test_kernels.py tests/test_moba.py > $OUT/segs.txt 2>&1 &
  MOSAIC_FRAC=0.28 STEP_S=${TEST_S:-300} bash tools/run_h200.sh 19 > /dev/null 2>&1
  wait; tail -n 3 $OUT/segs.txt; tail -qn 1 $OUT/mosaic*.txt; grep -h "^FAILED\|^ERROR" $OUT/mosaic*.txt
fi
if [ "$phase" = 28 ]; then
  for spec in "8192 512 3 2" "16384 128 8 4" "16384 128 8 8"; do set -- $spec
    timeout 90 python3 tools/head_chunks_gpu.py --seq $1 --block $2 --topk $3 --way kernels \
      --chunks $4 2>&1 | grep "^seq" | tee -a $OUT/chunks.txt
  done
  for way in map kernels; do  # the default splits 128K b4096 k12 into 4 lax.map chunks
    timeout 100 python3 tools/head_chunks_gpu.py --seq 131072 --block 4096 --topk 12 --way $way \
      --chunks 4 --repeats 5 2>&1 | grep "^seq" | tee -a $OUT/chunks.txt
  done
  [ "${NO_TABLE:-}" ] || STEP_S=100 bench --impls pallas_gpu --seqs 32768,131072 --configs 512:3 \
    --repeats 10 2>&1 | grep -v "^WARNING" | tee $OUT/table.txt
fi
if [ "$phase" = 29 ]; then
  NO_TABLE=1 bash tools/run_h200.sh 28
  bash tools/run_h200.sh 27
fi
if [ "$phase" = 30 ]; then
  t() { XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 timeout ${TEST_S:-150} python3 -m pytest -q -rA \
    --compiled -m "" -p no:cacheprovider "${@:2}" 2>&1 \
    | grep -E "PASS|FAIL|SKIP|Error|passed|failed|assert" > $OUT/$1.txt; }
  t check_chunks -k "chunks or budget or remat or in_place" tests/test_mosaic.py &
  t check_segs -k "no_segment_ids" tests/test_kernels.py tests/test_moba.py &
  wait; tail -qn 1 $OUT/check_*.txt; grep -h "^FAILED\|^ERROR" $OUT/check_*.txt
  for spec in "8192 512 3 2" "16384 128 8 4"; do set -- $spec
    timeout 90 python3 tools/head_chunks_gpu.py --seq $1 --block $2 --topk $3 --way kernels \
      --chunks $4 2>&1 | grep "^seq" | tee -a $OUT/chunks.txt
  done
  for way in kernels map; do  # the default split 128K b4096 k12 into 4 lax.map chunks
    timeout 100 python3 tools/head_chunks_gpu.py --seq 131072 --block 4096 --topk 12 --way $way \
      --chunks 4 --repeats 5 2>&1 | grep "^seq" | tee -a $OUT/chunks.txt
  done
fi
if [ "$phase" = 36 ]; then
  IFS=: read -r sq bl tk <<< "${SPEC:-16384:128:8}"
  for t in ${TILES:--}; do
    opt=(); [ "$t" != - ] && opt=(--gpu-block-sizes $t)
    echo "== tiles $t" | tee -a $OUT/memory.txt $OUT/table.txt
    timeout 100 python3 tools/memory_gpu.py --seq $sq --block $bl --topk $tk --impls pallas_gpu \
      --top 4 "${opt[@]}" 2>&1 | grep -v "^WARNING" | tee -a $OUT/memory.txt
    STEP_S=${BENCH_S:-60} bench --impls pallas_gpu --seqs $sq --configs $bl:$tk --repeats 10 \
      "${opt[@]}" 2>&1 | grep -v "^WARNING" | tee -a $OUT/table.txt
  done
fi
if [ "$phase" = 37 ]; then
  for spec in ${PROFILE_SPECS:-16384:128:8 8192:512:3}; do set -- ${spec//:/ }
    echo "== seq $1 block $2 topk $3" | tee -a $OUT/profiles.txt
    timeout 100 python3 tools/profile_gpu.py --seq $1 --block $2 --topk $3 --top 40 2>&1 \
      | grep -v "WARNING\|device lines" | tee -a $OUT/profiles.txt
  done
  bash tools/run_h200.sh 36
  STEP_S=120 bench --impls pallas_gpu --seqs 8192,16384,32768 --configs 512:3,128:8 \
    --repeats 10 --pipeline 8 2>&1 | grep -v "^WARNING" | tee $OUT/pipelined.txt
fi
if [ "$phase" = 38 ]; then
  [ -d "${BASE:-}" ] || { echo "phase 38 needs BASE=<the tree to compare against>"; exit 2; }
  table() { echo "== $1" | tee -a $OUT/table.txt; install $1
    (cd $1 && STEP_S=${BENCH_S:-100} bench --impls pallas_gpu --seqs 8192,16384 \
      --configs 512:3,128:8 --repeats 10 2>&1 | grep -v "^WARNING" | tee -a $OUT/table.txt); }
  table $BASE; table .
  prof() { echo "== $1 $2 seq $3 block $4 topk $5" | tee -a $OUT/profiles.txt
    (cd $1 && timeout 100 python3 tools/profile_gpu.py --impl $2 --seq $3 --block $4 --topk $5 \
      --top 12 --host 25 2>&1 | grep -v "WARNING\|device lines" | tee -a $OUT/profiles.txt); }
  for tree in $BASE .; do install $tree
    for spec in ${PROFILE_SPECS:-8192:512:3 16384:128:8}; do prof $tree pallas_gpu ${spec//:/ }; done
  done
  prof . cudnn 8192 512 3; prof . pallas_gpu 32768 512 3; prof . cudnn 32768 512 3
fi
if [ "$phase" = 39 ]; then
  [ -d "${BASE:-}" ] || { echo "phase 39 needs BASE=<the tree to compare against>"; exit 2; }
  for tree in $BASE .; do echo "== $tree" | tee -a $OUT/table.txt; install $tree
    (cd $tree && STEP_S=${BENCH_S:-100} bench --impls pallas_gpu --seqs 8192,16384 \
      --configs 512:3,128:8 --repeats ${REPEATS:-30} 2>&1 | grep -v "^WARNING" | tee -a $OUT/table.txt)
  done
  for spec in ${SOURCE_SPECS:-8192:512:3 16384:128:8 32768:512:3}; do set -- ${spec//:/ }
    echo "== seq $1 block $2 topk $3" | tee -a $OUT/profiles.txt
    timeout 100 python3 tools/profile_gpu.py --seq $1 --block $2 --topk $3 --top 60 --sources \
      --host 12 2>&1 | grep -v "WARNING\|device lines" | tee -a $OUT/profiles.txt
  done
fi
if [ "$phase" = 40 ]; then
  [ -d "${BASE:-}" ] || { echo "phase 40 needs BASE=<the tree to compare against>"; exit 2; }
  first sort 150 0.25 "at_scale or sorts_every" tests/test_kernels.py &
  first oracle 150 0.25 "float32_reference and (all_ragged or batch2 or ring_wrap or unaligned)" \
    tests/test_mosaic.py &
  first scale 150 0.25 "benchmark_scale and (8k or 16k)" tests/test_mosaic.py &
  first_report sort oracle scale
  prof() { echo "== $1 seq $2 block $3 topk $4" | tee -a $OUT/profiles.txt
    (cd $1 && timeout 100 python3 tools/profile_gpu.py --seq $2 --block $3 --topk $4 --top 20 \
      --host 12 2>&1 | grep -v "WARNING\|device lines" | tee -a $OUT/profiles.txt); }
  row() { (cd $1 && STEP_S=100 bench --impls pallas_gpu --seqs $2 --configs $3 --repeats \
    ${REPEATS:-30} --pipeline $4 2>&1 | grep "^pallas_gpu" | sed "s|^|$1 pipeline $4 |" \
    | tee -a $OUT/table.txt); }
  for tree in $BASE .; do install $tree
    prof $tree 8192 512 3; prof $tree 16384 128 8
    row $tree 8192 512:3 1; row $tree 16384 128:8 1; row $tree 16384 128:8 8
  done
  prof . 32768 512 3
fi
if [ "$phase" = 41 ]; then
  t() { XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 timeout "${TEST_S:-200}" python3 -m pytest -q -rfEs \
    -W ignore --compiled -p no:cacheprovider -k "float32_reference and ($2)" tests/test_mosaic.py \
    > $OUT/oracle_$1.txt 2>&1; echo "exit $?" >> $OUT/oracle_$1.txt; }
  t a "all_ragged_gqa or batch2" & t b "ring_wrap or unaligned" & wait
  for f in a b; do echo "oracle $f: $(tail -n 2 $OUT/oracle_$f.txt | tr '\n' ' ')"; done | tee -a $log
  STEP_S=150 bench --impls pallas_gpu --seqs 32768,131072 --configs 512:3 --repeats 10 2>&1 \
    | grep -v "^WARNING" | tee -a $OUT/table.txt
  STEP_S=100 bench --impls pallas_gpu --seqs 8192 --configs 512:3 --repeats 10 --pipeline 8 2>&1 \
    | grep -v "^WARNING" | tee -a $OUT/table.txt
  STEP_S=150 bench --impls pallas_gpu --seqs 131072 --configs 4096:12 --repeats 10 2>&1 \
    | grep -v "^WARNING" | tee -a $OUT/table.txt
fi
if [ "$phase" = 42 ]; then
  for spec in ${SOURCE_SPECS:-8192:512:3 32768:512:3 131072:512:3}; do set -- ${spec//:/ }
    echo "== seq $1 block $2 topk $3" | tee -a $OUT/profiles.txt
    timeout 100 python3 tools/profile_gpu.py --seq $1 --block $2 --topk $3 --top 60 --sources \
      --host 12 2>&1 | grep -v "WARNING\|device lines" | tee -a $OUT/profiles.txt
  done
  for m in ${FLAT_MINS:-0 off}; do v=$m; [ "$m" = off ] && v="1 << 62"
    rm -rf _flat_$m && mkdir _flat_$m && tar -c --exclude=./.whl --exclude="./_flat_*" \
      --exclude=./.git . | tar -x -C _flat_$m && sed -i "s/^FLAT_SORT_MIN_KEYS = .*/FLAT_SORT_MIN_KEYS = $v/" \
      _flat_$m/kernels/_routing.py && grep "^FLAT_SORT_MIN_KEYS" _flat_$m/kernels/_routing.py
    (cd _flat_$m && python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . && \
      for sc in 8192,32768:512:3 8192,16384:128:8; do STEP_S=${BENCH_S:-120} bench \
        --impls pallas_gpu --seqs ${sc%%:*} --configs ${sc#*:} --repeats ${REPEATS:-30} 2>&1 \
        | grep "^pallas_gpu" | sed "s|^|flat_min $m |" | tee -a $OUT/table.txt; done)
  done
  python3 -m pip install -q --no-index --no-deps --no-build-isolation -e .
  STEP_S=100 bench --impls pallas_gpu --seqs 8192 --configs 512:3 --repeats 10 --pipeline 8 2>&1 \
    | grep -v "^WARNING" | tee -a $OUT/table.txt
  STEP_S=150 bench --impls pallas_gpu --seqs 131072 --configs 4096:12 --repeats 10 2>&1 \
    | grep -v "^WARNING" | tee -a $OUT/table.txt
fi
if [ "$phase" = 43 ]; then
  first gate 170 0.22 "routing_with_the_gate or gate_kernel_is" tests/test_kernels.py &
  first scale 170 0.22 "benchmark_scale and (8k or 16k)" tests/test_mosaic.py &
  first oracle 170 0.22 "float32_reference and (all_ragged_gqa or batch2)" tests/test_mosaic.py &
  first_report gate scale oracle
  for spec in ${PROFILE_SPECS:-8192:512:3 32768:512:3 131072:512:3 16384:128:8}; do
    set -- ${spec//:/ }; echo "== seq $1 block $2 topk $3" | tee -a $OUT/profiles.txt
    timeout 100 python3 tools/profile_gpu.py --seq $1 --block $2 --topk $3 --top 30 --host 8 \
      2>&1 | grep -v "WARNING\|device lines" | tee -a $OUT/profiles.txt
  done
  rm -rf _nogate && mkdir _nogate && tar -c --exclude=./.whl --exclude="./_*" --exclude=./.git . \
    | tar -x -C _nogate && sed -i 's/^  if jax.default_backend() != "gpu":$/  if True:  # XLA gate/' \
    _nogate/kernels/_routing.py && grep -c "if True:  # XLA gate" _nogate/kernels/_routing.py
  for tree in _nogate .; do install $tree
    for sc in 8192,32768:512:3 16384:128:8; do (cd $tree && STEP_S=${BENCH_S:-120} bench \
      --impls pallas_gpu --seqs ${sc%%:*} --configs ${sc#*:} --repeats ${REPEATS:-30} 2>&1 \
      | grep "^pallas_gpu" | sed "s|^|$tree |" | tee -a $OUT/table.txt); done
  done
  STEP_S=150 bench --impls pallas_gpu --seqs 131072 --configs 512:3 --repeats 10 2>&1 \
    | grep "^pallas_gpu" | tee -a $OUT/table.txt
fi
if [ "$phase" = 44 ]; then
  for sc in 8192,32768:512:3 16384:128:8; do STEP_S=100 bench --impls pallas_gpu --seqs ${sc%%:*} \
    --configs ${sc#*:} --repeats 10 --pipeline 8 2>&1 | grep "^pallas_gpu" | tee -a $OUT/table.txt
  done
  STEP_S=200 bench --impls pallas_gpu --seqs 131072 --configs 4096:12 --repeats 10 2>&1 \
    | grep "^pallas_gpu" | tee -a $OUT/table.txt
fi
if [ "$phase" = 45 ]; then
  first gate 120 0.3 "gate" tests/test_kernels.py &
  first scale 120 0.3 "benchmark_scale and 8k" tests/test_mosaic.py &
  first_report gate scale
  STEP_S=100 bench --impls pallas_gpu --seqs 32768,131072 --configs 512:3 --repeats 10 2>&1 \
    | grep "^pallas_gpu" | tee -a $OUT/table.txt
fi
if [ "$phase" = 46 ]; then
  [ -d "${BASE:-}" ] || { echo "phase 46 needs BASE=<the tree to compare against>"; exit 2; }
  first gate 170 0.3 "gate" tests/test_kernels.py &
  first oracle 170 0.3 "(float32_reference and (unaligned or packed or block64 or all_docs)) or query_offset" \
    tests/test_mosaic.py &
  first scale 170 0.3 "benchmark_scale and docs" tests/test_mosaic.py &
  first_report gate oracle scale
  cp moba_jax/bench.py $BASE/moba_jax/bench.py
  for tree in $BASE .; do install $tree
    for spec in ${DOCS_SPECS:-8192,32768:512:3:8 8192,32768:512:3:16 16384:128:8:8 32768:512:3:16:2:64} \
        8192,32768:512:3:1; do
      IFS=: read seqs blk k docs kvh dim <<< "$spec"
      (cd $tree && STEP_S=${BENCH_S:-120} bench --impls pallas_gpu --seqs $seqs --configs $blk:$k \
        --docs $docs ${kvh:+--kv-heads $kvh} ${dim:+--dim $dim} --repeats ${REPEATS:-20} 2>&1 \
        | grep "^pallas_gpu" | sed "s|^|$(basename $tree) kv ${kvh:-16} d ${dim:-128} |" \
        | tee -a $OUT/table.txt)
    done
  done
fi
if [ "$phase" = 47 ]; then
  t() { XLA_PYTHON_CLIENT_MEM_FRACTION=0.25 timeout "${TEST_S:-220}" python3 -m pytest -q -rfEs \
    -W ignore --compiled -p no:cacheprovider --shard $1/3 tests/test_mosaic.py > $OUT/mosaic$1.txt 2>&1; }
  for i in 0 1 2; do t $i & done; wait
  tail -qn 1 $OUT/mosaic*.txt | tee -a $log; grep -h "^FAILED\|^ERROR" $OUT/mosaic*.txt | tee -a $log
  (cd $OUT && tar czf mosaic_logs.tgz mosaic[0-2].txt && rm mosaic[0-2].txt)
  for spec in ${DOCS_PROFILES:-32768:512:3:16 16384:128:8:8}; do
    set -- ${spec//:/ }; echo "== seq $1 block $2 topk $3 docs $4" | tee -a $OUT/profiles.txt
    timeout 100 python3 tools/profile_gpu.py --seq $1 --block $2 --topk $3 --docs $4 --top 30 \
      --sources 2>&1 | grep -v "WARNING\|device lines" | tee -a $OUT/profiles.txt
  done
fi
if [ "$phase" = 48 ]; then
  TEST_S=${TEST_S:-300} shards mosaic 7 0.11 tests/test_mosaic.py &
  TEST_S=${TEST_S:-300} shards kernels 1 0.11 -k "no_segment_ids or gate" tests/test_kernels.py &
  wait
fi
if [ "$phase" = 50 ]; then
  [ -d "${BASE:-}" ] || { echo "phase 50 needs BASE=<the tree to compare against>"; exit 2; }
  k="(float32_reference and (fwd128_alone or all_packed or ring_wrap or one_doc_d64 or off_8))"
  first plain 170 0.4 "$k or (benchmark_scale and (8k or b4096))" tests/test_mosaic.py &
  first_report plain
  install $BASE; (cd $BASE && prof base); install .; prof new
fi
if [ "$phase" = 52 ]; then
  [ -d "${BASE:-}" ] || { echo "phase 52 needs BASE=<the tree to compare against>"; exit 2; }
  # each tree's own moba_jax: the working directory comes first on sys.path, its kernels linked
  # in as the editable install maps them
  ptxas() { [ "$1" = . ] || ln -sfn ../kernels $1/moba_jax/kernels
    (cd $1 && MOSAIC_GPU_DUMP_PTXAS=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.15 \
    timeout ${FIRST_S:-170} python3 -m pytest -q -s -W ignore --compiled -p no:cacheprovider \
    -k "float32_reference and all_ragged_gqa_d128" tests/test_mosaic.py > $OUT/ptxas_$2.txt 2>&1
    python3 -c "import moba_jax.kernels as k; print('kernels of', k.__file__)" >> $OUT/ptxas_$2.txt)
    [ "$1" = . ] || rm -f $1/moba_jax/kernels; }
  ptxas $BASE base & ptxas . new &
  [ -d "${OVL:-}" ] && { ptxas $OVL ovl & }
  k="(float32_reference and (all_ragged or all_packed or ring_wrap or one_doc_d64 or off_8 or dkdv_alone))"
  first plain 170 0.4 "$k or (benchmark_scale and (8k or b4096))" tests/test_mosaic.py &
  first_report plain
  for f in $OUT/ptxas_*.txt; do echo "== $f: $(tail -n 1 $f)"
    grep -iE "spill|registers|serializ|Performance|warning" $f | sort | uniq -c | head -30; done \
    | tee -a $log
  (cd $OUT && tar czf ptxas_logs.tgz ptxas_*.txt && rm ptxas_*.txt)
  install $BASE; (cd $BASE && prof base); install .; prof new
  [ -n "${NO_GLUE:-}" ] || { timeout 150 python3 tools/profile_gpu.py --seq 131072 --block 4096 \
    --topk 12 --steps 3 --top ${GLUE_TOP:-45} --sources --hlo $OUT/step_hlo.txt 2>&1 \
    | grep -v "WARNING" > $OUT/glue.txt; head -n 60 $OUT/glue.txt; gzip -f $OUT/step_hlo.txt; }
fi
if [ "$phase" = 54 ]; then
  [ -d "${BASE:-}" ] || { echo "phase 54 needs BASE=<the tree to compare against>"; exit 2; }
  SHARDS=${SHARDS:-8} MEM=${MEM:-0.09} mosaic_suite 240
  install $BASE; (cd $BASE && prof base); install .; prof new
  [ -n "${FORCED_SPECS:-}" ] && PROFILE_SPECS=$FORCED_SPECS PROF_SIZES=${FORCED_SIZES:-} prof forced
fi
if [ "$phase" = 55 ]; then tree_profiles; fi
if [ "$phase" = 56 ]; then
  SHARDS=${SHARDS:-8} MEM=${MEM:-0.09} mosaic_suite 200
  tree_profiles
  for spec in 32768:512:3:${REPEATS:-20} 131072:4096:12:5; do IFS=: read s b t reps <<< "$spec"
    STEP_S=${BENCH_S:-100} bench --impls pallas_gpu --seqs $s --configs $b:$t --repeats $reps 2>&1 \
      | grep "^pallas_gpu" | tee -a $OUT/table.txt
  done
fi
if [ "$phase" = 57 ]; then
  NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
  [ -n "$NCU" ] || { echo "phase 57: no ncu on this machine" | tee -a $log; exit 2; }
  for spec in ${NCU_SPECS:-32768:512:3}; do IFS=: read s b t <<< "$spec"
    echo "== ncu seq $s block $b topk $t" | tee -a $log
    timeout ${NCU_S:-400} $NCU --clock-control none --target-processes all -k regex:moba_mgpu \
      --launch-count 3 --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
      --section InstructionStats --section LaunchStats --section Occupancy \
      --section MemoryWorkloadAnalysis -f -o $OUT/ncu_${s}_${b} python3 -m moba_jax.cli bench \
      --impls pallas_gpu --seqs $s --configs $b:$t --repeats 1 --warmup 1 > $OUT/ncu_run.txt 2>&1
    tail -n 5 $OUT/ncu_run.txt | tee -a $log
    $NCU -i $OUT/ncu_${s}_${b}.ncu-rep --page details > $OUT/ncu_${s}_${b}.txt 2>&1
    grep -E "moba_mgpu|Duration|Stall|Issued Warp|Registers|Local|Compute \(SM\)|Memory Thr" \
      $OUT/ncu_${s}_${b}.txt | head -n 80 | tee -a $log
    rm -f $OUT/ncu_${s}_${b}.ncu-rep
  done
  rm -f $OUT/ncu_run.txt
fi
if [ "$phase" = 59 ]; then
  for spec in 8192,32768:512:3:${REPEATS:-20} 16384:128:8:${REPEATS:-20} \
      131072:512:3:${REPEATS:-20} 131072:4096:12:10; do IFS=: read seqs blk k reps <<< "$spec"
    STEP_S=${BENCH_S:-150} bench --impls pallas_gpu --seqs $seqs --configs $blk:$k --repeats $reps \
      2>&1 | grep "^pallas_gpu" | tee -a $OUT/table.txt
  done
  STEP_S=100 bench --impls pallas_gpu --seqs 8192 --configs 512:3 --repeats ${REPEATS:-20} \
    --pipeline 8 2>&1 | grep "^pallas_gpu" | sed "s/^/back to back: /" | tee -a $OUT/table.txt
  timeout 100 python3 tools/profile_gpu.py --seq 32768 --block 512 --topk 3 --steps 5 --top 20 \
    --host 12 2>&1 | grep -v "WARNING\|device lines" > $OUT/prof32k.txt
  grep -v "^  gap" $OUT/prof32k.txt | tail -n 40 | tee -a $log
  # 16K b128 k8: 0.54 ms of idle GPU in ~92 gaps inside the step (run 33), 17% of its span
  timeout 100 python3 tools/profile_gpu.py --seq 16384 --block 128 --topk 8 --steps 5 --top 30 \
    --host 12 2>&1 | grep -v "WARNING\|device lines" > $OUT/prof16k.txt
  grep -v "^  gap" $OUT/prof16k.txt | tail -n 40 | tee -a $log
  for spec in ${TRACE_SPECS:-8192:512:3 16384:128:8:stage,store,store_wait}; do
    IFS=: read s b t regions <<< "$spec"
    timeout 120 python3 tools/mgpu_trace.py --seq $s --block $b --topk $t --out /tmp/tr$s \
      ${regions:+--regions $regions} 2>&1 | grep -v WARNING > $OUT/trace_$s.txt
    grep -v "^ *compute1" $OUT/trace_$s.txt | tee -a $log
  done
  [ -d /tmp/tr8192 ] && tar czf $OUT/tr8k.tgz -C /tmp tr8192
  # last (the first thing a call cut at its limit loses): 128K b512 k3's ~1.25 ms a step of
  # kernels past the top 8 (run 34), listed whole, appended to prof32k.txt
  echo "== 131072 512 3" >> $OUT/prof32k.txt
  timeout 100 python3 tools/profile_gpu.py --seq 131072 --block 512 --topk 3 --steps 3 --top 60 \
    2>&1 | grep -v "WARNING\|device lines\|^  gap" >> $OUT/prof32k.txt
fi
if [ "$phase" = 60 ]; then
  timeout "${STEP_S:-240}" python3 tools/gate_sweep.py ${GATE_SPECS:+--specs $GATE_SPECS} \
    ${GATE_TILES:+--tiles $GATE_TILES} 2>&1 | grep -v WARNING | tee $OUT/gate.txt
fi
if [ "$phase" = 62 ]; then
  off="--xla-option xla_gpu_enable_command_buffer="
  for pass in 1 2; do
    for opt in "" "$off"; do
      tag="pass $pass $([ -n "$opt" ] && echo off || echo on):"
      for spec in 8192:512:3:pallas_gpu,cudnn:1 32768:512:3:pallas_gpu:1 \
          16384:128:8:pallas_gpu:1 ${LONG:+131072:512:3:pallas_gpu:1} 8192:512:3:pallas_gpu:8; do
        IFS=: read s b t impls pipe <<< "$spec"
        [ $pass = 2 ] && { [ $s != 8192 ] || [ $pipe = 8 ]; } && continue
        reps=${REPEATS:-20}; [ $s = 131072 ] && reps=10
        STEP_S=120 bench --impls $impls --seqs $s --configs $b:$t --repeats $reps \
          --pipeline $pipe $opt 2>&1 | grep "^pallas_gpu\|^cudnn" \
          | sed "s/^/$tag pipeline $pipe: /" | tee -a $OUT/cmdbuf.txt
      done
    done
  done
fi
if [ "$phase" = 63 ]; then
  IFS=';' read -ra sets <<< "${CB_OPTIONS:--;xla_gpu_enable_command_buffer=;xla_gpu_command_buffer_update_mode=SKIP_TEMP;xla_gpu_command_buffer_update_mode=SKIP_PROFILED;xla_gpu_command_buffer_scheduling_mode=CONCURRENT;xla_gpu_enable_cub_radix_sort=False}"
  for ((pass = 1; pass <= ${PASSES:-1}; pass++)); do
    for set_ in "${sets[@]}"; do
      opts=""; [ "$set_" != "-" ] && for o in $set_; do opts="$opts --xla-option $o"; done
      for spec in ${CB_SPECS:-8192:512:3 16384:128:8}; do IFS=: read s b t <<< "$spec"
        STEP_S=120 bench --impls pallas_gpu --seqs $s --configs $b:$t --repeats ${REPEATS:-20} \
          $opts 2>&1 | grep "^pallas_gpu\|changed the results\|refused\|Error" \
          | sed "s|^|pass $pass [$set_]: |" | tee -a $OUT/cbopts.txt
      done
    done
  done
fi
if [ "$phase" = 64 ]; then
  [ -d "${BASE:-}" ] || { echo "phase 64 needs BASE=<the tree before the in-place dK/dV>"; exit 2; }
  k="head_chunks or split_heads or (float32_reference and (all_packed or ring_wrap or one_doc_d64"
  k="$k or all_ragged)) or (benchmark_scale and (16k or b4096))"
  first chunks 240 0.5 "$k" tests/test_mosaic.py &
  first_report chunks
  rows16k $BASE .
fi
if [ "$phase" = 65 ]; then
  [ -d "${BASE:-}" ] && [ -d "${VARIANT:-}" ] || { echo "phase 65 needs BASE= and VARIANT="; exit 2; }
  ln -sfn ../kernels $VARIANT/moba_jax/kernels  # its own kernels when run from its directory
  (cd $VARIANT && python3 -c "import moba_jax.kernels as k; print('variant kernels:', k.__file__)" \
    | tee -a $log)
  k="(float32_reference and (all_packed or ring_wrap or one_doc_d64 or all_ragged))"
  first chunks 210 0.2 "head_chunks or split_heads" tests/test_mosaic.py &
  first scale 210 0.2 "$k or (benchmark_scale and (16k or b4096))" tests/test_mosaic.py &
  k="(float32_reference and (fwd128_alone or dq_alone or all_docs or all_packed or ring_wrap"
  (cd $VARIANT && first variant 210 0.2 "$k or one_doc_d64)) or (overlap and ring_wrap)" \
    tests/test_mosaic.py) &
  (cd $VARIANT && first variant_scale 210 0.2 "benchmark_scale and (8k or 16k)" \
    tests/test_mosaic.py) &
  first_report chunks scale variant variant_scale
  rm -f $VARIANT/moba_jax/kernels
  rows16k $BASE . $VARIANT
  prof32k_trees 500 . $VARIANT
  install .
fi
if [ "$phase" = 66 ]; then
  [ -d "${VARIANT:-}" ] || { echo "phase 66 needs VARIANT="; exit 2; }
  ln -sfn ../kernels $VARIANT/moba_jax/kernels  # its own kernels when run from its directory
  (cd $VARIANT && python3 -c "import moba_jax.kernels as k; print('variant kernels:', k.__file__)" \
    | tee -a $log)
  (cd $VARIANT && first variant 210 0.3 "float32_reference or overlap" tests/test_mosaic.py) &
  (cd $VARIANT && first variant_scale 210 0.3 "benchmark_scale and (8k or 16k or d64)" \
    tests/test_mosaic.py) &
  first_report variant variant_scale
  rm -f $VARIANT/moba_jax/kernels
  rows16k . $VARIANT
  prof32k_trees 480 . $VARIANT
  for tree in $VARIANT .; do [ $SECONDS -lt 500 ] || break
    install $tree; name=$(basename $(cd $tree && pwd))
    (cd $tree && timeout 60 python3 tools/mgpu_trace.py --seq 16384 --block 128 --topk 8 \
      --regions stage,store,store_wait --out /tmp/tr_$name 2>&1 | grep -v WARNING \
      > $OUT/trace_$name.txt)
    grep -v "^ *compute1" $OUT/trace_$name.txt | tee -a $log
  done
  install .
fi
if [ "$phase" = 67 ]; then
  echo "files: $(echo $(rest_files))" | tee -a $log
  shards suite ${SHARDS:-10} ${MEM:-0.09} $(rest_files)
fi
if [ "$phase" = 71 ]; then
  specs=${OTHER_SPECS:-"32768:512:3:16:16:128:1:1 32768:512:3:16:8:128:1:1 32768:512:3:16:4:128:1:1
    32768:512:3:16:2:128:1:1 32768:512:3:16:16:64:1:1 32768:512:3:16:2:64:1:1
    16384:128:8:16:2:128:1:1 16384:128:8:16:16:64:1:1 32768:512:3:16:16:128:16:1
    8192:512:3:16:16:128:1:4 65536:512:3:16:16:128:1:1 32768:1024:4:16:16:128:1:1"}
  for spec in $specs; do IFS=: read s b t h kv d docs batch <<< "$spec"
    echo "== $spec" | tee -a $OUT/other.txt
    STEP_S=${BENCH_S:-120} bench --impls pallas_gpu,cudnn --seqs $s --configs $b:$t --heads $h \
      --kv-heads $kv --dim $d --docs $docs --batch $batch --repeats ${REPEATS:-10} 2>&1 \
      | grep -v "^WARNING" | tee -a $OUT/other.txt
  done
fi
if [ "$phase" = 72 ]; then
  [ -d "${BASE:-}" ] || { echo "phase 72 needs BASE=<the tree before run 48's dK/dV>"; exit 2; }
  split=${SPLIT_TILES:-128,64,64,64,4,3,4,128,1,1,1,1024,1}
  first chunks 240 0.4 "head_chunks or split_heads or split_dkdv or (benchmark_scale and 16k)" \
    tests/test_mosaic.py &
  first_report chunks
  row() { local name=$1 spec=$2 kv=$3 impls=$4; shift 4; IFS=: read s b t <<< "$spec"
    [ $SECONDS -lt 540 ] || return 0
    STEP_S=100 bench --impls $impls --seqs $s --configs $b:$t --kv-heads $kv \
      --repeats ${REPEATS:-20} "$@" 2>&1 | grep "^pallas_gpu\|^cudnn" \
      | sed "s/^/$name kv $kv: /" | tee -a $OUT/table.txt; }
  install $BASE
  row base 16384:128:8 2 pallas_gpu,cudnn
  row base 16384:128:8 16 pallas_gpu,cudnn
  install .
  for kv in 2 16; do row one_call 16384:128:8 $kv pallas_gpu; row split 16384:128:8 $kv \
    pallas_gpu --tiles $split; done
  row one_call 16384:128:8 4 pallas_gpu,cudnn; row split 16384:128:8 4 pallas_gpu --tiles $split
  row one_call 32768:512:3 2 pallas_gpu,cudnn; row split 32768:512:3 2 pallas_gpu --tiles $split
  for v in whole split; do [ $SECONDS -lt 540 ] || break
    extra=""; [ $v = split ] && extra="--gpu-block-sizes $split"
    timeout 60 python3 tools/profile_gpu.py --seq 16384 --block 128 --topk 8 --kv-heads 2 \
      --steps 5 --top 12 $extra 2>&1 | grep -v "WARNING\|device lines" > $OUT/prof16k_gqa8_$v.txt
    grep -v "^  gap" $OUT/prof16k_gqa8_$v.txt | head -n 6 | tee -a $log
  done
fi
if [ "$phase" = 69 ]; then
  ids=${IDS:?phase 69 needs IDS, a file of pytest node ids, e.g. the suite_not_run.txt of phase 67}
  [ -f "$ids" ] && [ -r "$ids" ] \
    || { echo "phase 69: IDS=$ids is not a readable file" | tee -a $log; exit 2; }
  mapfile -t named < "$ids"  # node ids hold spaces and quotes: one array element a line
  echo "tests: ${#named[@]} of $ids" | tee -a $log
  # no ids (a phase 67 that finished): nothing to run, not pytest's whole default collection
  [ ${#named[@]} = 0 ] || shards named ${SHARDS:-8} ${MEM:-0.1} "${named[@]}"
fi
if [ "$phase" = 68 ]; then
  echo "files: tests/test_mosaic.py; $(echo $(rest_files))" | tee -a $log
  shards mosaic ${SHARDS:-7} ${MEM:-0.06} tests/test_mosaic.py &
  shards suite ${SHARDS:-7} ${MEM:-0.06} $(rest_files) &
  wait
fi
if [ "$phase" = 61 ]; then
  for flags in "" "--xla_gpu_enable_command_buffer="; do
    for spec in 8192:512:3 16384:128:8; do IFS=: read s b t <<< "$spec"
      for pipe in 1 8; do
        XLA_FLAGS="$flags" STEP_S=80 bench --impls pallas_gpu,cudnn --seqs $s --configs $b:$t \
          --repeats ${REPEATS:-20} --pipeline $pipe 2>&1 | grep "^pallas_gpu\|^cudnn" \
          | sed "s/^/XLA_FLAGS='$flags' pipeline $pipe: /" | tee -a $OUT/hostshare.txt
      done
    done
  done
fi
if [ "$phase" = 58 ]; then
  nvidia-smi -q -d POWER | grep -iE "limit|draw" | head -n 8 | tee -a $log
  for tree in ${TREES:-.}; do name=$(basename $(cd $tree && pwd)); install $tree
    fields=timestamp,power.draw,clocks.sm,clocks.mem,temperature.gpu
    reasons=clocks_event_reasons.active
    nvidia-smi --query-gpu=$reasons --format=csv > /dev/null 2>&1 \
      || reasons=clocks_throttle_reasons.active  # the older drivers' name
    nvidia-smi --query-gpu=$fields,$reasons --format=csv -lms 100 > $OUT/power_$name.csv 2>&1 &
    sampler=$!
    STEP_S=${BENCH_S:-150} bench --impls pallas_gpu --seqs 131072 --configs 4096:12 \
      --repeats ${REPEATS:-20} 2>&1 | grep "^pallas_gpu" | sed "s/^/$name /" | tee -a $OUT/table.txt
    kill $sampler
    python3 - $OUT/power_$name.csv <<'PY' | tee -a $log
import collections, csv, statistics, sys
rows = [r for r in csv.reader(open(sys.argv[1]))][1:]
num = lambda x: float(x.split()[0])
vals = [(num(r[1]), num(r[2]), r[5].strip()) for r in rows
        if len(r) >= 6 and r[1].strip()[:1].isdigit() and r[2].strip()[:1].isdigit()]
busy = [v for v in vals if v[0] > 300]  # samples of the step (the compile draws far less)
if busy:
  print(f"{len(busy)} of {len(vals)} samples over 300 W: power median "
        f"{statistics.median(v[0] for v in busy):.0f} W (max {max(v[0] for v in busy):.0f}), SM clock "
        f"median {statistics.median(v[1] for v in busy):.0f} MHz (min {min(v[1] for v in busy):.0f}); "
        f"reasons {dict(collections.Counter(v[2] for v in busy).most_common(4))}")
else:
  print(f"no sample over 300 W of {len(vals)}")
PY
  done
  install .
fi
if [ "$phase" = 53 ]; then
  mosaic_suite 240
  STEP_S=${BENCH_S:-150} bench --impls pallas_gpu --seqs 131072 --configs 4096:12 \
    --repeats ${REPEATS:-5} 2>&1 | grep "^pallas_gpu" | tee -a $OUT/table.txt
  for spec in ${OVERLAP_SPECS:-16384:1024:2 16384:2048:3}; do IFS=: read s b t <<< "$spec"
    for ob in 0 1048576; do echo "== overlap_block $ob seq $s block $b topk $t" | tee -a $OUT/profiles.txt
      timeout 100 python3 tools/profile_gpu.py --seq $s --block $b --topk $t --steps 5 --top 6 \
        --gpu-block-sizes 128,64,64,64,4,3,4,128,1,1,1,$ob 2>&1 \
        | grep -v "WARNING\|device lines\|^  gap" | tee -a $OUT/profiles.txt
    done
  done
fi
if [ "$phase" = 51 ]; then
  mosaic_suite 270
  for spec in 8192,32768:512:3:${REPEATS:-20} 16384:128:8:${REPEATS:-20} 131072:512:3:5 \
      131072:4096:12:5; do IFS=: read seqs cfg1 cfg2 reps <<< "$spec"
    STEP_S=${BENCH_S:-120} bench --impls pallas_gpu --seqs $seqs --configs $cfg1:$cfg2 \
      --repeats $reps 2>&1 | grep "^pallas_gpu" | tee -a $OUT/table.txt
  done
fi
if [ "$phase" = 49 ]; then
  for spec in 16384:128:8:8 8192,32768:512:3:8 32768:512:3:16; do
    IFS=: read seqs blk k docs <<< "$spec"
    STEP_S=${BENCH_S:-120} bench --impls pallas_gpu --seqs $seqs --configs $blk:$k --docs $docs \
      --repeats ${REPEATS:-20} 2>&1 | grep "^pallas_gpu" | tee -a $OUT/table.txt
  done
  timeout "${TEST_S:-150}" python3 -m pytest -q -rfEs -W ignore --compiled -p no:cacheprovider \
    -k "chunks_equals_one_pass or split_heads" tests/test_mosaic.py > $OUT/chunks.txt 2>&1
  tail -n 3 $OUT/chunks.txt | tee -a $log
fi
if [ "$phase" = 32 ]; then
  [ -d "${BASE:-}" ] || { echo "phase 32 needs BASE=<the tree to compare against>"; exit 2; }
  for c in gather:row_gather fwd:fwd128_alone dq:dq_alone dkdv:dkdv_alone; do
    first ${c%%:*} 150 0.2 ${c#*:} tests/test_mosaic.py & done
  first_report gather fwd dq dkdv
  grep -q "exit [1-9]" $log && { echo "first check failed: no A/B" | tee -a $log; exit 1; }
  phase=31
fi
if [ "$phase" = 31 ]; then
  [ -d "${BASE:-}" ] || { echo "phase 31 needs BASE=<the tree to compare against>"; exit 2; }
  ab_profiles 8 $BASE .
  t() { XLA_PYTHON_CLIENT_MEM_FRACTION=0.14 timeout "${TEST_S:-330}" python3 -m pytest -q -rfEs \
    -W ignore --compiled -p no:cacheprovider --shard $1/6 tests/test_mosaic.py > $OUT/mosaic$1.txt 2>&1; }
  for i in 0 1 2 3 4 5; do t $i & done; wait
  tail -qn 1 $OUT/mosaic*.txt; grep -h "^FAILED\|^ERROR" $OUT/mosaic*.txt
  # one file for the six logs: at most 8 files come back (run 21a lost profiles.txt to that)
  (cd $OUT && tar czf mosaic_logs.tgz mosaic[0-5].txt && rm mosaic[0-5].txt)
fi
