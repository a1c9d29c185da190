"""The MoBA gate on GPUs in one Pallas kernel (Triton lowering): scores and top-k per query tile.

For batches of single documents (`_routing.select_chunked`'s one-document path), XLA's gate
writes the float32 scores [B, T, H, N] of every query against every block's mean key (three
matmuls, one per bf16 piece of the gate keys, and their sums), then reads them once per top-k
pass: at 128K tokens, block 512, about 5 ms of a 24 ms fwd+bwd step on an H200 (run 26,
docs/kernel_notes.md). Here one program takes BT queries of one query head, computes their scores
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
from jax.experimental.pallas import triton as plgpu

BT = 64  # queries a program
BN = 64  # block slots a chunk
MAX_TOPK = 17  # the argmax passes a chunk makes (topk - 1); larger top-k stays with XLA's gate
_LOWEST = int(np.iinfo(np.int32).min)  # a slot never chosen: the current block, padding, taken
_NINF = int(np.float32(-np.inf).view(np.int32) ^ np.int32(0x7FFFFFFF))  # `_order_key(-inf)`


def supports(q_dtype, head_dim, topk) -> bool:
  """Whether `gate_topk` takes this case (else `_routing`'s XLA gate): 16-bit queries (float32
  queries score with HIGHEST-precision products, which the kernel's bf16 pieces do not
  replace), a head_dim the kernel's products take (a power of two, 16-256) and topk <= MAX_TOPK."""
  return (jnp.dtype(q_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
          and 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0 and topk <= MAX_TOPK)


def _top16(x):
  """The float32 whose bits are x's top 16 (x's leading bfloat16, by truncation): a mask, which
  no compiler rewrites away (`_routing._bf16_pieces`)."""
  bits = jax.lax.bitcast_convert_type(x, jnp.int32) & jnp.int32(-65536)  # 0xFFFF0000
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _order_key(x):
  """int32 keys ordered as the float32 x (-inf lowest, +inf highest; -0.0 == +0.0; no NaN)."""
  bits = jax.lax.bitcast_convert_type(jnp.where(x == 0.0, 0.0, x), jnp.int32)
  return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _merge(run, new):
  """The m best of two lists of m (key, slot) vectors [BT], each sorted best first, every slot of
  `run` below every slot of `new` (so `run` wins a tie). Each entry's rank in the union is its
  rank in its list plus the entries of the other list that beat it."""
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


def _gate_kernel(start_ref, q_ref, k_ref, slot_ref, valid_ref, *, block_size, n_slots, n_sel,
                 n_q, q_pieces):
  i = pl.program_id(0)
  m = n_sel - 1
  start = start_ref[0]  # the first query's position (a query offset; 0 without)
  t = start + i * BT + jax.lax.broadcasted_iota(jnp.int32, (BT,), 0)  # positions
  current = jnp.minimum(t // block_size, n_slots - 1)  # [BT] (rows past the queries: any slot)
  q = q_ref[...]  # [BT, D] bf16 or f16
  if q_pieces == 1:
    qs = [q]
  else:  # float16: two bf16 pieces (8 + 3 significant bits), exact
    q32 = q.astype(jnp.float32)
    hi = _top16(q32)
    qs = [hi.astype(jnp.bfloat16), (q32 - hi).astype(jnp.bfloat16)]
  dims = (((1,), (1,)), ((), ()))
  last = jnp.minimum((start + jnp.minimum((i + 1) * BT, n_q) - 1) // block_size,
                     n_slots - 1)  # the tile's last block
  n_chunks = jnp.maximum(pl.cdiv(last, BN), 1)  # slots [0, last) at least, one chunk at least

  def chunk(c, run):
    j = c * BN + jax.lax.broadcasted_iota(jnp.int32, (BT, BN), 1)  # [BT, BN] block slots
    scores = None
    for qp in qs:
      for p in range(k_ref.shape[0]):  # the XLA gate's order: ((q1 k1 + q1 k2) + q1 k3) + ...
        kp = k_ref[p, pl.ds(c * BN, BN), :]  # [BN, D] bf16
        s = jax.lax.dot_general(qp, kp, dims, preferred_element_type=jnp.float32)
        scores = s if scores is None else scores + s
    scores = jnp.where(scores != scores, float(np.finfo(np.float32).max), scores)  # NaN ranks high
    cur = current[:, None]
    key = jnp.where(j < cur, _order_key(scores), _NINF)
    key = jnp.where((j == cur) | (j >= n_slots), _LOWEST, key)
    col = jax.lax.broadcasted_iota(jnp.int32, (BT, BN), 1)
    new = []
    for _ in range(m):  # argmax passes, ties to the lower slot
      best = jnp.max(key, axis=1)
      first = jnp.min(jnp.where(key == best[:, None], col, BN), axis=1)
      new.append((best, c * BN + first))
      key = jnp.where(col == first[:, None], _LOWEST, key)
    return _merge(run, new)

  init = [(jnp.full((BT,), _LOWEST, jnp.int32), jnp.zeros((BT,), jnp.int32))] * m
  run = jax.lax.fori_loop(0, n_chunks, chunk, init) if m else []
  col = jax.lax.broadcasted_iota(jnp.int32, slot_ref.shape, 1)
  slots = jnp.where(col == 0, current[:, None], 0)
  valid = (col == 0).astype(jnp.int32)
  for p, (k, s) in enumerate(run):
    slots = jnp.where(col == p + 1, s[:, None], slots)
    valid = jnp.where(col == p + 1, (k > _NINF).astype(jnp.int32)[:, None], valid)
  slot_ref[...] = slots
  valid_ref[...] = valid


@functools.partial(jax.jit, static_argnames=("block_size", "topk", "interpret"))
def gate_topk(q, k_pieces, *, block_size, topk, q_start=None, interpret=False):
  """`moba.select_blocks` for batches of single documents, without the scores in memory.

  q [B, Tq, H, D] bf16 or f16 (`supports`), positions [q_start, q_start + Tq) of the sequence
  (q_start: an int32 scalar, may be traced: context parallelism; None: 0); k_pieces [P, B, N, K,
  D] bf16: the P = 3 bf16 pieces of the float32 block-mean keys of the whole sequence
  (`moba.slot_means`, `_routing._bf16_pieces`). Returns starts [B, Tq, H, S] int32 (block
  starts, the current block first) and valid [B, Tq, H, S] bool, S = min(topk, N): the oracle's
  result (scores equal up to float32 summation order)."""
  # no gradient (the oracle's choice is stop_gradient'ed too); a tangent would reach the Pallas
  # call's own JVP, which traces the kernel outside its grid
  q, k_pieces = jax.lax.stop_gradient(q), jax.lax.stop_gradient(k_pieces)
  batch, seq, heads, dim = q.shape
  n_pieces, _, n_slots, kv_heads, _ = k_pieces.shape
  groups = heads // kv_heads
  n_sel = min(topk, n_slots)
  t_pad, n_pad = pl.cdiv(seq, BT) * BT, pl.cdiv(n_slots, BN) * BN
  if t_pad != seq:
    q = jnp.pad(q, ((0, 0), (0, t_pad - seq), (0, 0), (0, 0)))
  k_pieces = jnp.pad(k_pieces, ((0, 0), (0, 0), (0, n_pad - n_slots), (0, 0), (0, 0)))
  s_pad = max(2, pl.next_power_of_2(n_sel))
  kernel = functools.partial(_gate_kernel, block_size=block_size, n_slots=n_slots, n_sel=n_sel,
                             n_q=seq, q_pieces=1 if q.dtype == jnp.bfloat16 else 2)
  start = jnp.zeros((1,), jnp.int32) if q_start is None else jnp.reshape(q_start, (1,)).astype(
      jnp.int32)
  out = jax.ShapeDtypeStruct((batch, t_pad, heads, s_pad), jnp.int32)
  out_spec = pl.BlockSpec((pl.squeezed, BT, pl.squeezed, s_pad), lambda i, b, h: (b, i, h, 0))
  kwargs = {} if interpret else {
      "compiler_params": plgpu.CompilerParams(num_warps=4, num_stages=2)}
  slots, valid = pl.pallas_call(
      kernel, grid=(t_pad // BT, batch, heads),
      in_specs=[pl.BlockSpec((1,), lambda i, b, h: (0,)),
                pl.BlockSpec((pl.squeezed, BT, pl.squeezed, dim), lambda i, b, h: (b, i, h, 0)),
                pl.BlockSpec((n_pieces, pl.squeezed, n_pad, pl.squeezed, dim),
                             lambda i, b, h: (0, b, 0, h // groups, 0))],
      out_specs=[out_spec, out_spec], out_shape=[out, out], interpret=interpret,
      name="moba_gate", **kwargs)(start, q, k_pieces)
  slots, valid = slots[:, :seq, :, :n_sel], valid[:, :seq, :, :n_sel]
  return slots * block_size, valid.astype(bool)
