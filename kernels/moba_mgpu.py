"""MoBA on Hopper in Pallas Mosaic GPU (TMA, wgmma, a producer warpgroup): the forward and dQ row
tiles and the dK/dV key tiles; `pallas_gpu`'s default there (16-bit inputs, head_dim 64 or 128).

The same work as `moba_gpu._fwd_kernel` and `moba_gpu._dq_kernel` (docs/kernel_notes.md: one row
tile of the routing layout streams the one key range its rows share; partial rows in the inputs'
dtype, merged or summed per query in float32 by the caller), written for the H100/H200's tensor
cores the way FlashAttention-3 is (`_row_tiles` is the scaffold both share):

* persistent CTAs, one per SM, taking the routing's 128-row tiles in snake rounds; three warpgroups:
  two compute warpgroups (64 rows each) and a producer that streams each tile's keys and values
  into a ring of SMEM slots by TMA (the ring runs on across tiles) and loads the next tile's rows
  into the second of two buffers; mbarriers only (no `__syncthreads`);
* wgmma with SMEM operands (P and dS from registers), softmax in the exp2 domain;
* the row matrices (Q, dO) are gathered by the producer itself, row by row from the caller's
  [B, T, H, D] into the swizzled SMEM tiles by cp.async (`Rows`, `_gather_into_smem`: TMA on
  Hopper cannot gather rows), so no [BK, R, D] copy of them exists in HBM (the caller's XLA
  gathered them before 2026-12-03: 0.14 ms of 1.38 at 8K, 0.76 of 4.20 at 16K block 128 top-8,
  and two such buffers in the backward's peak); K and V are read in place from [B, T, K, D] by
  strided TMA boxes (keys past T are zero-filled by TMA and masked;
  a key axis off the 8-key grid gets zero keys appended);
* key chunks that every row of the tile sees whole (`free_chunks`: all of a sparse tile's block,
  a dense tile's chunks before the diagonal) skip the mask; the rest are masked per row by
  [lo, hi).

Limits (`refusal` says which, one line): 16-bit q/k/v, head_dim 64 or 128, a 128-row routing tile.
Interpret mode (`InterpretGPUParams`) needs JAX's Mosaic GPU interpreter with TMA and barriers
(jax >= 0.11); it has no rule for `pl.run_state` accumulators nor for a wgmma whose left operand
is in registers, so interpreted runs form P V and dS K with a dot of the same operands
(`_mma_add`), nor for inline PTX, so interpreted runs read rows that XLA gathered (`Rows`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, llvm

from moba_jax.kernels import _routing as rt

ROWS = 128  # the routing tile: two compute warpgroups of 64 rows
WG_ROWS = 64
NEG = -1e30  # finite: a row that has seen no visible key yet keeps l = 0 and acc = 0 (p = 0)
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
SMEM_BYTES = 227 * 1024  # the H100/H200's dynamic shared memory per CTA
# Registers a thread of a compute warpgroup and of the producer holds after `setmaxnreg`
# (multiples of 8; 2 x compute + producer <= 512, the 65,536 registers of a CTA of three
# warpgroups over 128 threads); ptxas allocates each side within its count. Measured on the H200
# (run 31, docs/kernel_notes.md): the dK/dV at 240 and 24 (FlashAttention-3's split) spilled 196
# bytes where 232 and 40 spilled 348, and ran 5% faster at 32K block 512, 3% at 128K block
# 4096 (since run 32 it spills none: its row vectors are read where used). The row-tile
# kernels' producer (two tiles' indices, row vectors, the K/V rings, the row gathers) does not
# fit 24: at 240 and 24 the dQ spilled 300 bytes (88 at 232 and 40) and ran 26% slower, the
# forward 60 (0) and 2% slower; at 240 and 32 (run 32) the dQ spilled 240, the forward 16. So
# they keep 232 and 40.
ROW_TILE_REGISTERS = (232, 40)
DKDV_REGISTERS = (240, 24)


def interpreter_available() -> bool:
  """Whether this JAX can interpret a Mosaic GPU kernel with TMA and barriers (jax >= 0.11; the
  interpreter of 0.10 stops at `copy_gmem_to_smem` + `barrier_wait`)."""
  return hasattr(plgpu, "InterpretGPUParams")


def on_hopper() -> bool:
  """Whether JAX's first device is a Hopper GPU (sm_90: wgmma, the kernels' matrix instruction)."""
  device = jax.devices()[0]
  major = str(getattr(device, "compute_capability", "")).split(".")[0]
  return device.platform == "gpu" and major == "9"


CHECKED_JAX = (0, 11)  # the oldest JAX under which these kernels ran compiled and passed (H200)


def is_default_here() -> bool:
  """Whether they are `pallas_gpu`'s default here: a Hopper GPU and a JAX they were checked
  under compiled (jax 0.10 lowers them, in CI, but never ran them on a GPU)."""
  return on_hopper() and tuple(jax.__version_info__[:2]) >= CHECKED_JAX


def refusal(dtype, head_dim, block_q, interpret=False) -> str | None:
  """Why this kernel cannot run a case (None: it can)."""
  if interpret and not interpreter_available():
    return (f"the Mosaic GPU kernels cannot be interpreted by jax {jax.__version__} (its "
            "interpreter has no TMA and barriers; jax >= 0.11 has)")
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"the Mosaic GPU kernels take bfloat16 or float16 (wgmma), got {jnp.dtype(dtype).name}"
  if head_dim not in (64, 128):
    return f"the Mosaic GPU kernels take head_dim 64 or 128, got {head_dim}"
  if block_q != ROWS:
    return f"the Mosaic GPU kernels need block_q={ROWS} (two warpgroups of 64 rows), got {block_q}"
  return None


def ring_depths(block_kv: int, head_dim: int, itemsize: int = 2, mats: int = 1,
                keys_held: bool = False) -> tuple[int, int]:
  """Slots of the key ring and of the value ring that fit beside `mats` double-buffered row
  matrices (Q; Q and dO for dQ: 128 rows each), the row vectors and the row index ring (two
  tiles of int32): as many of each (2 to 4), and with keys_held (a step that releases each
  chunk's keys one chunk after its values: the overlapped dQ, which holds two chunks' keys) one
  key slot more where it fits, so that the next chunk's keys load while two are held."""
  fixed = 2 * mats * ROWS * head_dim * itemsize + 10 * ROWS * 4 + 2 * ROWS * 4
  room = SMEM_BYTES - fixed - 4096
  slot = block_kv * head_dim * itemsize  # one ring's slot
  both = max(2, min(4, room // (2 * slot)))
  return both + int(keys_held and room >= (2 * both + 1) * slot), both


def _transpose(ref):
  return ref.transpose((1, 0)) if hasattr(ref, "transpose") else plgpu.transpose_ref(ref, (1, 0))


_LOAD_TAKES_IDX = "idx" in inspect.signature(plgpu.load).parameters and (
    inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty)


def _load(ref, layout):
  if _LOAD_TAKES_IDX:  # jax 0.10: load(ref, idx, layout=...)
    return plgpu.load(ref, (), layout=layout)
  return plgpu.load(ref, layout=layout)


def _mma_add(acc, a, b, interpret):
  """acc + a @ b on the tensor cores (a: registers or SMEM, b: SMEM)."""
  if interpret:  # no interpreter rule for pl.run_state, nor for wgmma with a in registers
    return acc + jnp.dot(a, b[...], preferred_element_type=jnp.float32)
  return pl.run_state(lambda r: plgpu.wgmma(r, a, b))(plgpu.ACC.init(acc))


def _tiled(shape, dtype):
  itemsize = jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 128 // itemsize)),
                                              plgpu.SwizzleTransform(128)))


class Rows(NamedTuple):
  """A row matrix of the routing's order that the kernels gather themselves: row r of (batch,
  kv head) bk is x[index[bk, r]]. Compiled, each tile's rows go from x straight into the
  swizzled SMEM (`_gather_into_smem`): no [BK, R, D] copy in HBM. Interpreted (the interpreter
  has no rule for the inline PTX), XLA gathers them first (`gathered`) and TMA loads the tiles."""
  x: jax.Array  # [N, D] 16-bit: q or dO as [B * T * H, D]
  index: jax.Array  # [BK, R] int32 rows of x

  @property
  def shape(self):
    return self.index.shape + self.x.shape[-1:]

  @property
  def dtype(self):
    return self.x.dtype

  def gathered(self):  # [BK, R, D]
    return self.x[self.index]


def rows_of(x, rq, kv_heads, groups, kv_head0=0) -> Rows:
  """The routing's rows of x [B, T, H, D]: row r of (batch, kv head) bk is query row rq[bk, r] =
  t * G + g of kv head kv_head0 + bk % kv_heads (`kv_heads`: this call's, a chunk of x's from
  kv_head0); padding rows (-1) read the head's row t = 0, g = 0 (they are masked)."""
  batch, seq, heads, dim = x.shape
  r = jnp.maximum(rq, 0).reshape(batch, kv_heads, -1)
  t, g = r // groups, r % groups
  bi = jnp.arange(batch, dtype=jnp.int32)[:, None, None]
  ki = jnp.arange(kv_heads, dtype=jnp.int32)[None, :, None] + kv_head0
  index = (bi * seq + t) * heads + ki * groups + g
  return Rows(x.reshape(batch * seq * heads, dim), index.reshape(batch * kv_heads, -1))


_SWIZZLE = 128  # bytes: the SMEM row matrices' swizzle (`_tiled`), 8 rows of 128 bytes an atom
_CHUNK = 16  # bytes a cp.async moves


def _gather_into_smem(srcs, index, dsts):
  """Starts the copies of rows index[0:64] of each src [N, D] (GMEM, 16-bit) into its dst, a
  [64, D] SMEM ref tiled (8, 64) and swizzled 128 bytes (`_tiled`), by cp.async from every
  thread of the calling warpgroup (16 bytes each; a row is read by D / 8 consecutive threads,
  its index read once for every src). index: a [64] int32 ref in GMEM or SMEM. The swizzle is
  the hardware's (16-byte chunk c of a 128-byte row r lands at chunk c ^ (r % 8) of its
  1024-byte atom), so wgmma and TMA read the tile as if TMA had written it. `_commit_gathers`
  closes a group of these, `_gathers_done` waits for groups. Compiled only (inline PTX)."""
  dim = srcs[0].shape[-1]
  row_bytes = dim * jnp.dtype(srcs[0].dtype).itemsize
  per_row = row_bytes // _CHUNK  # chunks in a row: 8 (D = 64) or 16 (D = 128)
  tile_cols = row_bytes // _SWIZZLE  # [8, 64] tiles across a row
  steps = WG_ROWS * per_row // 128  # chunks per thread and src
  transforms = (plgpu.TilingTransform((8, _SWIZZLE // 2)), plgpu.SwizzleTransform(_SWIZZLE))
  n = len(srcs)
  arg_types = (plgpu.RefType(),) * (n + 1) + (plgpu.RefType(transforms),) * n

  @plgpu.inline_mgpu(arg_types=arg_types)
  def copy(_, *refs):
    i32, i64 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64)
    c = lambda v: arith.constant(i32, v)
    tid = arith.remui(mgpu_utils.thread_idx(), c(128))
    x_ptrs = [llvm.ptrtoint(i64, mgpu_utils.memref_ptr(x)) for x in refs[:n]]
    index_ptr = mgpu_utils.memref_ptr(refs[n])
    dst_ptrs = [llvm.ptrtoint(i32, mgpu_utils.memref_ptr(d)) for d in refs[n + 1:]]
    row0, col = arith.divui(tid, c(per_row)), arith.remui(tid, c(per_row))
    # a thread's rows are row0 + j * (128 / per_row): all of one residue mod 8, one swizzle
    swizzled = arith.xori(arith.remui(col, c(8)), arith.remui(row0, c(8)))
    in_atom = arith.addi(arith.muli(arith.remui(row0, c(8)), c(_SWIZZLE)),
                         arith.muli(swizzled, c(_CHUNK)))
    col_bytes = arith.extui(i64, arith.muli(col, c(_CHUNK)))
    rows = []
    for j in range(steps):  # every index first: their loads overlap
      r = arith.addi(row0, c(j * (128 // per_row)))
      at = llvm.getelementptr(index_ptr.type, index_ptr, [r], [-2147483648], i32,
                              llvm.GEPNoWrapFlags.none)
      rows.append((r, llvm.load(i32, at)))
    for r, row in rows:
      src = arith.addi(arith.muli(arith.extsi(i64, row), arith.constant(i64, row_bytes)),
                       col_bytes)
      atom = arith.addi(arith.muli(arith.divui(r, c(8)), c(tile_cols)), arith.divui(col, c(8)))
      dst = arith.addi(arith.muli(atom, c(8 * _SWIZZLE)), in_atom)
      for x_ptr, dst_ptr in zip(x_ptrs, dst_ptrs):
        llvm.inline_asm(ir.Type.parse("!llvm.void"),
                        [arith.addi(dst_ptr, dst), arith.addi(x_ptr, src)],
                        f"cp.async.cg.shared.global [$0], [$1], {_CHUNK};", "r,l",
                        has_side_effects=True)

  copy(*srcs, index, *dsts)


def _commit_gathers():
  """Closes the calling threads' open `_gather_into_smem` copies as one cp.async group."""

  @plgpu.inline_mgpu()
  def commit(_):
    llvm.inline_asm(ir.Type.parse("!llvm.void"), [], "cp.async.commit_group;", "",
                    has_side_effects=True)

  commit()


def _gathers_done(pending=0):
  """Waits for the calling warpgroup's cp.async groups but the `pending` newest and makes them
  visible to wgmma and TMA (the async proxy): each thread waits for its own copies, fences, and
  the warpgroup meets (after which every thread's earlier reads of SMEM are done too). One
  barrier arrival after this publishes the tiles."""

  @plgpu.inline_mgpu()
  def done(_):
    llvm.inline_asm(ir.Type.parse("!llvm.void"), [],
                    f"cp.async.wait_group {pending};\n\tfence.proxy.async.shared::cta;", "",
                    has_side_effects=True)
    mgpu_utils.warpgroup_barrier()

  done()


def free_chunks(ks, ke, lo, hi, rq, block_kv):
  """`_routing.free_chunks` for these kernels: chunks of block_kv keys from the tile's first key
  rounded down to a multiple of 8, as the kernels' TMA boxes start."""
  return rt.free_chunks(ks, ke, lo, hi, rq, block_kv, align=8)


def num_ctas(interpret: bool) -> int:
  """CTAs of the persistent grid: one per SM of the GPU (3 when interpreted: several tiles per
  CTA, as on the GPU)."""
  if interpret:
    return 3
  return int(getattr(jax.devices()[0], "core_count", 0) or 132)


def snake_tile(i, cta, n_ctas: int):
  """The tile a row-tile CTA takes i-th: round i's tiles [i * n_ctas, (i + 1) * n_ctas), dealt
  forward in even rounds and backward in odd ones, the last, partial round included (so it
  pairs with the full round before it; `snake_count` says which CTAs have a tile there). The
  work a tile has repeats with its index (the dense tiles of a block of 512 keys have 1-4
  chunks, in turn), and with 132 CTAs (a multiple of 4) the index order gave a CTA the same
  place in that pattern every round: run 33's trace at 8K b512, CTAs c = 3 mod 4 ran 1.09-1.10x
  the mean span, c = 0 mod 4 0.91-0.92x, and the kernel waits for the busiest. Each round's
  tiles stay the index order's (neighbours share key blocks in L2); only their CTAs are
  mirrored. Measured on the H200 (run 34): the forward -7.5 / -9.3 / -12.7% and the dQ -10.1 /
  -12.3 / -14.6% at 8K / 32K / 128K, block 512 top-3."""
  return i * n_ctas + jnp.where(lax.rem(i, 2) == 1, n_ctas - 1 - cta, cta)


def snake_count(cta, n_ctas: int, items: int):
  """How many of `items` tiles CTA `cta` takes in `snake_tile`'s order: every full round's one,
  and the partial round's if its place there holds a tile (the first items % n_ctas CTAs when
  that round runs forward, the last ones when it runs backward)."""
  full, rem = divmod(items, n_ctas)
  there = (cta < rem) if full % 2 == 0 else (cta >= n_ctas - rem)
  return jnp.int32(full) + there.astype(jnp.int32)


def balanced_order(work, n_ctas: int, n_real=None):
  """The order the persistent CTAs take their items in: CTA c's i-th item is order[c + i n_ctas].

  work [N] (an item's row chunks, + 1 for its fixed cost): items sorted by work, largest first
  (stable: items of equal work, e.g. the key tiles of one block, stay neighbours, as L2 likes),
  dealt out in snake rounds (round r runs CTA 0..C-1 when r is even, C-1..0 when odd; the last,
  partial round forward). In the index order CTA c took items c, c + C, ... of one stride, which
  for the dK/dV at 8K, block 512 gave the busiest CTA 1.68x the mean work (sorted snake: 1.04;
  measured 0.511 -> 0.352 ms on the H200, docs/kernel_notes.md). The row tiles of the forward
  and dQ keep the index order, in snake rounds (`_row_tiles`): this order measured 2-10% slower
  there.
  n_real (an int32 scalar, may be traced): only the first n_real items by work are dealt (the
  rest, of work 0, are padding the kernel never takes: `dkdv_pieces`); the rounds are those of
  the n_real items, which then take the first n_real places."""
  n = work.shape[0]
  order = jnp.argsort(-work, stable=True).astype(jnp.int32)
  if n_real is None:
    full = n // n_ctas * n_ctas
    if full == 0:
      return order
    rounds = order[:full].reshape(-1, n_ctas)
    odd = (jnp.arange(rounds.shape[0]) % 2 == 1)[:, None]
    rounds = jnp.where(odd, rounds[:, ::-1], rounds)
    return jnp.concatenate([rounds.reshape(-1), order[full:]])
  place = jnp.arange(n, dtype=jnp.int32)
  rnd, col = place // n_ctas, place % n_ctas
  back = (rnd < n_real // n_ctas) & (rnd % 2 == 1)  # a full round of real items, run backward
  return order[jnp.where(back, rnd * n_ctas + n_ctas - 1 - col, place)]


class _Slot:
  """One step's K/V ring slots, as the consumer's step function sees them: wait for its keys or
  values, and release them once read (both compute warpgroups must release a slot). The key and
  value rings may differ in depth (`ring_depths`): chunk `count` has slot count % depth of each."""

  def __init__(self, count, depths, k_smem, v_smem, bars, frees):
    self._at = tuple(lax.rem(count, jnp.int32(d)) for d in depths)
    self.k, self.v = k_smem.at[self._at[0]], v_smem.at[self._at[1]]
    self._bars, self._frees = bars, frees
    self._ring = (count, depths, k_smem, v_smem, bars, frees)

  def shifted(self, d):
    """The slots of the chunk d chunks later (earlier for d < 0) in the ring's order."""
    count, *rest = self._ring
    return _Slot(count + d, *rest)

  def wait_k(self):
    plgpu.barrier_wait(self._bars[0].at[self._at[0]])

  def wait_v(self):
    plgpu.barrier_wait(self._bars[1].at[self._at[1]])

  def free_k(self):
    plgpu.barrier_arrive(self._frees[0].at[self._at[0]])

  def free_v(self):
    plgpu.barrier_arrive(self._frees[1].at[self._at[1]])


def _pad_keys(x, length):
  """x [B, T, K, D] with zero keys appended up to `length` keys (they are masked): TMA boxes into
  the (8, x)-tiled SMEM need a key axis that is a multiple of 8 long."""
  extra = length - x.shape[1]
  return jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0))) if extra else x


TRACE_ENV = "MOBA_MGPU_TRACE"  # DIR[:RANGES[:REGION,...]]: tools/mgpu_trace.py
# the kernels' regions (`region`): the row tiles' compute warpgroups (rows, unmasked, masked,
# finish, and in it stage, store, store_wait), their producer (next_rows, publish), the dK/dV's
# compute warpgroups (keys, unmasked, masked, finish)
REGIONS = ("rows", "unmasked", "masked", "finish", "stage", "store", "store_wait", "next_rows",
           "publish", "keys")


def _trace_spec():
  """(DIR, RANGES, the named regions or None for all) of MOBA_MGPU_TRACE, or None unset."""
  spec = os.environ.get(TRACE_ENV, "")
  if not spec:
    return None
  path, ranges, names = (spec.split(":", 2) + ["", ""])[:3]
  return path, int(ranges or 256), frozenset(names.split(",")) if names else None


def trace_params() -> dict:
  """Mosaic GPU's on-device profiler, for tools/mgpu_trace.py: with
  MOBA_MGPU_TRACE=DIR[:RANGES[:REGION,...]] set when a kernel is traced, each warpgroup records
  the clock at the start and end of the kernels' regions (`region`; only the named ones where
  REGION,... is given) (up to RANGES, default 256, a warpgroup: 16 bytes of SMEM each; past
  that jax >= 0.11 cuts the trace, while jax 0.10, which has no bounds check, would write past
  the buffer) and every call writes a Perfetto trace into DIR. The recording costs a few
  instructions a region; for measuring where a kernel's time goes, not for timing it. Without
  the variable the regions lower to nothing."""
  spec = _trace_spec()
  if spec is None:
    return {}
  path, ranges, _ = spec
  params = dict(profile_space=ranges, profile_dir=path)
  if "profile_bounds_check" in inspect.signature(plgpu.CompilerParams).parameters:  # jax >= 0.11
    params["profile_bounds_check"] = True
  return params


def region(name: str):
  """A named region of the kernels for the on-device trace (`trace_params`): `jax.named_scope`,
  which lowers to nothing untraced, unless the trace names its regions and this is not one of
  them (fewer regions a tile: a warpgroup's trace holds RANGES of them)."""
  assert name in REGIONS, name
  spec = _trace_spec()
  if spec is not None and spec[2] is not None and name not in spec[2]:
    return contextlib.nullcontext()
  return jax.named_scope(name)


def _kernel(body, name, out_type, n_ctas, interpret):
  """A persistent Mosaic GPU kernel: n_ctas CTAs of three warpgroups ("cta", "wg"). `pl.kernel`
  (not `plgpu.kernel`: under jax 0.10 its batching wrapper took no `jax.new_ref` operand, which
  the forward and dQ used before their rows were gathered in the kernel)."""
  mesh = plgpu.Mesh(grid=(n_ctas,), grid_names=("cta",), num_threads=3, thread_name="wg")
  trace = {} if interpret else trace_params()
  kwargs = {"interpret": plgpu.InterpretGPUParams()} if interpret else {
      "compiler_params": plgpu.CompilerParams(approx_math=True, **trace)}
  return pl.kernel(body, out_type=out_type, mesh=mesh, name=name, **kwargs)


def _mat_operands(mats, interpret):
  """The kernel operands of row matrices (`Rows` of one routing, one index): compiled, each one's
  source and then the shared index (the producer gathers the rows); interpreted, the rows
  gathered by XLA."""
  if interpret:
    return tuple(m.gathered() for m in mats)
  assert all(m.index is mats[0].index for m in mats), "row matrices must share their index"
  return tuple(m.x for m in mats) + (mats[0].index,)


def _issue_mats(refs, index, dsts, bars, interpret):
  """The producer's load of one 64-row piece of every row matrix into dsts (SMEM, one a
  matrix). Interpreted: refs are the gathered rows' [64, D] pieces, one TMA box each, which
  arrives on its barrier in bars. Compiled: refs are the sources, index the piece's [64] rows
  (GMEM or SMEM); the warpgroup starts the gathers (`_gather_into_smem`), and the caller
  commits them and later publishes them (`_publish`)."""
  if interpret:
    for src, dst, bar in zip(refs, dsts, bars):
      plgpu.copy_gmem_to_smem(src, dst, bar)
  else:
    _gather_into_smem(refs, index, dsts)


def _publish(bars, pending=0):
  """Compiled: waits for the gathers but the `pending` newest groups and arrives on bars."""
  _gathers_done(pending)
  for bar in bars:
    plgpu.barrier_arrive(bar)


def _row_tiles(name, *, ks, ke, nfree, mats, vecs, k, v, block_kv, init, step, finish, out_type,
               interpret, ctas, kv_head0=0, first=None, last=None, keys_held=False):
  """A persistent row-tile kernel: `ctas` CTAs (default `num_ctas`) take the BK * NT tiles in
  rounds of one tile each, dealt forward and backward in turn (consecutive CTAs, consecutive tiles
  of one kv head: neighbours share key blocks in L2). Three warpgroups: two compute (64 rows
  each), one producer whose ring of K/V slots runs on across tiles and which loads tile i + 1's
  rows into the second of two buffers while tile i computes: after tile i's second keys are issued
  (its first, if it has one chunk) it waits for tile i - 1's end, starts tile i + 1's gathers, and
  publishes them after tile i + 1's first keys, so the gathers' latency (index loads, then the
  copies) stays off the key ring.

  mats: row matrices (`Rows` of one index, 16-bit) the compute warpgroups read from SMEM (wgmma
  operands): gathered by the producer from their sources (compiled) or gathered by XLA and
  loaded by TMA (interpreted); vecs: row vectors [BK, R] (lo and hi first) they read into
  registers. Per tile and warpgroup:
  carry = init(vecs); carry = step(carry, s, mats_smem, slot: _Slot, kpos, vecs, masked) for each
  key chunk s (kpos: the chunk's first key position, an int32 scalar, for `_row_mask`); then
  finish(carry, vecs, outs, bk, r0, stage, lse_smem) writes the outputs by TMA from staging
  buffers: stage, the warpgroup's [64, D] SMEM of the first row matrix (read by then), and
  lse_smem, a [64] float32 buffer. With `first` (a step function) chunk 0 runs through it,
  masked, and `last(carry, slot)` runs after a tile's last chunk with that chunk's slot (neither
  runs in a tile without keys): for steps that finish the previous chunk's work (the
  forward's P V one chunk behind its S = Q K^T, the dQ's dS K one chunk behind its S and dP).
  keys_held: the steps release each chunk's keys one chunk after its values (the overlapped
  dQ): the key ring takes a slot more where it fits (`ring_depths`).

  kv_head0: the rows are those of kv heads [kv_head0, kv_head0 + BK / B) of k and v (a chunk of
  the heads; row matrix index bk = b * (BK / B) + local head)."""
  bk_n, rows, dim = mats[0].shape
  k, v = (_pad_keys(x, -(-x.shape[1] // 8) * 8) for x in (k, v))
  kv_heads = bk_n // k.shape[0]  # of this call (a chunk of k's heads from kv_head0)
  n_tiles = rows // ROWS
  items = bk_n * n_tiles
  n_ctas = min(items, ctas or num_ctas(interpret))
  dtype = mats[0].dtype
  bkv = block_kv
  depths = ring_depths(bkv, dim, jnp.dtype(dtype).itemsize, len(mats), keys_held)
  row_layout = plgpu.Layout.WGMMA.reduce(1)
  mat_args = _mat_operands(mats, interpret)
  n_in, n_mats, n_vecs = 3 + len(mat_args) + len(vecs) + 2, len(mats), len(vecs)

  def kernel(*refs):
    ks_ref, ke_ref, nf_ref = refs[:3]
    mat_refs = refs[3:3 + len(mat_args)]
    vec_refs = refs[3 + len(mat_args):n_in - 2]
    k_ref, v_ref = refs[n_in - 2:n_in]
    outs = refs[n_in:-1]
    (mat_smem, vec_smem, k_smem, v_smem, lse_smem, *idx_smem), \
        (mat_bars, vec_bars, kv_bars, *idx_bars), frees = refs[-1]
    idx_smem, idx_bars = (None, None) if interpret else (idx_smem[0], idx_bars[0])
    q_free, k_free, v_free = frees
    cta, wg = lax.axis_index("cta"), lax.axis_index("wg")
    my_items = snake_count(cta, n_ctas, items)

    def item(i):  # the i-th tile of this CTA: (bk, tile, first key (a multiple of 8), chunks)
      w = snake_tile(i, cta, n_ctas)
      bk, tile = lax.div(w, jnp.int32(n_tiles)), lax.rem(w, jnp.int32(n_tiles))
      # TMA boxes into the (8, x)-tiled SMEM start on a multiple of 8 rows: keys before the
      # tile's first one are masked like any other invisible key.
      ks = lax.div(ks_ref[bk, tile], jnp.int32(8)) * 8
      n = jnp.maximum(lax.div(ke_ref[bk, tile] - ks + (bkv - 1), jnp.int32(bkv)), 0)
      return bk, tile, ks, n

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(ROW_TILE_REGISTERS[0], action="increase")

      def tile_rows(i, g):
        bk, tile, ks, n = item(i)
        buf = lax.rem(i, 2)
        mine = buf * 2 + wg
        with region("rows"):
          for bars in mat_bars + vec_bars:
            plgpu.barrier_wait(bars.at[mine])
        mats_w = [m.at[mine] for m in mat_smem]
        vecs_w = [_load(x.at[mine], row_layout) for x in vec_smem]

        def chunk(s, carry, masked, fn=step):
          slot = _Slot(g + s, depths, k_smem, v_smem, kv_bars, (k_free, v_free))
          return fn(carry, s, mats_w, slot, ks + s * bkv, vecs_w, masked)

        nf = jnp.minimum(nf_ref[bk, tile], n)
        if first is None:
          carry = init(vecs_w)
          with region("unmasked"):
            carry = lax.fori_loop(0, nf, functools.partial(chunk, masked=False), carry)
          with region("masked"):
            carry = lax.fori_loop(nf, n, functools.partial(chunk, masked=True), carry)
        else:  # loops of 0 or 1 step, not branches: no wgmma under an scf.if
          one = jnp.minimum(n, 1)
          carry = lax.fori_loop(0, one, functools.partial(chunk, masked=True, fn=first),
                                init(vecs_w))
          carry = lax.fori_loop(one, jnp.maximum(nf, one), functools.partial(chunk, masked=False),
                                carry)
          carry = lax.fori_loop(jnp.maximum(nf, one), n, functools.partial(chunk, masked=True),
                                carry)
          end = _Slot(g + n - 1, depths, k_smem, v_smem, kv_bars, (k_free, v_free))
          carry = lax.fori_loop(0, one, lambda _, c: last(c, end), carry)
        # The rows are read: their first matrix's SMEM stages the outputs for a TMA store, which
        # must have left it (and lse_smem) before the producer may refill this buffer.
        with region("finish"):
          finish(carry, vecs_w, outs, bk, tile * ROWS + wg * WG_ROWS, mats_w[0],
                 lse_smem.at[wg])
          with region("store_wait"):
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          plgpu.barrier_arrive(q_free.at[buf])
        return g + n

      lax.fori_loop(0, my_items, tile_rows, jnp.int32(0))
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(ROW_TILE_REGISTERS[1], action="decrease")
      src_refs, index_ref = (mat_refs, None) if interpret else (mat_refs[:-1], mat_refs[-1])

      def fetch_index(i):  # compiled: tile i's 128 row indices into index slot i % 2, by TMA
        @pl.when(i < my_items)
        def _():
          bk, tile, _, _ = item(i)
          at = lax.rem(i, 2)
          plgpu.copy_gmem_to_smem(index_ref.at[bk, pl.ds(tile * ROWS, ROWS)], idx_smem.at[at],
                                  idx_bars.at[at])

      def issue_rows(i):
        """Tile i's rows into buffer i % 2: row vectors by TMA; row matrices gathered through
        the indices `fetch_index` brought (one cp.async group, published by `publish_rows`) or,
        interpreted, by TMA."""
        bk, tile, _, _ = item(i)
        buf = lax.rem(i, 2)
        if not interpret:
          plgpu.barrier_wait(idx_bars.at[buf])
        for w in range(2):
          at, r = buf * 2 + w, pl.ds(tile * ROWS + w * WG_ROWS, WG_ROWS)
          for src, dst, bars in zip(vec_refs, vec_smem, vec_bars):
            plgpu.copy_gmem_to_smem(src.at[bk, r], dst.at[at], bars.at[at])
          srcs = [x.at[bk, r] for x in src_refs] if interpret else src_refs
          index = None if interpret else idx_smem.at[buf, pl.ds(w * WG_ROWS, WG_ROWS)]
          _issue_mats(srcs, index, [m.at[at] for m in mat_smem], [b.at[at] for b in mat_bars],
                      interpret)
        if not interpret:
          _commit_gathers()

      def publish_rows(i):
        """Compiled: tile i's gathers (the only ones in flight), then tile i + 2's indices into
        the slot those gathers read (the publication's barrier ordered the reads first)."""
        if not interpret:
          with region("publish"):
            buf = lax.rem(i, 2)
            _publish([b.at[buf * 2 + w] for w in range(2) for b in mat_bars])
            fetch_index(i + 2)

      def next_rows(i):
        """Tile i + 1's rows, as soon as tile i - 1 freed their buffer: they land while tile i
        computes (their indices are in SMEM already: only the copies' latency is left)."""
        @pl.when(i + 1 < my_items)
        def _():
          with region("next_rows"):
            @pl.when(i >= 1)
            def _():
              plgpu.barrier_wait(q_free.at[lax.rem(i + 1, 2)])  # both warpgroups left tile i - 1

            issue_rows(i + 1)

      if not interpret:
        fetch_index(0)
        fetch_index(1)
      issue_rows(0)

      def tile_loads(i, g):
        bk, _, ks, n = item(i)
        b = lax.div(bk, jnp.int32(kv_heads))
        kvh = lax.rem(bk, jnp.int32(kv_heads)) + kv_head0

        def load(s, _):
          at = (b, pl.ds(ks + s * bkv, bkv), kvh)
          # the slot's previous keys, then values, consumed by both warpgroups (apart: the
          # overlapped forward releases a chunk's values one chunk after its keys, the
          # overlapped dQ its keys one chunk after its values)
          for free, src, dst, bar, d in ((k_free, k_ref, k_smem, kv_bars[0], depths[0]),
                                         (v_free, v_ref, v_smem, kv_bars[1], depths[1])):
            slot = lax.rem(g + s, jnp.int32(d))
            pl.when(g + s >= d)(lambda free=free, slot=slot: plgpu.barrier_wait(free.at[slot]))
            plgpu.copy_gmem_to_smem(src.at[at], dst.at[slot], bar.at[slot])

          @pl.when(s == 0)
          def _():  # gathered while tile i - 1 computed
            publish_rows(i)

          # after the tile's second keys (its first if it has one chunk): by then tile i - 1's
          # last keys were released, so its end is near and the wait for it short
          @pl.when(s == jnp.minimum(1, n - 1))
          def _():
            next_rows(i)

        lax.fori_loop(0, n, load, None)

        @pl.when(n == 0)
        def _():  # a tile without keys
          publish_rows(i)
          next_rows(i)

        return g + n

      g_end = lax.fori_loop(0, my_items, tile_loads, jnp.int32(0))
      # Drain: observe the releases of the last keys and rows (no barrier phase left unseen when
      # the barriers go; the CTA ends after every SMEM read).
      for free, d in ((k_free, depths[0]), (v_free, depths[1])):
        for j in range(d):
          gs = g_end - d + j
          pl.when(gs >= 0)(lambda gs=gs, free=free, d=d:
                           plgpu.barrier_wait(free.at[lax.rem(gs, jnp.int32(d))]))

      for j in (2, 1):
        @pl.when(my_items >= j)
        def _():
          plgpu.barrier_wait(q_free.at[lax.rem(my_items - j, 2)])

  def body(*refs):
    scratch = (
        tuple(_tiled((4, WG_ROWS, dim), dtype) for _ in mats),  # (buffer, warpgroup) -> 64 rows
        tuple(plgpu.SMEM((4, WG_ROWS), x.dtype) for x in vecs),
        _tiled((depths[0], bkv, dim), dtype),
        _tiled((depths[1], bkv, dim), dtype),
        plgpu.SMEM((2, WG_ROWS), jnp.float32),
    ) + (() if interpret else (plgpu.SMEM((2, ROWS), jnp.int32),))  # the index ring
    four = plgpu.Barrier(num_barriers=4)
    rings = tuple(plgpu.Barrier(num_barriers=d) for d in depths)
    bars = ((four,) * n_mats, (four,) * n_vecs, rings) + (
        () if interpret else (plgpu.Barrier(num_barriers=2),))
    frees = (plgpu.Barrier(num_arrivals=2, num_barriers=2),
             *(plgpu.Barrier(num_arrivals=2, num_barriers=d) for d in depths))
    pl.run_scoped(lambda *sc: kernel(*refs, sc), scratch, bars, frees, collective_axes="wg")

  return _kernel(body, name, tuple(out_type), n_ctas, interpret)(
      ks, ke, nfree, *mat_args, *vecs, k, v)


def _visible(kpos, lo, hi, shape, axis):
  """Which keys of a chunk each row sees: key kpos + j (j along `axis` of `shape`) is visible to
  a row with [lo, hi) (vectors along the other axis) when j - (lo - kpos) lies in [0, hi - lo):
  one subtraction and one unsigned compare an element (two compares and an and before; run
  33's trace: a masked chunk of the forward took 1.5x an unmasked one)."""
  j = plgpu.broadcasted_iota(jnp.int32, shape, axis, layout=plgpu.Layout.WGMMA)
  vec = lambda x: lax.broadcast_in_dim(x, shape, [1 - axis])
  off = (j - vec(lo - kpos)).astype(jnp.uint32)  # negative below lo: past any width
  return off < vec(jnp.maximum(hi - lo, 0)).astype(jnp.uint32)


def _row_mask(kpos, lo, hi, cols):
  """[64, cols]: row r sees key kpos + j (`_visible` along the columns)."""
  return _visible(kpos, lo, hi, (WG_ROWS, cols), 1)


def _zeros_rows(dim, fill=0.0):
  return plgpu.layout_cast(jnp.full((WG_ROWS, dim), fill, jnp.float32), plgpu.Layout.WGMMA)


def _row_vector(fill):
  return plgpu.layout_cast(jnp.full((WG_ROWS,), fill, jnp.float32),
                           plgpu.Layout.WGMMA.reduce(1))


def _scores(q_w, slot):
  """S = Q K^T [64, Bk] float32 on wgmma (the caller releases the keys once read)."""
  slot.wait_k()

  def qk_fn(acc_ref):
    plgpu.wgmma(acc_ref, q_w, _transpose(slot.k))
    return acc_ref[...]

  return pl.run_scoped(qk_fn, plgpu.ACC((WG_ROWS, slot.k.shape[0]), jnp.float32))


def forward_rows(ks, ke, nfree, lo, hi, q_rows, k, v, *, scale, block_kv, interpret=False,
                 ctas=None, kv_head0=0, overlap=False):
  """Partial rows of every routing tile: o [BK, R, D] in q_rows' dtype (normalized, rounded
  once, as the official MoBA's partial outputs are) and lse [BK, R] float32.

  ks, ke, nfree [BK, NT] int32 (tile key ranges and their unmasked leading chunks); lo, hi
  [BK, R] int32 (each row's visible keys); q_rows (`Rows`, `rows_of` q); k, v [B, T, K, D] in
  q_rows' dtype. Online softmax in the exp2 domain (the running max m in units of S x scale x
  log2(e): each probability is one fused multiply-add and an exp2); P V with P from registers.

  overlap (compiled only; interpreted runs take the plain step): FlashAttention-3's
  intra-warpgroup overlap, each chunk's S = Q K^T issued with the previous chunk's P V and its
  softmax run while P V is in flight. Measured on the H200 (run 29): the forward -9% at block
  4096 (32 key chunks a tile), -7% at 2048, -6% at 1024, +3% at 512 (4 chunks: the peeled first
  and last chunks cost more than the overlap gives); `BlockSizes.mosaic_overlap_block` is the
  callers' switch."""
  overlap = overlap and not interpret
  bk_n, rows, dim = q_rows.shape
  dtype = q_rows.dtype
  qk_scale = scale * LOG2E

  def softmax(x, m, l, kpos, vecs, masked):
    """One chunk's online softmax on S (x): the new max, alpha, row sums and P (float32)."""
    if masked:  # -inf, not NEG: exp2(-inf - m) = 0 with m >= NEG finite, so p needs no mask
      x = jnp.where(_row_mask(kpos, *vecs, x.shape[1]), x, -jnp.inf)
    m_new = jnp.maximum(m, x.max(axis=1) * qk_scale)  # max(S) c = max(S c) for c > 0
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(x * qk_scale - lax.broadcast_in_dim(m_new, x.shape, [0]))
    return m_new, alpha, l * alpha + p.sum(axis=1), p

  def init(_):  # acc, m, l (and, overlapped, the P that the next chunk's P V takes)
    carry = _zeros_rows(dim), _row_vector(NEG), _row_vector(0.0)
    if overlap:
      carry += (plgpu.layout_cast(jnp.zeros((WG_ROWS, block_kv), dtype), plgpu.Layout.WGMMA),)
    return carry

  def step(carry, s, mats, slot, kpos, vecs, masked):
    """S, its softmax and P V in turn."""
    acc, m, l = carry
    x = _scores(mats[0], slot)
    slot.free_k()
    m, alpha, l, p = softmax(x, m, l, kpos, vecs, masked)
    acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
    slot.wait_v()
    acc = _mma_add(acc, p.astype(dtype), slot.v, interpret)
    slot.free_v()
    return acc, m, l

  def first(carry, s, mats, slot, kpos, vecs, masked):
    """Compiled, a tile's chunk 0: S and its softmax (acc is still zero); P V in the next step."""
    acc, m, l, _ = carry
    x = _scores(mats[0], slot)
    slot.free_k()
    m, _, l, p = softmax(x, m, l, kpos, vecs, masked)
    return acc, m, l, p.astype(dtype)

  def overlapped(carry, s, mats, slot, kpos, vecs, masked):
    """Compiled, chunks 1..: S of this chunk and the last chunk's P V issued together; this
    chunk's softmax runs while the tensor cores do P V (FlashAttention-3's intra-warpgroup
    overlap), then acc is rescaled once P V is done."""
    acc, m, l, p_prev = carry
    prev = slot.shifted(-1)
    slot.wait_k()
    prev.wait_v()

    def body(refs):
      acc_ref, m_ref, l_ref, p_ref, alpha_ref = refs

      def scores(s_ref):
        plgpu.wgmma(s_ref, mats[0], _transpose(slot.k))
        plgpu.wgmma(acc_ref, p_prev, prev.v)
        return plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # S done, P V in flight

      x = pl.run_scoped(scores, plgpu.ACC((WG_ROWS, slot.k.shape[0]), jnp.float32))
      slot.free_k()
      m_ref[...], alpha_ref[...], l_ref[...], p_ref[...] = softmax(x, m, l, kpos, vecs, masked)

    p0 = plgpu.layout_cast(jnp.zeros(p_prev.shape, jnp.float32), plgpu.Layout.WGMMA)
    acc, m, l, p, alpha = pl.run_state(body)((plgpu.ACC.init(acc), m, l, p0, m))
    prev.free_v()
    # P V is done: the next P V's 16-bit operand is made here, outside the wgmma pipeline stage
    # (ptxas serializes the kernel's wgmmas when a non-wgmma instruction defines a wgmma input
    # register inside a stage: its C7513 report, run 29)
    return acc * lax.broadcast_in_dim(alpha, acc.shape, [0]), m, l, p.astype(dtype)

  def last(carry, slot):
    """Compiled: the tile's last P V."""
    acc, m, l, p16 = carry
    slot.wait_v()
    acc = _mma_add(acc, p16, slot.v, interpret)
    slot.free_v()
    return acc, m, l, p16

  def finish(carry, vecs, outs, bk, r0, stage, lse_smem):
    acc, m, l = carry[:3]
    o_ref, lse_ref = outs
    with region("stage"):
      ok = l > 0
      l_safe = jnp.where(ok, l, 1.0)
      inv = 1.0 / l_safe  # one division a row, then products
      stage[...] = (acc * lax.broadcast_in_dim(inv, acc.shape, [0])).astype(dtype)
      lse_smem[...] = jnp.where(ok, m * LN2 + jnp.log(l_safe), -jnp.inf)
    with region("store"):
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(stage, o_ref.at[bk, pl.ds(r0, WG_ROWS)])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bk, pl.ds(r0, WG_ROWS)])

  out_type = (jax.ShapeDtypeStruct((bk_n, rows, dim), dtype),
              jax.ShapeDtypeStruct((bk_n, rows), jnp.float32))
  hooks = dict(step=overlapped, first=first, last=last) if overlap else dict(step=step)
  return _row_tiles("moba_mgpu_fwd", ks=ks, ke=ke, nfree=nfree, mats=(q_rows,), vecs=(lo, hi),
                    k=k, v=v, block_kv=block_kv, init=init, finish=finish, out_type=out_type,
                    interpret=interpret, ctas=ctas, kv_head0=kv_head0, **hooks)


def dq_rows(ks, ke, nfree, lo, hi, lse2, delta, q_rows, do_rows, k, v, *, scale, block_kv,
            interpret=False, ctas=None, kv_head0=0, overlap=False):
  """dQ of every partial row: [BK, R, D] in q_rows' dtype (summed per query, in float32, by the
  caller; the official MoBA also adds 16-bit dQ parts).

  lse2, delta [BK, R] float32: each row's query's merged log-sum-exp in base 2 (lse * log2(e);
  +inf for padding rows: p = 0) and rowsum(dO * O); q_rows, do_rows (`Rows` of q and dO).
  Per key chunk: S = Q K^T, P = exp(S - lse), dP = dO V^T, dS = P (dP - delta), dQ += dS K
  (three wgmma).

  overlap (compiled only; interpreted runs take the plain step): the forward's schedule carried
  over to dQ. Each chunk's S and dP are issued with the previous chunk's dQ += dS K, and the
  chunk's dS is formed while that product is in flight; each chunk's keys are released one chunk
  after its values, so the key ring takes a slot more (`ring_depths`). Measured on the H200 (run
  30): the dQ -1.4% at block 4096 and 1024, -0.3% at 2048, +1.5% at 512 (its three products of
  64 keys, not its exponentials, bound it); `BlockSizes.mosaic_overlap_block` is the callers'
  switch, as for the forward."""
  bk_n, rows, dim = q_rows.shape
  dtype = q_rows.dtype
  qk_scale = scale * LOG2E
  overlap = overlap and not interpret

  def probs(x, kpos, vecs, masked):
    """P = exp(S - lse) of one chunk (float32), from S (x)."""
    lo, hi, lse2, _ = vecs
    p = jnp.exp2(x * qk_scale - lax.broadcast_in_dim(lse2, x.shape, [0]))
    return jnp.where(_row_mask(kpos, lo, hi, p.shape[1]), p, 0.0) if masked else p

  def dscores(p, dp, vecs):
    """dS = P (dP - delta) of one chunk (float32)."""
    return p * (dp - lax.broadcast_in_dim(vecs[3], dp.shape, [0]))

  def init(_):  # dq (and, overlapped, the dS that the next chunk's dQ product takes)
    if overlap:
      return _zeros_rows(dim), plgpu.layout_cast(jnp.zeros((WG_ROWS, block_kv), dtype),
                                                 plgpu.Layout.WGMMA)
    return _zeros_rows(dim)

  def step(dq, s, mats, slot, kpos, vecs, masked):
    p = probs(_scores(mats[0], slot), kpos, vecs, masked)
    slot.wait_v()

    def dp_fn(acc_ref):
      plgpu.wgmma(acc_ref, mats[1], _transpose(slot.v))
      return acc_ref[...]

    dp = pl.run_scoped(dp_fn, plgpu.ACC((WG_ROWS, slot.v.shape[0]), jnp.float32))
    slot.free_v()
    ds = dscores(p, dp, vecs)
    dq = _mma_add(dq, ds.astype(dtype), slot.k, interpret)
    slot.free_k()
    return dq

  def products(slot, mats, then=None):
    """Compiled: S and dP of the slot's chunk issued (then `then`, another wgmma, after them);
    returns S and dP once both are done (`then` may still be in flight)."""
    slot.wait_k()
    slot.wait_v()
    chunk = (WG_ROWS, slot.k.shape[0])

    def issue(s_ref, dp_ref):
      plgpu.wgmma(s_ref, mats[0], _transpose(slot.k))
      plgpu.wgmma(dp_ref, mats[1], _transpose(slot.v))
      if then is not None:
        then()
      x = plgpu.wgmma_accumulator_load(s_ref, wait_n=0 if then is None else 1)
      return x, plgpu.wgmma_accumulator_load(dp_ref, wait_n=None)

    x, dp = pl.run_scoped(issue, plgpu.ACC(chunk, jnp.float32), plgpu.ACC(chunk, jnp.float32))
    slot.free_v()
    return x, dp

  def first(carry, s, mats, slot, kpos, vecs, masked):
    """Compiled, a tile's chunk 0: S, dP and dS (dq is still zero); dS K in the next step."""
    dq, _ = carry
    x, dp = products(slot, mats)
    return dq, dscores(probs(x, kpos, vecs, masked), dp, vecs).astype(dtype)

  def overlapped(carry, s, mats, slot, kpos, vecs, masked):
    """Compiled, chunks 1..: S and dP of this chunk and the last chunk's dQ += dS K issued
    together; this chunk's dS is formed while the tensor cores do dS K."""
    dq, ds_prev = carry
    prev = slot.shifted(-1)

    def body(refs):
      dq_ref, ds_ref = refs
      x, dp = products(slot, mats, then=lambda: plgpu.wgmma(dq_ref, ds_prev, prev.k))
      ds_ref[...] = dscores(probs(x, kpos, vecs, masked), dp, vecs)

    ds0 = plgpu.layout_cast(jnp.zeros(ds_prev.shape, jnp.float32), plgpu.Layout.WGMMA)
    dq, ds = pl.run_state(body)((plgpu.ACC.init(dq), ds0))
    prev.free_k()
    # dS K is done: the next one's 16-bit operand is made here, outside the wgmma pipeline stage
    # (as the forward's P: ptxas serializes every wgmma otherwise, run 29)
    return dq, ds.astype(dtype)

  def last(carry, slot):
    """Compiled: the tile's last dQ += dS K (its keys were waited for by its own step)."""
    dq, ds16 = carry
    dq = _mma_add(dq, ds16, slot.k, interpret)
    slot.free_k()
    return dq, ds16

  def finish(carry, vecs, outs, bk, r0, stage, lse_smem):
    dq = carry[0] if overlap else carry
    (dq_ref,) = outs
    with region("stage"):
      stage[...] = (dq * scale).astype(dtype)
    with region("store"):
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(stage, dq_ref.at[bk, pl.ds(r0, WG_ROWS)])

  out_type = (jax.ShapeDtypeStruct((bk_n, rows, dim), dtype),)
  hooks = dict(step=overlapped, first=first, last=last, keys_held=True) if overlap else dict(
      step=step)
  (dq,) = _row_tiles("moba_mgpu_dq", ks=ks, ke=ke, nfree=nfree, mats=(q_rows, do_rows),
                     vecs=(lo, hi, lse2.astype(jnp.float32), delta.astype(jnp.float32)), k=k, v=v,
                     block_kv=block_kv, init=init, finish=finish, out_type=out_type,
                     interpret=interpret, ctas=ctas, kv_head0=kv_head0, **hooks)
  return dq


KEYS = 128  # dK/dV: keys per work item, 64 per compute warpgroup


# A split dK/dV tile (`dkdv_pieces`) has at most this many pieces; the float32 partial tiles of
# all split tiles take at most SPLIT_SLOTS_PER_CTA a CTA (264 on an H100 or H200: 17 MB for dK and
# as much for dV at head_dim 128).
MAX_PIECES = 8
SPLIT_SLOTS_PER_CTA = 2


def dkdv_chunks(items):
  """[BK, NK] int32: each dK/dV item's 64-row chunks as the kernel loops over them (its dense
  rows' chunks, the last one partial, then its groups' whole chunks); `dkdv_tiles`' items."""
  _, r0, _, r1, g0, g1, _ = items
  return (jnp.maximum(r1 - r0, 0) + WG_ROWS - 1) // WG_ROWS + jnp.maximum(g1 - g0, 0) // WG_ROWS


class DkdvPieces(NamedTuple):
  """The dK/dV's work split where its key tiles are too uneven for its CTAs (`dkdv_pieces`):
  NP = T + S pieces (T = BK * NK tiles, S slots), of which the first n_real in `order` are real."""
  tile: jax.Array  # [NP] int32 bk * NK + j: the key tile of each piece (padding: 0)
  c0: jax.Array  # [NP] int32: the piece's 64-row chunks of its tile are [c0, c1)
  c1: jax.Array  # [NP]
  slot: jax.Array  # [NP] int32: -1, the whole tile, stored as dK, dV; else its float32 slot
  order: jax.Array  # [NP] int32 `balanced_order` of the real pieces, the padding after them
  n_real: jax.Array  # [1] int32
  base: jax.Array  # [S // 2] int32 first slot of each split tile (by rank; -1: none)
  count: jax.Array  # [S // 2] int32 its pieces (0: none)
  split_tile: jax.Array  # [S // 2] int32 its tile (T: none)


def dkdv_pieces(chunks, n_ctas: int, slots: int) -> DkdvPieces:
  """Pieces of the dK/dV's key tiles: a tile with more 64-row chunks than a piece's cap, cap =
  the chunks a CTA would do at half its mean work (at least ceil(max / MAX_PIECES)), is split into
  ceil(chunks / cap) pieces of consecutive chunks, most chunks first while the split tiles' pieces
  fit `slots`; each piece of a split tile adds its dK, dV in float32 to a slot of its own and
  the tile is their sum, rounded once (`dkdv_tiles`). chunks [BK, NK] int32.

  Why: the items are one per (batch, kv head, 128-key tile), and with GQA a kv head's tiles carry
  every query head of its group: G times fewer and longer items, as few as the CTAs at 16K block
  128 top-8 with 16/2 heads (256 items on 132 CTAs, the busiest CTA 2.2x the mean work in
  `balanced_order`; tools/dkdv_balance.py), where no order can even them. Split: 1.08x (16/4:
  1.41 -> 1.04; 32K block 512 top-3, 16/2: 1.45 -> 1.05). Where no tile is that long (every
  shape with as many kv heads as query heads measured here) nothing is split."""
  n = chunks.reshape(-1).astype(jnp.int32)
  n_tiles = n.shape[0]
  n_split = slots // 2  # a split tile has 2 pieces or more
  # every CTA takes a real piece (the kernel's item count per CTA assumes it), and one split
  # tile's two slots fit
  assert n_ctas <= n_tiles and slots >= 2, (n_ctas, n_tiles, slots)
  total = jnp.sum(n + 1)
  cap = jnp.maximum(jnp.maximum((total + 2 * n_ctas - 1) // (2 * n_ctas),
                                (jnp.max(n) + MAX_PIECES - 1) // MAX_PIECES), 1)
  pieces = jnp.maximum((n + cap - 1) // cap, 1)
  rank = jnp.argsort(-n, stable=True).astype(jnp.int32)  # tiles by chunks, most first
  p_rank = pieces[rank]
  ends = jnp.cumsum(jnp.where(p_rank > 1, p_rank, 0))
  # a prefix of the ranks, at most n_split long (each split tile takes two slots or more)
  split_rank = (p_rank > 1) & (ends <= slots)
  pad = max(0, n_split - n_tiles)  # the split tiles' arrays: n_split places, the rest `fill`
  take = lambda x, fill: jnp.pad(jnp.where(split_rank, x, fill), (0, pad),
                                 constant_values=fill)[:n_split]
  base, count = take(ends - p_rank, -1), take(p_rank, 0)
  split_tile = take(rank, n_tiles)
  is_split = jnp.zeros(n_tiles, bool).at[rank].set(split_rank)
  tile_base = jnp.zeros(n_tiles, jnp.int32).at[rank].set(ends - p_rank)
  # tile t's own item is its piece 0; slot s holds piece s - base of the split tile owning it
  first_c1 = jnp.where(is_split, jnp.minimum(cap, n), n)
  first_slot = jnp.where(is_split, tile_base, -1)
  s = jnp.arange(slots, dtype=jnp.int32)
  owner = jnp.sum(jnp.where(count > 0, base + count, slots + 1)[None, :] <= s[:, None], axis=1)
  owner = jnp.minimum(owner, n_split - 1)
  piece = s - base[owner]
  extra = (count[owner] > 0) & (piece >= 1) & (piece < count[owner])
  t_s = jnp.where(extra, split_tile[owner], 0)
  c0_s = jnp.where(extra, piece * cap, 0)
  c1_s = jnp.where(extra, jnp.minimum(c0_s + cap, n[t_s]), 0)
  tile = jnp.concatenate([jnp.arange(n_tiles, dtype=jnp.int32), t_s])
  c0 = jnp.concatenate([jnp.zeros(n_tiles, jnp.int32), c0_s])
  c1 = jnp.concatenate([first_c1, c1_s])
  slot = jnp.concatenate([first_slot, jnp.where(extra, s, -1)])
  real = jnp.concatenate([jnp.ones(n_tiles, bool), extra])
  n_real = jnp.sum(real).astype(jnp.int32)
  order = balanced_order(jnp.where(real, c1 - c0 + 1, 0), n_ctas, n_real)
  return DkdvPieces(tile, c0, c1, slot, order, n_real.reshape(1), base, count, split_tile)


def dkdv_tiles(items, lse2, delta, lo, hi, q_rows, do_rows, k, v, *, scale, interpret=False,
               ctas=None, stages=None, split=False):
  """dK and dV [B, NK * 128, K, D] in k's dtype (keys past T are the caller's to drop).

  items: (ks, r0, ru, r1, g0, g1, gmask), each [BK, NK] int32: key tile j of (batch, kv head)
  bk starts at ks = 128 j (the kernel computes it: ks is not read) and is seen by dense rows
  [r0, r1), of which rows before ru may need the mask, and by the past-block groups' rows
  [g0, g1), masked where gmask is 1 (groups whose blocks cover only part of the tile:
  documents or blocks off the 128-key grid; `moba_gpu.mosaic_dkdv_items`).
  lse2 [BK, R] float32 is each row's log-sum-exp in base 2 (+inf for padding rows), delta
  [BK, R] rowsum(dO * O); lo, hi [BK, R] int32; q_rows, do_rows (`Rows` of q and dO, one
  index).

  Key-tile-major, persistent like `_row_tiles` (items in `balanced_order`: a key tile's work falls
  steeply with its block): each compute warpgroup holds 64 keys (and values) in SMEM and their dK,
  dV accumulators in registers; the producer streams 64-row chunks of Q, dO and the row vectors
  through a ring of slots. Compiled, it gathers each chunk's Q and dO rows itself
  (`_gather_into_smem`, the chunk's indices brought into SMEM by TMA one chunk ahead) and
  publishes a chunk `lag` chunks later (two; the ring's other slots hide the gathers' latency),
  the item's last ones before it awaits the item's end. Per chunk: S^T = K Q^T, P^T = exp2(S^T -
  lse), dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q (four wgmma). Dense
  chunks that reach into [r0, ru) or past r1 are masked by each row's [lo, hi) (rows past r1
  belong to later blocks, which start after these keys), and the groups' chunks where gmask is 1;
  the rest are not. One rounding of dK * scale and dV to k's dtype, staged in the keys' own SMEM
  and stored by TMA. Every kv head of k in one call: the kernel holds no partial rows, so the
  kv-head chunks of `moba_gpu` split only the forward and the dQ (run 48: per chunk, a call had
  too few items to balance under GQA).
  split: the CTAs take `dkdv_pieces` of the tiles instead of whole tiles (a piece: a run of a
  tile's chunks); the pieces of a split tile store dK * scale and dV in float32 from registers,
  each to a slot of its own, and their sums, rounded once, replace the tile's outputs."""
  bk_n, n_kt = items[0].shape
  dim = q_rows.shape[-1]
  batch, seq = k.shape[:2]
  kv_heads = bk_n // batch
  n_items = bk_n * n_kt
  n_ctas = min(n_items, ctas or num_ctas(interpret))
  dtype = q_rows.dtype
  itemsize = jnp.dtype(dtype).itemsize
  per_slot = 2 * WG_ROWS * dim * itemsize + 4 * WG_ROWS * 4
  fixed = 2 * KEYS * dim * itemsize
  stages = stages or max(2, min(4, (SMEM_BYTES - fixed - 4096) // per_slot))
  lag = min(2, stages - 1)  # chunks whose row gathers stay in flight (compiled)
  qk_scale = scale * LOG2E
  col_layout = plgpu.Layout.WGMMA.reduce(0)
  pad_seq = n_kt * KEYS
  kp, vp = _pad_keys(k, pad_seq), _pad_keys(v, pad_seq)
  chunks = dkdv_chunks(items)
  assert kv_heads == k.shape[2], (bk_n, k.shape)
  shape = jax.ShapeDtypeStruct((batch, pad_seq, kv_heads, dim), k.dtype)
  if split:
    n_slots = SPLIT_SLOTS_PER_CTA * n_ctas
    pieces = dkdv_pieces(chunks, n_ctas, n_slots)
    order = pieces.order
    piece_args = (pieces.tile, pieces.c0, pieces.c1, pieces.slot, pieces.n_real)
    part = jax.ShapeDtypeStruct((n_slots, KEYS, dim), jnp.float32)
    out_type = (shape, shape, part, part)
  else:
    order = balanced_order((chunks + 1).reshape(-1), n_ctas)
    piece_args, out_type = (), (shape, shape)
  n_pa = len(piece_args)

  mat_args = _mat_operands((q_rows, do_rows), interpret)
  n_mat = len(mat_args)

  def kernel(*refs):
    order_ref, r0_ref, ru_ref, r1_ref, g0_ref, g1_ref, gm_ref = refs[:7]
    piece_refs = refs[7:7 + n_pa]
    mat_refs = refs[7 + n_pa:7 + n_pa + n_mat]
    lse_ref, dl_ref, lo_ref, hi_ref, k_ref, v_ref, dk_ref, dv_ref, *part_refs, scoped = \
        refs[7 + n_pa + n_mat:]
    (k_smem, v_smem, mat_smem, vec_smem, *idx_smem), (kv_bars, mat_bars, vec_bars, *idx_bars), \
        frees = scoped
    idx_smem, idx_bars = (None, None) if interpret else (idx_smem[0], idx_bars[0])
    lse_smem, dl_smem, lo_smem, hi_smem = vec_smem
    kv_free, row_free = frees
    cta, wg = lax.axis_index("cta"), lax.axis_index("wg")
    if split:  # the real pieces are the first n_real places (n_real >= the tiles >= n_ctas)
      n_real = piece_refs[4][0]
      my_items = lax.div(jnp.maximum(n_real - 1 - cta, 0), jnp.int32(n_ctas)) + 1
    else:
      my_items = lax.div(jnp.int32(n_items - 1) - cta, jnp.int32(n_ctas)) + 1

    def item(i):
      """The i-th item of this CTA: (bk, j, a, ga, n_dense, n_mask, n_full, n_group, n_gfree) of
      its tile, then its chunks [c0, c1) and its slot (unsplit: None, the tile's chunks, None)."""
      w = order_ref[cta + i * n_ctas]
      if split:
        tile_ref, c0_ref, c1_ref, slot_ref, _ = piece_refs
        t = tile_ref[w]
        c0, c1, slot = c0_ref[w], c1_ref[w], slot_ref[w]
      else:
        t = w
      bk, j = lax.div(t, jnp.int32(n_kt)), lax.rem(t, jnp.int32(n_kt))
      a, u, e = r0_ref[bk, j], ru_ref[bk, j], r1_ref[bk, j]
      n_dense = lax.div(jnp.maximum(e - a, 0) + (WG_ROWS - 1), jnp.int32(WG_ROWS))
      n_mask = jnp.minimum(lax.div(jnp.maximum(u - a, 0) + (WG_ROWS - 1), jnp.int32(WG_ROWS)),
                           n_dense)
      n_full = jnp.maximum(lax.div(jnp.maximum(e - a, 0), jnp.int32(WG_ROWS)), n_mask)
      ga, gb = g0_ref[bk, j], g1_ref[bk, j]
      n_group = lax.div(jnp.maximum(gb - ga, 0), jnp.int32(WG_ROWS))
      n_gfree = jnp.where(gm_ref[bk, j] > 0, 0, n_group)  # the group chunks seen unmasked
      if not split:
        c0, c1, slot = None, n_dense + n_group, None
      return bk, j, a, ga, n_dense, n_mask, n_full, n_group, n_gfree, c0, c1, slot

    def chunk_row(c, a, ga, n_dense):  # first row of chunk c: dense chunks, then the group's
      row = jnp.where(c < n_dense, a + c * WG_ROWS, ga + (c - n_dense) * WG_ROWS)
      # A multiple of 8 by construction (r0 rounded down to 8, g0 a multiple of 128), written so
      # that the TMA lowering sees it (boxes into 8-row-tiled SMEM start on multiples of 8).
      return lax.div(row, jnp.int32(8)) * 8

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(DKDV_REGISTERS[0], action="increase")
      k_w, v_w = k_smem.at[wg], v_smem.at[wg]

      def tile_keys(i, g):
        bk, j, a, ga, n_dense, n_mask, n_full, n_group, n_gfree, c0, c1, slot_i = item(i)
        k0 = j * KEYS + wg * WG_ROWS  # = ks[bk, j] + 64 wg
        with region("keys"):
          plgpu.barrier_wait(kv_bars[0].at[wg])
          plgpu.barrier_wait(kv_bars[1].at[wg])

        g0 = g if c0 is None else g - c0  # chunk c's ring place is g0 + c

        def chunk(c, carry, masked):  # chunk c of the tile
          dk, dv = carry
          slot = lax.rem(g0 + c, jnp.int32(stages))
          for bars in mat_bars + vec_bars:
            plgpu.barrier_wait(bars.at[slot])
          q_s, do_s = mat_smem[0].at[slot], mat_smem[1].at[slot]
          # each row vector read where it is used (16 registers each in the column layout):
          # none of them live across the chunk's register peak
          vec = lambda x: _load(x.at[slot], col_layout)
          row = lambda x: lax.broadcast_in_dim(x, (WG_ROWS, WG_ROWS), [1])

          def st_fn(acc_ref):
            plgpu.wgmma(acc_ref, k_w, _transpose(q_s))
            return acc_ref[...]

          st = pl.run_scoped(st_fn, plgpu.ACC((WG_ROWS, WG_ROWS), jnp.float32))
          pt = jnp.exp2(st * qk_scale - row(vec(lse_smem)))
          if masked:
            vis = _visible(k0, vec(lo_smem), vec(hi_smem), pt.shape, 0)  # keys down the rows
            pt = jnp.where(vis, pt, 0.0)
          dv = _mma_add(dv, pt.astype(dtype), do_s, interpret)

          if interpret:  # no interpreter rule for pl.run_state
            def dpt_fn(acc_ref):
              plgpu.wgmma(acc_ref, v_w, _transpose(do_s))
              return acc_ref[...]

            dpt = pl.run_scoped(dpt_fn, plgpu.ACC((WG_ROWS, WG_ROWS), jnp.float32))
            dpt = dpt - row(vec(dl_smem))
          else:  # dP^T - delta: the accumulator starts at -delta (no subtraction, delta not live)
            dpt = pl.run_state(lambda r: plgpu.wgmma(r, v_w, _transpose(do_s)))(
                plgpu.ACC.init(-row(vec(dl_smem))))
          dst = pt * dpt
          dk = _mma_add(dk, dst.astype(dtype), q_s, interpret)
          plgpu.barrier_arrive(row_free.at[slot])
          return dk, dv

        acc = (_zeros_rows(dim), _zeros_rows(dim))
        masked = functools.partial(chunk, masked=True)
        free = functools.partial(chunk, masked=False)
        clip = (lambda x: x) if c0 is None else (lambda x: jnp.minimum(jnp.maximum(x, c0), c1))
        for lo_c, hi_c, fn in ((0, n_mask, masked), (n_mask, n_full, free),
                               (n_full, n_dense, masked), (n_dense, n_dense + n_gfree, free),
                               (n_dense + n_gfree, n_dense + n_group, masked)):
          with region("masked" if fn is masked else "unmasked"):
            acc = lax.fori_loop(clip(lo_c), clip(hi_c), fn, acc)
        dk, dv = acc
        b, kvh = lax.div(bk, jnp.int32(kv_heads)), lax.rem(bk, jnp.int32(kv_heads))

        def store_tile():
          with region("finish"):
            k_w[...] = (dk * scale).astype(k_w.dtype)  # the keys are read: stage dK, dV in SMEM
            v_w[...] = dv.astype(v_w.dtype)
            plgpu.commit_smem()
            at = (b, pl.ds(k0, WG_ROWS), kvh)
            plgpu.copy_smem_to_gmem(k_w, dk_ref.at[at])
            plgpu.copy_smem_to_gmem(v_w, dv_ref.at[at])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)

        if split:
          pl.when(slot_i < 0)(store_tile)

          @pl.when(slot_i >= 0)
          def _():  # a piece: its float32 sums straight from registers to its slot
            dkp_ref, dvp_ref = part_refs
            rows = pl.ds(wg * WG_ROWS, WG_ROWS)
            dkp_ref[slot_i, rows] = dk * scale
            dvp_ref[slot_i, rows] = dv
        else:
          store_tile()
        plgpu.barrier_arrive(kv_free)  # the producer may load the next keys here
        return g + (c1 if c0 is None else c1 - c0)

      lax.fori_loop(0, my_items, tile_keys, jnp.int32(0))
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(DKDV_REGISTERS[1], action="decrease")
      vsrcs = (lse_ref, dl_ref, lo_ref, hi_ref)
      src_refs, index_ref = (mat_refs, None) if interpret else (mat_refs[:-1], mat_refs[-1])

      def fetch_index(bk, row, gc):  # chunk gc's 64 row indices into the index ring, by TMA
        at = lax.rem(gc, 2)
        plgpu.copy_gmem_to_smem(index_ref.at[bk, pl.ds(row, WG_ROWS)], idx_smem.at[at],
                                idx_bars.at[at])

      def tile_loads(i, g):
        bk, j, a, ga, n_dense, n_mask, n_full, n_group, _, c0, c1, _ = item(i)
        b = lax.div(bk, jnp.int32(kv_heads))
        kvh = lax.rem(bk, jnp.int32(kv_heads))
        # this item's chunks: the tile's [c0, c1) (unsplit: all n), in ring places g, g + 1, ...
        n = c1 if c0 is None else c1 - c0
        tile_chunk = (lambda c: c) if c0 is None else (lambda c: c0 + c)  # its c-th chunk's
        if not interpret:
          @pl.when(n >= 1)
          def _():  # lands while the last item's end is awaited
            fetch_index(bk, chunk_row(tile_chunk(0), a, ga, n_dense), g)

        @pl.when(i >= 1)
        def _():
          plgpu.barrier_wait(kv_free)  # both warpgroups stored the last tile's dK, dV

        for w in range(2):
          at = (b, pl.ds(j * KEYS + w * WG_ROWS, WG_ROWS), kvh)
          plgpu.copy_gmem_to_smem(k_ref.at[at], k_smem.at[w], kv_bars[0].at[w])
          plgpu.copy_gmem_to_smem(v_ref.at[at], v_smem.at[w], kv_bars[1].at[w])

        def load(c, _):
          slot = lax.rem(g + c, jnp.int32(stages))

          @pl.when(g + c >= stages)
          def _():
            plgpu.barrier_wait(row_free.at[slot])

          rows_c = pl.ds(chunk_row(tile_chunk(c), a, ga, n_dense), WG_ROWS)
          for src, dst, bars in zip(vsrcs, vec_smem, vec_bars):
            plgpu.copy_gmem_to_smem(src.at[bk, rows_c], dst.at[slot], bars.at[slot])
          dsts, bars = [m.at[slot] for m in mat_smem], [x.at[slot] for x in mat_bars]
          if interpret:
            _issue_mats([x.at[bk, rows_c] for x in src_refs], None, dsts, bars, interpret)
            return

          @pl.when(c + 1 < n)
          def _():  # the next chunk's indices, one chunk ahead
            fetch_index(bk, chunk_row(tile_chunk(c + 1), a, ga, n_dense), g + c + 1)

          at = lax.rem(g + c, 2)
          plgpu.barrier_wait(idx_bars.at[at])
          _issue_mats(src_refs, idx_smem.at[at], dsts, bars, interpret)
          _commit_gathers()
          # Chunk c - lag's gathers have landed (lag chunks stay in flight); the warpgroup's
          # reads of this chunk's indices are done before their slot is refilled.
          _gathers_done(lag)

          @pl.when(c >= lag)
          def _():
            for x in mat_bars:
              plgpu.barrier_arrive(x.at[lax.rem(g + c - lag, jnp.int32(stages))])

        lax.fori_loop(0, n, load, None)
        if not interpret:
          @pl.when(n >= 1)
          def _():  # the item's last chunks, before the producer awaits the item's end
            _gathers_done(0)
            for d in range(lag):
              @pl.when(n - lag + d >= 0)
              def _():
                for x in mat_bars:
                  plgpu.barrier_arrive(x.at[lax.rem(g + n - lag + d, jnp.int32(stages))])

        return g + n

      g_end = lax.fori_loop(0, my_items, tile_loads, jnp.int32(0))
      for jj in range(stages):  # drain: observe the last releases
        gs = g_end - stages + jj

        @pl.when(gs >= 0)
        def _():
          plgpu.barrier_wait(row_free.at[lax.rem(gs, jnp.int32(stages))])

      plgpu.barrier_wait(kv_free)

  def body(*refs):
    scratch = (
        _tiled((2, WG_ROWS, dim), dtype),
        _tiled((2, WG_ROWS, dim), dtype),
        tuple(_tiled((stages, WG_ROWS, dim), dtype) for _ in range(2)),
        tuple(plgpu.SMEM((stages, WG_ROWS), dt)
              for dt in (jnp.float32, jnp.float32, jnp.int32, jnp.int32)),
    ) + (() if interpret else (plgpu.SMEM((2, WG_ROWS), jnp.int32),))  # the index ring
    bars = ((plgpu.Barrier(num_barriers=2),) * 2, (plgpu.Barrier(num_barriers=stages),) * 2,
            (plgpu.Barrier(num_barriers=stages),) * 4) + (
                () if interpret else (plgpu.Barrier(num_barriers=2),))
    frees = (plgpu.Barrier(num_arrivals=2), plgpu.Barrier(num_arrivals=2, num_barriers=stages))
    pl.run_scoped(lambda *sc: kernel(*refs, sc), scratch, bars, frees, collective_axes="wg")

  outs = _kernel(body, "moba_mgpu_dkdv", out_type, n_ctas, interpret)(
      order, *items[1:], *piece_args, *mat_args, lse2, delta, lo, hi, kp, vp)
  if not split:
    return outs
  return tuple(_add_pieces(x, part, pieces, kv_heads) for x, part in zip(outs[:2], outs[2:]))


def _add_pieces(out, part, pieces: DkdvPieces, kv_heads):
  """out [B, NK * 128, K, D] with each split tile replaced by the sum of its pieces' float32
  slots part [S, 128, D], in slot order (deterministic: no scatter-add), rounded once."""
  batch, pad_seq, _, dim = out.shape
  n_kt = pad_seq // KEYS
  slots = part.shape[0]
  total = jnp.zeros((pieces.base.shape[0], KEYS, dim), jnp.float32)
  for p in range(MAX_PIECES):
    at = pieces.base + p
    here = (p < pieces.count)[:, None, None]
    total = total + jnp.where(here, part[jnp.clip(at, 0, slots - 1)], 0.0)
  tile = pieces.split_tile  # T (past every tile): no split tile in this place
  bk, j = tile // n_kt, tile % n_kt
  b = jnp.where(pieces.count > 0, bk // kv_heads, batch)  # batch: dropped
  tiles = out.reshape(batch, n_kt, KEYS, kv_heads, dim)
  tiles = tiles.at[b, j, :, bk % kv_heads, :].set(total.astype(out.dtype), mode="drop")
  return tiles.reshape(out.shape)
