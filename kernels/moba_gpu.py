"""MoBA attention for GPUs: Pallas (Triton lowering), key-block-major, forward and backward.

Design (DESIGN.md section 5; docs/kernel_notes.md): routing (`_routing.route`) gives every
(query, head) one partial row per chosen block: its current block (dense section, block-diagonal
causal) and each chosen past block (sparse section, rows sorted by key block, padded per block to
the row tile). One kernel program takes one row tile, gathers its query rows, and streams the one
key range they share, so the work stays dense however queries choose. Partial outputs are merged
by log-sum-exp. Backward: dQ per partial row (same tiling, summed afterwards, no atomics);
dK/dV per key tile of a block, looping over the rows routed to it (ragged, dynamic trip count),
then scattered onto key positions. `BlockSizes(fused_dq=True)` instead adds each chunk's dQ into
a float32 buffer with atomics inside the dK/dV kernel (no dQ kernel; not yet timed on a GPU).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from moba_jax.kernels import _routing as rt

NEG = -1e30
_PREC = jax.lax.Precision.HIGHEST  # IEEE float32 dots for float32 inputs; bf16 stays bf16


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (powers of two). block_q is the row tile of the routing layout (fwd and dQ)."""

  block_q: int = 64
  block_k: int = 64
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  num_warps: int = 4
  num_stages: int = 2
  # Backward variant: False = a dQ kernel per partial row (deterministic); True = dQ accumulated
  # with float32 atomic adds inside the dK/dV kernel (no dQ kernel, no second QK^T/dO V^T;
  # summation order, hence the last bits of dQ, vary between runs). Not yet timed on a GPU.
  fused_dq: bool = False

  @classmethod
  def get_default(cls, head_dim: int, dtype) -> "BlockSizes":
    if head_dim >= 128 and jnp.dtype(dtype).itemsize == 2:
      return cls(num_stages=3)  # fastest fwd+bwd of the H200 sweep (docs/kernel_notes.md)
    return cls()


def _dot(a, b, trans_b=False):  # [M, K] x [K, N] (or [N, K] when trans_b) -> [M, N] float32
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, precision=_PREC, preferred_element_type=jnp.float32)


def _cdiv(a, b):
  return jax.lax.div(a + b - 1, b)


def _iota(n):
  return jax.lax.broadcasted_iota(jnp.int32, (n,), 0)


def _row_mask(kpos, lo, hi):  # [Mq, Bk] bool: key kpos visible to each row
  return (kpos[None, :] >= lo[:, None]) & (kpos[None, :] < hi[:, None])


def _fwd_kernel(ks_ref, ke_ref, rq_ref, lo_ref, hi_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
                bq, bk, scale):
  i, b = pl.program_id(0), pl.program_id(1)
  ks, ke = ks_ref[b, i], ke_ref[b, i]
  rows = pl.ds(i * bq, bq)
  lo, hi = lo_ref[b, rows], hi_ref[b, rows]
  q = q_ref[b, jnp.maximum(rq_ref[b, rows], 0), :]  # [Mq, D] gathered rows

  def body(c, carry):
    m, l, acc = carry
    start = ks + c * bk
    k, v = k_ref[b, pl.ds(start, bk), :], v_ref[b, pl.ds(start, bk), :]  # [Bk, D]
    mask = _row_mask(start + _iota(bk), lo, hi)
    s = jnp.where(mask, _dot(q, k, trans_b=True) * scale, NEG)  # [Mq, Bk]
    m_new = jnp.maximum(m, s.max(axis=1))
    p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
    alpha = jnp.exp(m - m_new)
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)  # [Mq, D]
    return m_new, l * alpha + p.sum(axis=1), acc

  init = (jnp.full((bq,), NEG, jnp.float32), jnp.zeros((bq,), jnp.float32),
          jnp.zeros((bq, q.shape[-1]), jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, _cdiv(ke - ks, bk), body, init)
  ok = l > 0
  o_ref[...] = (acc / jnp.where(ok, l, 1.0)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), -jnp.inf)


def _dq_kernel(ks_ref, ke_ref, rq_ref, lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               dl_ref, dq_ref, *, bq, bk, scale):
  i, b = pl.program_id(0), pl.program_id(1)
  ks, ke = ks_ref[b, i], ke_ref[b, i]
  rows = pl.ds(i * bq, bq)
  lo, hi = lo_ref[b, rows], hi_ref[b, rows]
  rq = jnp.maximum(rq_ref[b, rows], 0)
  q, do = q_ref[b, rq, :], do_ref[b, rq, :]  # [Mq, D]
  lse, delta = lse_ref[b, rq], dl_ref[b, rq]  # [Mq]

  def body(c, dq):
    start = ks + c * bk
    k, v = k_ref[b, pl.ds(start, bk), :], v_ref[b, pl.ds(start, bk), :]
    mask = _row_mask(start + _iota(bk), lo, hi)
    s = _dot(q, k, trans_b=True) * scale  # [Mq, Bk]
    p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
    ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)  # [Mq, D]

  dq = jax.lax.fori_loop(0, _cdiv(ke - ks, bk), body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = dq * scale


def _dkdv_kernel(iks_ref, ir0_ref, ir1_ref, rq_ref, lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref,
                 lse_ref, dl_ref, *out_refs, bq, bk, scale, fused_dq):
  if fused_dq:  # the zeroed dQ buffer comes in aliased to the last output
    _, dk_ref, dv_ref, dq_ref = out_refs
  else:
    dk_ref, dv_ref = out_refs
  j, b = pl.program_id(0), pl.program_id(1)
  ks, r0, r1 = iks_ref[b, j], ir0_ref[b, j], ir1_ref[b, j]
  k, v = k_ref[b, pl.ds(ks, bk), :], v_ref[b, pl.ds(ks, bk), :]  # [Bk, D]
  kpos = ks + _iota(bk)

  def body(c, carry):
    dk, dv = carry
    first = r0 + c * bq
    rows = pl.ds(first, bq)
    live = (first + _iota(bq)) < r1
    lo, hi = lo_ref[b, rows], jnp.where(live, hi_ref[b, rows], 0)
    rq_raw = rq_ref[b, rows]
    rq = jnp.maximum(rq_raw, 0)
    q, do = q_ref[b, rq, :], do_ref[b, rq, :]  # [Mq, D]
    lse, delta = lse_ref[b, rq], dl_ref[b, rq]
    mask = (kpos[:, None] >= lo[None, :]) & (kpos[:, None] < hi[None, :])  # [Bk, Mq]
    st = _dot(k, q, trans_b=True) * scale  # [Bk, Mq]
    pt = jnp.where(mask, jnp.exp(st - lse[None, :]), 0.0)
    dv = dv + _dot(pt.astype(do.dtype), do)  # [Bk, D]
    dst = pt * (_dot(v, do, trans_b=True) - delta[None, :])
    if fused_dq:  # dQ rows of this chunk += dS^T K; padding and dead rows go to the spare row TG
      dump = dq_ref.shape[1] - 1
      target = jnp.where(live & (rq_raw >= 0), rq_raw, dump)
      dq_c = _dot(dst.T.astype(k.dtype), k) * scale  # [Mq, D]
      plgpu.atomic_add(dq_ref, (b, target[:, None], _iota(k.shape[-1])[None, :]), dq_c)
    return dk + _dot(dst.astype(q.dtype), q), dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(0, _cdiv(r1 - r0, bq), body, (zeros, zeros))
  dk_ref[...] = dk * scale
  dv_ref[...] = dv


def _whole(x):
  return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _call(kernel, grid, args, out_shape, out_specs, sizes, interpret, aliases=None):
  kwargs = {}
  if not interpret:
    kwargs["compiler_params"] = plgpu.CompilerParams(num_warps=sizes.num_warps,
                                                     num_stages=sizes.num_stages)
  return pl.pallas_call(kernel, grid=grid, in_specs=[_whole(a) for a in args],
                        out_specs=out_specs, out_shape=out_shape, interpret=interpret,
                        input_output_aliases=aliases or {}, **kwargs)(*args)


def _row_specs(bq, dim):
  return [pl.BlockSpec((pl.squeezed, bq, dim), lambda i, b: (b, i, 0)),
          pl.BlockSpec((pl.squeezed, bq), lambda i, b: (b, i))]


def _prep(q, k, v, sizes):
  """Row layouts padded for the kernels: q [BK, TG, Dp], k/v [BK, T + pad, Dp]."""
  kv_heads, dim = k.shape[2], q.shape[-1]
  dp = max(16, pl.next_power_of_2(dim))
  pad_k = max(sizes.block_k, sizes.block_k_dkv)
  padd = lambda x, t=0: jnp.pad(x, ((0, 0), (0, t), (0, dp - dim)))
  return (padd(rt.heads_major(q, kv_heads)), padd(rt.heads_major(k, kv_heads), pad_k),
          padd(rt.heads_major(v, kv_heads), pad_k))


def _pad_rows(r: rt.Routing, extra):
  pad = lambda x, f: jnp.pad(x, ((0, 0), (0, extra)), constant_values=f)
  return pad(r.rq, -1), pad(r.lo, 0), pad(r.hi, 0)


def forward_rows(routing, dims, qr, kr, vr, sizes, scale, interpret):
  """The forward kernel alone: partial rows o_rows [BK, R, Dp] and lse_rows [BK, R] (float32)."""
  bk_, dp = qr.shape[0], qr.shape[-1]
  bq = sizes.block_q
  args = (routing.tile_ks, routing.tile_ke, routing.rq, routing.lo, routing.hi, qr, kr, vr)
  kernel = functools.partial(_fwd_kernel, bq=bq, bk=sizes.block_k, scale=scale)
  out_shape = [jax.ShapeDtypeStruct((bk_, dims.rows, dp), jnp.float32),
               jax.ShapeDtypeStruct((bk_, dims.rows), jnp.float32)]
  return _call(kernel, (dims.tiles, bk_), args, out_shape, _row_specs(bq, dp), sizes, interpret)


def _forward(q, k, v, routing, dims, sizes, scale, interpret):
  batch, seq = q.shape[:2]
  qr, kr, vr = _prep(q, k, v, sizes)
  o_rows, lse_rows = forward_rows(routing, dims, qr, kr, vr, sizes, scale, interpret)
  o, lse = rt.merge_rows(o_rows, lse_rows, routing.pos)  # [BK, TG, Dp], [BK, TG]
  o = o.astype(q.dtype)
  return rt.heads_minor(o[..., :q.shape[-1]], batch, seq), (o, lse)


def _dkdv_items(routing, dims, sizes, seq):
  """dK/dV work items: (first key, first row, end row) per key tile, dense ones then sparse."""
  bkd, g = sizes.block_k_dkv, dims.groups
  first = jnp.arange(0, seq, bkd, dtype=jnp.int32)
  last = jnp.minimum(first + bkd, seq) - 1
  d_ks = jnp.broadcast_to(first, routing.rq.shape[:1] + first.shape)
  d_r0 = d_ks * g
  d_r1 = routing.block_end[:, last] * g
  if dims.max_groups == 0:
    return d_ks, d_r0, d_r1
  n_c = -(-dims.block_size // bkd)
  c = jnp.arange(n_c, dtype=jnp.int32) * bkd
  has = (routing.group_p < seq)[:, :, None]
  s_ks = jnp.where(has, routing.group_p[:, :, None] + c, 0)  # [BK, Gm, n_c]
  s_r0 = jnp.where(has, routing.group_r0[:, :, None], 0) + 0 * c
  s_r1 = jnp.where(has, routing.group_r1[:, :, None], 0) + 0 * c
  flat = lambda x: x.reshape(x.shape[0], -1)
  cat = lambda a, b_: jnp.concatenate([a, flat(b_)], axis=1)
  return cat(d_ks, s_ks), cat(d_r0, s_r0), cat(d_r1, s_r1)


def _backward(q, k, v, routing, o, lse, do, dims, sizes, scale, interpret):
  batch, seq, _, dim = q.shape
  qr, kr, vr = _prep(q, k, v, sizes)
  bk_, dp = qr.shape[0], qr.shape[-1]
  dor = jnp.pad(rt.heads_major(do, k.shape[2]), ((0, 0), (0, 0), (0, dp - dim)))
  delta = jnp.sum(o.astype(jnp.float32) * dor.astype(jnp.float32), axis=-1)  # [BK, TG]
  bq = sizes.block_q
  if not sizes.fused_dq:
    args = (routing.tile_ks, routing.tile_ke, routing.rq, routing.lo, routing.hi, qr, kr, vr, dor,
            lse, delta)
    kernel = functools.partial(_dq_kernel, bq=bq, bk=sizes.block_k, scale=scale)
    dq_rows = _call(kernel, (dims.tiles, bk_), args,
                    jax.ShapeDtypeStruct((bk_, dims.rows, dp), jnp.float32),
                    _row_specs(bq, dp)[0], sizes, interpret)
    dq = rt.gather_rows_sum(dq_rows, routing.pos)  # [BK, TG, Dp]

  bkd = sizes.block_k_dkv
  iks, ir0, ir1 = _dkdv_items(routing, dims, sizes, seq)
  rq, lo, hi = _pad_rows(routing, sizes.block_q_dkv)
  args = (iks, ir0, ir1, rq, lo, hi, qr, kr, vr, dor, lse, delta)
  kernel = functools.partial(_dkdv_kernel, bq=sizes.block_q_dkv, bk=bkd, scale=scale,
                             fused_dq=sizes.fused_dq)
  n_items = iks.shape[1]
  shape = jax.ShapeDtypeStruct((bk_, n_items * bkd, dp), jnp.float32)
  spec = pl.BlockSpec((pl.squeezed, bkd, dp), lambda j, b: (b, j, 0))
  if sizes.fused_dq:  # one spare row (index TG) takes padding and dead rows' zero updates
    dq0 = jnp.zeros((bk_, qr.shape[1] + 1, dp), jnp.float32)
    dk_items, dv_items, dq = _call(
        kernel, (n_items, bk_), args + (dq0,),
        [shape, shape, jax.ShapeDtypeStruct(dq0.shape, jnp.float32)], [spec, spec, _whole(dq0)],
        sizes, interpret, aliases={len(args): 2})
    dq = dq[:, :-1]
  else:
    dk_items, dv_items = _call(kernel, (n_items, bk_), args, [shape, shape], [spec, spec], sizes,
                               interpret)
  back = lambda x, like: rt.heads_minor(x[..., :dim], batch, seq).astype(like.dtype)
  dk, dv = _place(dk_items, iks, seq, bkd), _place(dv_items, iks, seq, bkd)
  return back(dq, q), back(dk, k), back(dv, v)


def _place(items, iks, seq, bkd):
  """Item outputs [BK, NI * Bk, Dp] onto key positions [BK, T, Dp]: the dense items are already
  in key order (item c holds keys [c * Bk, (c + 1) * Bk)); the sparse ones are added by scatter."""
  n_dense = -(-seq // bkd)
  out = items[:, :seq]
  if items.shape[1] == n_dense * bkd:
    return out
  pos = (iks[:, n_dense:, None] + jnp.arange(bkd, dtype=jnp.int32)).reshape(iks.shape[0], -1)
  add = jax.vmap(lambda o, x, p: o.at[p].add(x, mode="drop"))
  return add(out, items[:, n_dense * bkd:], pos)


_moba = rt.custom_vjp_attention(_forward, _backward)


@functools.partial(jax.jit, static_argnames=("block_size", "topk", "softmax_scale", "interpret",
                                             "block_sizes"))
def moba_attention_gpu(q, k, v, segment_ids, *, block_size, topk, softmax_scale=None,
                       interpret=False, block_sizes: BlockSizes | None = None):
  """Causal MoBA attention. q [B, T, H, D]; k, v [B, T, K, D]; segment_ids [B, T] int."""
  sizes = block_sizes or BlockSizes.get_default(q.shape[-1], q.dtype)
  return rt.run_kernel(_moba, q, k, v, segment_ids, block_size=block_size, topk=topk,
                       softmax_scale=softmax_scale, interpret=interpret, sizes=sizes)
