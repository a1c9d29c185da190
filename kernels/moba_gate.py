"""The MoBA gate in one Pallas kernel (GPU: Triton lowering; TPU: Mosaic): scores and top-k per
query tile.

For batches of single documents (`_routing.select_chunked`'s one-document path), XLA's gate
writes the float32 scores [B, T, H, N] of every query against every block's mean key (three
matmuls, one per bf16 piece of the gate keys, and their sums), then reads them once per top-k
pass: at 128K tokens, block 512, about 5 ms of a 24 ms fwd+bwd step on an H200 (run 26,
docs/kernel_notes.md; 0.995 ms with this kernel). Here one program takes BT queries of one query
head, computes their scores
chunk by chunk of BN block slots (the same bf16 pieces and products, float32 accumulation) and
keeps each query's top-k in registers: the scores never reach memory, and a tile reads only the
slots its queries can reach (causal).

The choice is `moba.select_blocks`': the current block first, then the top `topk - 1` past blocks
by score, ties to the lower block, a NaN score ranking above every number, and where fewer past
blocks exist the lowest blocks not yet taken (invalid). Scores are compared as integers
(`_order_key`: an order-preserving map of float32, -0.0 as +0.0) so that a tie and its lower index
are one comparison. Each chunk's top entries (argmax passes over the chunk) are merged into the
running list by rank: the running list's blocks all precede the chunk's, so on a tie they win.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from moba_jax.kernels import _routing as rt

BT = 64  # queries a program (GPU)
BN = 64  # block slots a chunk (GPU)
TPU_BT = 128  # queries a program (TPU: a [128, 128] score tile on the MXU)
TPU_BN = 128  # block slots a chunk (TPU)
TPU_KEY_BYTES = 8 << 20  # the gate keys' VMEM block (three pieces, double-buffered) at most
MAX_TOPK = 17  # the argmax passes a chunk makes (topk - 1); larger top-k stays with XLA's gate
_LOWEST = int(np.iinfo(np.int32).min)  # a slot never chosen: the current block, padding, taken
_NINF = int(np.float32(-np.inf).view(np.int32) ^ np.int32(0x7FFFFFFF))  # `_order_key(-inf)`


def supports(q_dtype, head_dim, topk) -> bool:
  """Whether `gate_topk` takes this case (else `_routing`'s XLA gate): 16-bit queries (float32
  queries score with HIGHEST-precision products, which the kernel's bf16 pieces do not
  replace), a head_dim the kernel's products take (a power of two, 16-256) and topk <= MAX_TOPK."""
  return (jnp.dtype(q_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
          and 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0 and topk <= MAX_TOPK)


def supports_tpu(q_dtype, head_dim, topk, n_slots) -> bool:
  """`supports` for `gate_topk_tpu`: 16-bit queries, topk <= MAX_TOPK, and the gate keys' VMEM
  block (three bf16 pieces of [N, D], D padded to the 128 lanes, double-buffered) within
  TPU_KEY_BYTES (N <= 2048 at head_dim 128)."""
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


def _choose(start, i, q, load_k, n_pieces, *, block_size, n_slots, n_sel, n_q, q_pieces, bt, bn,
            s_pad):
  """One program's choice: queries [i * bt, (i + 1) * bt) of q [bt, D] at positions start + t;
  load_k(p, c) -> [bn, D], piece p of the gate keys of slots [c * bn, (c + 1) * bn). Returns
  slots and valid [bt, s_pad] int32 (column 0: the current block). Per-query values are [bt, 1]
  (Mosaic TPU keeps no 1-D vectors)."""
  m = n_sel - 1
  t = start + i * bt + jax.lax.broadcasted_iota(jnp.int32, (bt, 1), 0)  # positions
  div = jax.lax.div  # non-negative operands: truncation is floor, with no sign op for Mosaic TPU
  current = jnp.minimum(div(t, block_size), n_slots - 1)  # [bt, 1] (rows past the queries: any)
  # float16: two bf16 pieces (8 + 3 significant bits), exact; bfloat16: itself
  qs = [q] if q_pieces == 1 else rt._bf16_pieces(q.astype(jnp.float32), 2)
  dims = (((1,), (1,)), ((), ()))
  last = jnp.minimum(div(start + jnp.minimum((i + 1) * bt, n_q) - 1, block_size),
                     n_slots - 1)  # the tile's last block
  n_chunks = jnp.maximum(div(last + bn - 1, bn), 1)  # slots [0, last) at least, one chunk at least
  col = jax.lax.broadcasted_iota(jnp.int32, (bt, bn), 1)

  def chunk(c, run):
    j = c * bn + col  # [bt, bn] block slots
    scores = None
    for qp in qs:
      for p in range(n_pieces):  # the XLA gate's order: ((q1 k1 + q1 k2) + q1 k3) + ...
        s = jax.lax.dot_general(qp, load_k(p, c), dims, preferred_element_type=jnp.float32,
                                precision=jax.lax.Precision.DEFAULT)  # bf16 x bf16: exact
        scores = s if scores is None else scores + s
    scores = jnp.where(scores != scores, float(np.finfo(np.float32).max), scores)  # NaN ranks high
    key = jnp.where(j < current, _order_key(scores), _NINF)
    key = jnp.where((j == current) | (j >= n_slots), _LOWEST, key)
    new = []
    for _ in range(m):  # argmax passes, ties to the lower slot
      best = jnp.max(key, axis=1, keepdims=True)
      first = jnp.min(jnp.where(key == best, col, bn), axis=1, keepdims=True)
      new.append((best, c * bn + first))
      key = jnp.where(col == first, _LOWEST, key)
    return _merge(run, new)

  init = [(jnp.full((bt, 1), _LOWEST, jnp.int32), jnp.zeros((bt, 1), jnp.int32))] * m
  run = jax.lax.fori_loop(0, n_chunks, chunk, init) if m else []
  out_col = jax.lax.broadcasted_iota(jnp.int32, (bt, s_pad), 1)
  slots = jnp.where(out_col == 0, current, 0)
  valid = (out_col == 0).astype(jnp.int32)
  for p, (k, s) in enumerate(run):
    slots = jnp.where(out_col == p + 1, s, slots)
    valid = jnp.where(out_col == p + 1, (k > _NINF).astype(jnp.int32), valid)
  return slots, valid


def _gpu_kernel(start_ref, q_ref, k_ref, slot_ref, valid_ref, **kw):
  load_k = lambda p, c: k_ref[p, pl.ds(c * BN, BN), :]  # [BN, D] bf16
  slot_ref[...], valid_ref[...] = _choose(start_ref[0], pl.program_id(0), q_ref[...], load_k,
                                          k_ref.shape[0], bt=BT, bn=BN, s_pad=slot_ref.shape[1],
                                          **kw)


def _tpu_kernel(start_ref, q_ref, k_ref, slot_ref, valid_ref, **kw):
  load_k = lambda p, c: k_ref[p, pl.ds(pl.multiple_of(c * TPU_BN, TPU_BN), TPU_BN), :]
  slot_ref[...], valid_ref[...] = _choose(start_ref[0], pl.program_id(2), q_ref[...], load_k,
                                          k_ref.shape[0], bt=TPU_BT, bn=TPU_BN,
                                          s_pad=slot_ref.shape[1], **kw)


def _prepare(q, k_pieces, q_start, block_size, topk, bt, bn):
  """What both wrappers do first: (q, k_pieces padded to bt queries and bn slots, the offset as
  an int32 [1], the padded lengths, the kernel body's static arguments)."""
  # no gradient (the oracle's choice is stop_gradient'ed too); a tangent would reach the Pallas
  # call's own JVP, which traces the kernel outside its grid
  q, k_pieces = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k_pieces)
  seq, n_slots = q.shape[1], k_pieces.shape[2]
  t_pad, n_pad = pl.cdiv(seq, bt) * bt, pl.cdiv(n_slots, bn) * bn
  if t_pad != seq:
    q = jnp.pad(q, ((0, 0), (0, t_pad - seq), (0, 0), (0, 0)))
  k_pieces = jnp.pad(k_pieces, ((0, 0), (0, 0), (0, n_pad - n_slots), (0, 0), (0, 0)))
  start = jnp.zeros((1,), jnp.int32) if q_start is None else jnp.reshape(q_start, (1,)).astype(
      jnp.int32)
  kw = dict(block_size=block_size, n_slots=n_slots, n_sel=min(topk, n_slots), n_q=seq,
            q_pieces=1 if q.dtype == jnp.bfloat16 else 2)
  return q, k_pieces, start, t_pad, n_pad, kw


def _finish(slots, valid, seq, n_sel, block_size):
  slots, valid = slots[:, :seq, :, :n_sel], valid[:, :seq, :, :n_sel]
  return slots * block_size, valid.astype(bool)


@functools.partial(jax.jit, static_argnames=("block_size", "topk", "interpret"))
def gate_topk(q, k_pieces, *, block_size, topk, q_start=None, interpret=False):
  """`moba.select_blocks` for batches of single documents, without the scores in memory (GPU:
  the Triton lowering).

  q [B, Tq, H, D] bf16 or f16 (`supports`), positions [q_start, q_start + Tq) of the sequence
  (q_start: an int32 scalar, may be traced: context parallelism; None: 0); k_pieces [P, B, N, K,
  D] bf16: the P = 3 bf16 pieces of the float32 block-mean keys of the whole sequence
  (`moba.slot_means`, `_routing._bf16_pieces`). Returns starts [B, Tq, H, S] int32 (block
  starts, the current block first) and valid [B, Tq, H, S] bool, S = min(topk, N): the oracle's
  result (scores equal up to float32 summation order)."""
  batch, seq, heads, dim = q.shape
  n_pieces, _, _, kv_heads, _ = k_pieces.shape
  groups = heads // kv_heads
  q, k_pieces, start, t_pad, n_pad, kw = _prepare(q, k_pieces, q_start, block_size, topk, BT, BN)
  s_pad = max(2, pl.next_power_of_2(kw["n_sel"]))
  out = jax.ShapeDtypeStruct((batch, t_pad, heads, s_pad), jnp.int32)
  out_spec = pl.BlockSpec((pl.squeezed, BT, pl.squeezed, s_pad), lambda i, b, h: (b, i, h, 0))
  kwargs = {} if interpret else {
      "compiler_params": plgpu.CompilerParams(num_warps=4, num_stages=2)}
  slots, valid = pl.pallas_call(
      functools.partial(_gpu_kernel, **kw), grid=(t_pad // BT, batch, heads),
      in_specs=[pl.BlockSpec((1,), lambda i, b, h: (0,)),
                pl.BlockSpec((pl.squeezed, BT, pl.squeezed, dim), lambda i, b, h: (b, i, h, 0)),
                pl.BlockSpec((n_pieces, pl.squeezed, n_pad, pl.squeezed, dim),
                             lambda i, b, h: (0, b, 0, h // groups, 0))],
      out_specs=[out_spec, out_spec], out_shape=[out, out], interpret=interpret,
      name="moba_gate", **kwargs)(start, q, k_pieces)
  return _finish(slots, valid, seq, kw["n_sel"], block_size)


@functools.partial(jax.jit, static_argnames=("block_size", "topk", "interpret"))
def gate_topk_tpu(q, k_pieces, *, block_size, topk, q_start=None, interpret=False):
  """`gate_topk` on TPUs (Mosaic TPU): the same choice, the same kernel body (`_choose`), with
  heads-major query tiles (Mosaic tiles the last two dims of a block), head_dim zero-padded to
  the 128 lanes and the query offset as a scalar-prefetch operand. Arguments and result as
  `gate_topk`'s (`supports_tpu`). Interpreted and lowered on the CPU only: not yet run on a
  TPU."""
  batch, seq, heads, dim = q.shape
  n_pieces, _, _, kv_heads, _ = k_pieces.shape
  groups = heads // kv_heads
  q, k_pieces, start, t_pad, n_pad, kw = _prepare(q, k_pieces, q_start, block_size, topk,
                                                  TPU_BT, TPU_BN)
  extra = -dim % 128
  pad_d = lambda x: jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])  # zero products
  dim += extra
  q = jnp.moveaxis(pad_d(q), 2, 1)  # [B, H, T, D]
  k_pieces = jnp.moveaxis(pad_d(k_pieces), 3, 2)  # [P, B, K, N, D]
  s_pad = kw["n_sel"]
  out = jax.ShapeDtypeStruct((batch, heads, t_pad, s_pad), jnp.int32)
  out_spec = pl.BlockSpec((None, None, TPU_BT, s_pad), lambda b, h, i, s: (b, h, i, 0))
  spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(batch, heads, t_pad // TPU_BT),
      in_specs=[pl.BlockSpec((None, None, TPU_BT, dim), lambda b, h, i, s: (b, h, i, 0)),
                pl.BlockSpec((n_pieces, None, None, n_pad, dim),
                             lambda b, h, i, s: (0, b, jax.lax.div(h, groups), 0, 0))],
      out_specs=[out_spec, out_spec])
  if interpret:
    interpret = pltpu.InterpretParams() if hasattr(pltpu, "InterpretParams") else True
  slots, valid = pl.pallas_call(
      functools.partial(_tpu_kernel, **kw), grid_spec=spec, out_shape=[out, out],
      interpret=interpret, name="moba_gate_tpu",
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel")))(start, q, k_pieces)
  return _finish(jnp.moveaxis(slots, 1, 2), jnp.moveaxis(valid, 1, 2), seq, kw["n_sel"],
                 block_size)
