"""The MoBA gate in one Pallas kernel (GPU: Triton lowering; TPU: Mosaic): scores and top-k per
query tile.

XLA's gate writes the float32 scores [B, T, H, N] of every query against every block's mean key
(three matmuls, one per bf16 piece of the gate keys, and their sums), then reads them once per
top-k pass: at 128K tokens, block 512, about 5 ms of a 24 ms fwd+bwd step on an H200 (run 26,
docs/kernel_notes.md; 0.995 ms with this kernel). Here one program takes BT queries of one query
head, computes their scores chunk by chunk of BN table slots (the same bf16 pieces and
products, float32 accumulation) and keeps each query's top-k in registers: the scores never
reach memory, and a tile reads only the slots its queries can choose.

The table holds the mean keys of each row's *full* blocks in order (`_routing.full_block_table`;
a document's ragged last block is never a past block), so packed documents take the same kernel
as single ones: a query's past blocks are the slots [first, first + cur) of its document
(single documents: first = 0, cur = t // block_size), and the tile scans the chunks its
queries' ranges cover (its chunk range comes precomputed, `_prepare`).

The choice is `moba.select_blocks`': the current block first, then the top `topk - 1` past blocks
by score, ties to the lower block, a NaN score ranking above every number, and where fewer past
blocks exist the lowest blocks not yet taken (invalid). Scores are compared as integers
(`_order_key`: an order-preserving map of float32, -0.0 as +0.0) so that a tie and its lower index
are one comparison. Each chunk's top entries (argmax passes over the chunk) are merged into the
running list by rank: the running list's blocks all precede the chunk's, so on a tie they win.
Entries no past block fills take the lowest free blocks after the current one, as the oracle's
top-k does.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from moba_jax.kernels import _routing as rt

BT = 64  # queries a program (GPU: `GateTiles`' default)
# block slots a chunk (GPU: `GateTiles`' default). 32 since run 36's sweep on the H200
# (tools/gate_sweep.py, the gate alone, 64 -> 32): 32K b512 k3 0.175 -> 0.148-0.153 ms, 128K b512
# k3 1.099 -> 1.041, 16K b128 k8 0.219 -> 0.199, 128K b4096 k12 1.826 -> 1.237-1.261; 8K b512 k3
# 0.053-0.073 either way (noise); 16 was faster at 32K (0.133) and slower at b4096 (1.373).
BN = 32
TPU_BT = 128  # queries a program (TPU: a [128, 128] score tile on the MXU)
TPU_BN = 128  # block slots a chunk (TPU)
TPU_KEY_BYTES = 8 << 20  # the gate keys' VMEM block (three pieces, double-buffered) at most
MAX_TOPK = 17  # the argmax passes a chunk makes (topk - 1); larger top-k stays with XLA's gate
_LOWEST = int(np.iinfo(np.int32).min)  # a slot never chosen: not a past block of the query, taken
_NINF = int(np.float32(-np.inf).view(np.int32) ^ np.int32(0x7FFFFFFF))  # `_order_key(-inf)`


@dataclasses.dataclass(frozen=True)
class GateTiles:
  """The GPU gate's program: bt queries of one head, scanning their table slots in chunks of
  bn (powers of two, 16-256: each chunk's products are [bt, D] x [D, bn]), compiled by Triton
  with num_warps warps and num_stages stages. The default is run 26's with run 36's bn (`BN`;
  tools/gate_sweep.py times others on a GPU)."""
  bt: int = BT
  bn: int = BN
  num_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for name in ("bt", "bn"):
      value = getattr(self, name)
      if not (16 <= value <= 256 and value & (value - 1) == 0):
        raise ValueError(f"GateTiles {name}={value}: a power of two from 16 to 256")
    if self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"GateTiles num_warps={self.num_warps}: one of 1, 2, 4, 8, 16")
    if self.num_stages < 1:
      raise ValueError(f"GateTiles num_stages={self.num_stages}: at least 1")


def supports(q_dtype, head_dim, topk) -> bool:
  """Whether `gate_topk` takes this case (else `_routing`'s XLA gate): 16-bit queries (float32
  queries score with HIGHEST-precision products, which the kernel's bf16 pieces do not
  replace), a head_dim the kernel's products take (a power of two, 16-256) and topk <= MAX_TOPK."""
  return (jnp.dtype(q_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
          and 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0 and topk <= MAX_TOPK)


def supports_tpu(q_dtype, head_dim, topk, n_slots) -> bool:
  """`supports` for `gate_topk_tpu`: 16-bit queries, topk <= MAX_TOPK, and the gate keys' VMEM
  block (three bf16 pieces of [N, D], N table slots, D padded to the 128 lanes,
  double-buffered) within TPU_KEY_BYTES (N <= 2048 at head_dim 128)."""
  n_pad, d_pad = -(-n_slots // TPU_BN) * TPU_BN, -(-head_dim // 128) * 128
  return (jnp.dtype(q_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
          and topk <= MAX_TOPK and 2 * 3 * n_pad * d_pad * 2 <= TPU_KEY_BYTES)


def _order_key(x):
  """int32 keys ordered as the float32 x (-inf lowest, +inf highest; -0.0 == +0.0; no NaN)."""
  bits = jax.lax.bitcast_convert_type(jnp.where(x == 0.0, 0.0, x), jnp.int32)
  return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _merge(run, new):
  """The m best of two lists of m (key, slot) columns [bt, 1], each sorted best first, every
  slot of `run` below every slot of `new` (so `run` wins a tie). Each entry's rank in the union
  is its rank in its list plus the entries of the other list that beat it."""
  m = len(run)
  rank_r = [i + sum((nk > rk).astype(jnp.int32) for nk, _ in new) for i, (rk, _) in
            enumerate(run)]
  rank_n = [j + sum((rk >= nk).astype(jnp.int32) for rk, _ in run) for j, (nk, _) in
            enumerate(new)]
  out = []
  for p in range(m):
    key, slot = jnp.full_like(run[0][0], _LOWEST), jnp.zeros_like(run[0][1])
    for (k, s), r in zip(run + new, rank_r + rank_n):
      key, slot = jnp.where(r == p, k, key), jnp.where(r == p, s, slot)
    out.append((key, slot))
  return out


def _choose(q, first, cur, c_lo, c_hi, load_k, n_pieces, *, n_sel, q_pieces, bt, bn, s_pad):
  """One program's choice for the queries q [bt, D]. A query's past blocks are the table slots
  [first, first + cur) (first, cur [bt, 1] int32: its document's first full block in the table,
  its block's index in its document); the program scans chunks [c_lo, c_hi) of bn slots, which
  hold every query's past blocks. load_k(p, c) -> [bn, D], piece p of the gate keys of slots
  [c * bn, (c + 1) * bn). Returns blocks (indices in the query's document) and valid [bt, s_pad]
  int32 (column 0: the current block). Per-query values are [bt, 1] columns (Mosaic TPU keeps
  no 1-D vectors)."""
  m = n_sel - 1
  end = first + cur
  # float16: two bf16 pieces (8 + 3 significant bits), exact; bfloat16: itself
  qs = [q] if q_pieces == 1 else rt._bf16_pieces(q.astype(jnp.float32), 2)
  dims = (((1,), (1,)), ((), ()))
  col = jax.lax.broadcasted_iota(jnp.int32, (bt, bn), 1)

  def chunk(c, run):
    j = c * bn + col  # [bt, bn] table slots
    scores = None
    for qp in qs:
      for p in range(n_pieces):  # the XLA gate's order: ((q1 k1 + q1 k2) + q1 k3) + ...
        s = jax.lax.dot_general(qp, load_k(p, c), dims, preferred_element_type=jnp.float32,
                                precision=jax.lax.Precision.DEFAULT)  # bf16 x bf16: exact
        scores = s if scores is None else scores + s
    scores = jnp.where(scores != scores, float(np.finfo(np.float32).max), scores)  # NaN ranks high
    key = jnp.where((j >= first) & (j < end), _order_key(scores), _LOWEST)
    new = []
    for _ in range(m):  # argmax passes, ties to the lower slot
      best = jnp.max(key, axis=1, keepdims=True)
      first_col = jnp.min(jnp.where(key == best, col, bn), axis=1, keepdims=True)
      new.append((best, c * bn + first_col))
      key = jnp.where(col == first_col, _LOWEST, key)
    return _merge(run, new)

  init = [(jnp.full((bt, 1), _LOWEST, jnp.int32), jnp.zeros((bt, 1), jnp.int32))] * m
  run = jax.lax.fori_loop(c_lo, c_hi, chunk, init) if m else []
  # Entries no past block filled (fewer than topk - 1 of them) are the oracle's lowest free
  # blocks: cur + 1, cur + 2, ... (every past block is taken by then), invalid.
  filled = sum(((k > _LOWEST).astype(jnp.int32) for k, _ in run), jnp.zeros_like(cur))
  out_col = jax.lax.broadcasted_iota(jnp.int32, (bt, s_pad), 1)
  blocks = jnp.where(out_col == 0, cur, 0)
  valid = (out_col == 0).astype(jnp.int32)
  for p, (k, s) in enumerate(run):
    block = jnp.where(k > _LOWEST, s - first, cur + 1 + p - filled)
    blocks = jnp.where(out_col == p + 1, block, blocks)
    valid = jnp.where(out_col == p + 1, (k > _NINF).astype(jnp.int32), valid)
  return blocks, valid


def _gpu_kernel(lo_ref, hi_ref, q_ref, first_ref, cur_ref, k_ref, block_ref, valid_ref, *, bt,
                bn, **kw):
  load_k = lambda p, c: k_ref[p, pl.ds(c * bn, bn), :]  # [bn, D] bf16
  block_ref[...], valid_ref[...] = _choose(
      q_ref[...], first_ref[...], cur_ref[...], lo_ref[0], hi_ref[0], load_k, k_ref.shape[0],
      bt=bt, bn=bn, s_pad=block_ref.shape[1], **kw)


def _tpu_kernel(lo_ref, hi_ref, q_ref, first_ref, cur_ref, k_ref, block_ref, valid_ref, **kw):
  b, i = pl.program_id(0), pl.program_id(2)
  load_k = lambda p, c: k_ref[p, pl.ds(pl.multiple_of(c * TPU_BN, TPU_BN), TPU_BN), :]
  block_ref[...], valid_ref[...] = _choose(
      q_ref[...], first_ref[...], cur_ref[...], lo_ref[b, i], hi_ref[b, i], load_k,
      k_ref.shape[0], bt=TPU_BT, bn=TPU_BN, s_pad=block_ref.shape[1], **kw)


def _prepare(q, k_pieces, first, cur, n_sel, bt, bn):
  """What both wrappers do first: q and the per-query columns padded to bt queries (by their
  last entry), the table to bn slots, each tile's chunk range [lo, hi) ([B, tiles] int32: the
  chunks of its queries' past blocks), the kernel body's static arguments."""
  # no gradient (the oracle's choice is stop_gradient'ed too); a tangent would reach the Pallas
  # call's own JVP, which traces the kernel outside its grid
  q, k_pieces = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k_pieces)
  batch, seq = q.shape[:2]
  n_full = k_pieces.shape[2]
  t_pad, n_pad = pl.cdiv(seq, bt) * bt, max(pl.cdiv(n_full, bn), 1) * bn
  pad = lambda x, mode: jnp.pad(x, [(0, 0), (0, t_pad - seq)] + [(0, 0)] * (x.ndim - 2),
                                mode=mode)
  q = pad(q, "constant")
  first, cur = (pad(x.astype(jnp.int32), "edge")[..., None] for x in (first, cur))  # [B, T, 1]
  k_pieces = jnp.pad(k_pieces, ((0, 0), (0, 0), (0, n_pad - n_full), (0, 0), (0, 0)))
  tiles = lambda x: x.reshape(batch, t_pad // bt, bt)
  lo = jax.lax.div(jnp.min(tiles(first), axis=-1), bn)
  hi = jax.lax.div(jnp.max(tiles(first + cur), axis=-1) + bn - 1, bn)
  kw = dict(n_sel=n_sel, q_pieces=1 if q.dtype == jnp.bfloat16 else 2)
  return q, k_pieces, first, cur, lo, hi, t_pad, n_pad, kw


def _finish(blocks, valid, seq, n_sel):
  return blocks[:, :seq, :, :n_sel], valid[:, :seq, :, :n_sel].astype(bool)


@functools.partial(jax.jit, static_argnames=("n_sel", "interpret", "tiles"))
def gate_topk(q, k_pieces, first, cur, *, n_sel, interpret=False, tiles: GateTiles = GateTiles()):
  """`moba.select_blocks` without the scores in memory (GPU: the Triton lowering), for any
  documents.

  q [B, Tq, H, D] bf16 or f16 (`supports`); k_pieces [P, B, N, K, D] bf16: the P = 3 bf16 pieces
  (`_routing._bf16_pieces`) of the float32 mean keys of each row's full blocks, in order
  (`_routing.full_block_table`: only full blocks are ever past blocks); first [B, Tq] int32: the
  table slot of the first block of each query's document; cur [B, Tq] int32: the index of the
  query's block in its document. A query's past blocks are slots [first, first + cur). n_sel:
  blocks a query takes, min(topk, ceil(T / block_size)). Returns blocks [B, Tq, H, n_sel] int32
  (indices in the query's document, the current block first; start = document start + index x
  block_size) and valid [B, Tq, H, n_sel] bool: the oracle's choice (scores equal up to float32
  summation order). tiles: the programs' shape (`GateTiles`; the choice is the same at any)."""
  batch, seq, heads, dim = q.shape
  n_pieces, _, _, kv_heads, _ = k_pieces.shape
  groups = heads // kv_heads
  bt, bn = tiles.bt, tiles.bn
  q, k_pieces, first, cur, lo, hi, t_pad, n_pad, kw = _prepare(q, k_pieces, first, cur, n_sel,
                                                               bt, bn)
  s_pad = max(2, pl.next_power_of_2(n_sel))
  out = jax.ShapeDtypeStruct((batch, t_pad, heads, s_pad), jnp.int32)
  out_spec = pl.BlockSpec((pl.squeezed, bt, pl.squeezed, s_pad), lambda i, b, h: (b, i, h, 0))
  tile_spec = pl.BlockSpec((pl.squeezed, 1), lambda i, b, h: (b, i))
  col_spec = pl.BlockSpec((pl.squeezed, bt, 1), lambda i, b, h: (b, i, 0))
  kwargs = {} if interpret else {"compiler_params": plgpu.CompilerParams(
      num_warps=tiles.num_warps, num_stages=tiles.num_stages)}
  blocks, valid = pl.pallas_call(
      functools.partial(_gpu_kernel, bt=bt, bn=bn, **kw), grid=(t_pad // bt, batch, heads),
      in_specs=[tile_spec, tile_spec,
                pl.BlockSpec((pl.squeezed, bt, pl.squeezed, dim), lambda i, b, h: (b, i, h, 0)),
                col_spec, col_spec,
                pl.BlockSpec((n_pieces, pl.squeezed, n_pad, pl.squeezed, dim),
                             lambda i, b, h: (0, b, 0, h // groups, 0))],
      out_specs=[out_spec, out_spec], out_shape=[out, out], interpret=interpret,
      name="moba_gate", **kwargs)(lo, hi, q, first, cur, k_pieces)
  return _finish(blocks, valid, seq, n_sel)


@functools.partial(jax.jit, static_argnames=("n_sel", "interpret"))
def gate_topk_tpu(q, k_pieces, first, cur, *, n_sel, interpret=False):
  """`gate_topk` on TPUs (Mosaic TPU): the same choice, the same kernel body (`_choose`), with
  heads-major query tiles (Mosaic tiles the last two dims of a block), head_dim zero-padded to
  the 128 lanes and the tiles' chunk ranges as scalar-prefetch operands. Arguments and result
  as `gate_topk`'s (`supports_tpu`). Interpreted and lowered on the CPU only: not yet run on a
  TPU."""
  batch, seq, heads, dim = q.shape
  n_pieces, _, _, kv_heads, _ = k_pieces.shape
  groups = heads // kv_heads
  q, k_pieces, first, cur, lo, hi, t_pad, n_pad, kw = _prepare(q, k_pieces, first, cur, n_sel,
                                                               TPU_BT, TPU_BN)
  extra = -dim % 128
  pad_d = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])  # zero products
  dim += extra
  q = jnp.moveaxis(pad_d(q), 2, 1)  # [B, H, T, D]
  k_pieces = jnp.moveaxis(pad_d(k_pieces), 3, 2)  # [P, B, K, N, D]
  out = jax.ShapeDtypeStruct((batch, heads, t_pad, n_sel), jnp.int32)
  out_spec = pl.BlockSpec((None, None, TPU_BT, n_sel), lambda b, h, i, lo, hi: (b, h, i, 0))
  col_spec = pl.BlockSpec((None, TPU_BT, 1), lambda b, h, i, lo, hi: (b, i, 0))
  spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=2, grid=(batch, heads, t_pad // TPU_BT),
      in_specs=[pl.BlockSpec((None, None, TPU_BT, dim), lambda b, h, i, lo, hi: (b, h, i, 0)),
                col_spec, col_spec,
                pl.BlockSpec((n_pieces, None, None, n_pad, dim),
                             lambda b, h, i, lo, hi: (0, b, jax.lax.div(h, groups), 0, 0))],
      out_specs=[out_spec, out_spec])
  if interpret:
    interpret = pltpu.InterpretParams() if hasattr(pltpu, "InterpretParams") else True
  blocks, valid = pl.pallas_call(
      functools.partial(_tpu_kernel, **kw), grid_spec=spec, out_shape=[out, out],
      interpret=interpret, name="moba_gate_tpu",
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel")))(lo, hi, q, first, cur,
                                                                     k_pieces)
  return _finish(jnp.moveaxis(blocks, 1, 2), jnp.moveaxis(valid, 1, 2), seq, n_sel)
