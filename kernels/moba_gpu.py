"""MoBA attention for GPUs: Pallas (Triton lowering), key-block-major, forward and backward.

Design (docs/kernel_notes.md): routing (`_routing.route`) gives every
(query, head) one partial row per chosen block: its current block (dense section, block-diagonal
causal) and each chosen past block (sparse section, rows sorted by key block, padded per block to
the row tile). One kernel program takes one row tile, gathers its query rows, and streams the one
key range they share, so the work stays dense however queries choose. Partial outputs are merged
by log-sum-exp. Key chunks that every row of a tile sees whole skip the mask. Backward: dQ per
partial row (same tiling, summed afterwards, no atomics); dK/dV per key tile, looping over the
rows that see it (its block's own rows up to the diagonal with the mask, then the rest and the
rows of the past-block group it belongs to without), so dK/dV come out in key order. dQ by atomic
adds inside the dK/dV kernel was measured 2.6-4.7x slower and removed (docs/kernel_notes.md).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from moba_jax.attention import KernelOptions
from moba_jax.kernels import _routing as rt
from moba_jax.kernels import moba_mgpu

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
  num_warps_dkv: int | None = None  # the dK/dV kernel's warps (None: num_warps)
  # 64 or 128: the forward runs the Mosaic GPU kernel (kernels/moba_mgpu.py: TMA, wgmma, a
  # producer warpgroup) with key chunks of this size; it needs block_q=128. 0: the Triton one.
  mosaic_block_kv: int = 0
  # 1: dQ runs the Mosaic GPU kernel (key chunks of 64; it needs block_q=128). 0: the Triton one.
  mosaic_dq: int = 0
  # 1: dK/dV runs the Mosaic GPU kernel (128-key tiles) where every past-block group is aligned to
  # them (else the Triton one; float32 K/V of the context-parallel path too). Needs block_q=128.
  mosaic_dkdv: int = 0
  # n > 1: the Mosaic forward and backward (mosaic_block_kv, mosaic_dq=1, mosaic_dkdv=1) run over
  # n chunks of kv heads, one after another, so their partial rows (the forward's o rows, the
  # dQ rows) exist for 1/n of the heads at a time (memory), in smaller kernel grids (time:
  # docs/benchmarks.md). It must divide the kv heads. The backward's chunks apply wherever the
  # Mosaic dQ and dK/dV run (any documents and block size since run 27). 1 (the default):
  # the kernels choose n themselves there (`_split_heads`: more than MOSAIC_SELECTED_PER_CHUNK
  # selected blocks a query, e.g. block 128 top-8, or rows over `_routing.PARTIAL_BYTES`).
  mosaic_head_chunks: int = 1
  # The Mosaic forward and dQ overlap each key chunk's elementwise work with the previous
  # chunk's last product (FlashAttention-3's intra-warpgroup overlap: the forward's softmax
  # under P V, the dQ's dS under dS K) where routing blocks have at least this many keys (0: at
  # every block size). On the H200, the forward (run 29): -9% at block 4096, -7% at 2048, -6% at
  # 1024, +3% at 512; the dQ (run 30): -1.4% at 4096, -0.3% at 2048, -1.4% at 1024, +1.5% at
  # 512 (docs/kernel_notes.md).
  mosaic_overlap_block: int = 1024
  # 1: the Mosaic dK/dV splits its longest key tiles into pieces of consecutive row chunks, each
  # adding its dK, dV in float32 to a slot of its own (`moba_mgpu.dkdv_pieces`), where a tile has
  # more chunks than half a CTA's mean work: with GQA the items are G times fewer and longer,
  # too few to balance (16K block 128 top-8, 16/2 heads: the busiest CTA 2.18x the mean work ->
  # 1.08x, by tools/dkdv_balance.py; an H100's step 4.40 ms there in run 48, against 3.71-3.83
  # with 16/16 heads in run 47). 0 (the default until a GPU measures it): whole tiles.
  mosaic_dkdv_split: int = 0

  def __post_init__(self):
    for name in ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "num_warps", "num_stages",
                 "num_warps_dkv"):
      value = getattr(self, name)
      if value is not None and value < 1:
        raise ValueError(f"{name}={value} must be at least 1")
    for name, accepted, off in (("mosaic_block_kv", (0, 64, 128), "the Triton forward"),
                                ("mosaic_dq", (0, 1), "the Triton dQ"),
                                ("mosaic_dkdv", (0, 1), "the Triton dK/dV")):
      value = getattr(self, name)
      if value not in accepted:
        raise ValueError(f"{name}={value} must be one of {list(accepted)} (0: {off})")
      if value and self.block_q != moba_mgpu.ROWS:
        raise ValueError(f"{name}={value} needs block_q={moba_mgpu.ROWS} (two warpgroups of 64 "
                         f"rows), got block_q={self.block_q}")
    if self.mosaic_dkdv_split not in (0, 1):
      raise ValueError(f"mosaic_dkdv_split={self.mosaic_dkdv_split} must be 0 (whole key tiles) "
                       "or 1 (the longest split into pieces)")
    if self.mosaic_dkdv_split and not self.mosaic_dkdv:
      raise ValueError("mosaic_dkdv_split=1 needs the Mosaic dK/dV (mosaic_dkdv=1)")
    if self.mosaic_overlap_block < 0:
      raise ValueError(f"mosaic_overlap_block={self.mosaic_overlap_block} must be at least 0 (0: "
                       "the forward and dQ overlap at every block size)")
    n = self.mosaic_head_chunks
    if n < 1:
      raise ValueError(f"mosaic_head_chunks={n} must be at least 1")
    if n > 1 and not (self.mosaic_block_kv and self.mosaic_dq and self.mosaic_dkdv):
      raise ValueError(f"mosaic_head_chunks={n} needs the Mosaic kernels (mosaic_block_kv 64 or "
                       f"128, mosaic_dq=1, mosaic_dkdv=1), got {self.mosaic_block_kv}, "
                       f"{self.mosaic_dq}, {self.mosaic_dkdv}")

  def overlaps(self, block_size: int) -> bool:
    """Whether the Mosaic forward and dQ run their overlapped schedule at this routing block."""
    return block_size >= self.mosaic_overlap_block

  @classmethod
  def get_default(cls, head_dim: int, dtype, interpret: bool = False) -> "BlockSizes":
    """Compiled on a Hopper GPU (jax >= 0.11) with 16-bit inputs and head_dim 64 or 128: the
    Mosaic GPU kernels (128-row tiles, 128-key forward chunks; docs/benchmarks.md run 16). Else,
    and interpreted (CI's jax cannot interpret them), the Triton kernels (head_dim 128 in 16
    bits: 3 stages, the run-2 sweep's best; the Triton dK/dV keeps them for groups off the
    128-key grid). Compiled with float32 inputs, 32-wide tiles: the IEEE float32 products run
    on the FMA units, where 64-wide tiles cost about ten times the time and five times the
    compile (run 46, one H100, fwd+bwd at 4K block 256 top-3, 8/2 heads, head_dim 128: 87.4 ->
    8.7 ms, compile 37.5 -> 7.8 s; docs/kernel_notes.md). Interpreted they stay 64 (fewer grid
    steps: the CPU suite's time)."""
    stages = 3 if head_dim >= 128 and jnp.dtype(dtype).itemsize == 2 else 2
    if (not interpret and moba_mgpu.is_default_here()
        and moba_mgpu.refusal(dtype, head_dim, moba_mgpu.ROWS) is None):
      return cls(block_q=moba_mgpu.ROWS, num_stages=stages, mosaic_block_kv=128, mosaic_dq=1,
                 mosaic_dkdv=1)
    if not interpret and jnp.dtype(dtype).itemsize == 4:
      return cls(block_q=32, block_k=32, block_q_dkv=32, block_k_dkv=32, num_stages=stages)
    return cls(num_stages=stages)


def _dot(a, b, trans_b=False):  # [M, K] x [K, N] (or [N, K] when trans_b) -> [M, N] float32
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, precision=_PREC, preferred_element_type=jnp.float32)


def _cdiv(a, b):
  return jax.lax.div(a + b - 1, b)


def _iota(n):
  return jax.lax.broadcasted_iota(jnp.int32, (n,), 0)


def _row_mask(kpos, lo, hi):  # [Mq, Bk] bool: key kpos visible to each row
  return (kpos[None, :] >= lo[:, None]) & (kpos[None, :] < hi[:, None])


@dataclasses.dataclass(frozen=True)
class _RowLayout:
  """Where the kernels find rows in the caller's own layout (no transposes): q, do and the
  per-query lse/delta as [B, T * H, ...] (query head h = kv head * G + g), k and v as
  [B, T * K, D]; program b of the grid is (batch b // K, kv head b % K)."""

  seq: int
  kv_heads: int
  groups: int

  def split(self, b):
    return b // self.kv_heads, b % self.kv_heads

  def q_rows(self, rq, kvh):  # routing rows t * G + g of kv head kvh (-1: padding -> row 0)
    rq = jnp.maximum(rq, 0)
    t, g = rq // self.groups, rq % self.groups
    return (t * self.kv_heads + kvh) * self.groups + g

  def k_rows(self, kpos, kvh):  # keys past the end read the last key (they are masked)
    return jnp.minimum(kpos, self.seq - 1) * self.kv_heads + kvh


def _unmasked_chunks(ks, lo, hi, live, bk, n_all):
  """Leading key chunks of a row tile that every live row sees whole (no mask needed).

  Rows of a sparse tile all see one whole block; rows of a dense tile see [block start, t], so
  the chunks before the diagonal are whole too. Dead rows (padding) are not looked at: their
  outputs are never read."""
  lo_max = jnp.max(jnp.where(live, lo, 0))
  hi_min = jnp.min(jnp.where(live, hi, jnp.int32(2 ** 30)))
  n = jnp.where(lo_max <= ks, jax.lax.div(jnp.maximum(hi_min - ks, 0), bk), 0)
  return jnp.minimum(n, n_all)


def _fwd_kernel(ks_ref, ke_ref, rq_ref, lo_ref, hi_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *,
                bq, bk, scale, lay):
  i, b = pl.program_id(0), pl.program_id(1)
  batch, kvh = lay.split(b)
  ks, ke = ks_ref[b, i], ke_ref[b, i]
  rows = pl.ds(i * bq, bq)
  lo, hi, rq = lo_ref[b, rows], hi_ref[b, rows], rq_ref[b, rows]
  q = q_ref[batch, lay.q_rows(rq, kvh), :]  # [Mq, D] gathered rows

  def body(c, carry, masked):
    m, l, acc = carry
    start = ks + c * bk
    kr = lay.k_rows(start + _iota(bk), kvh)
    k, v = k_ref[batch, kr, :], v_ref[batch, kr, :]  # [Bk, D]
    s = _dot(q, k, trans_b=True) * scale  # [Mq, Bk]
    if masked:
      mask = _row_mask(start + _iota(bk), lo, hi)
      s = jnp.where(mask, s, NEG)
    m_new = jnp.maximum(m, s.max(axis=1))
    p = jnp.exp(s - m_new[:, None])
    if masked:  # a row with nothing visible yet has m_new = NEG: exp(0) must not count
      p = jnp.where(mask, p, 0.0)
    alpha = jnp.exp(m - m_new)
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)  # [Mq, D]
    return m_new, l * alpha + p.sum(axis=1), acc

  n_all = _cdiv(ke - ks, bk)
  n_free = _unmasked_chunks(ks, lo, hi, rq >= 0, bk, n_all)
  carry = (jnp.full((bq,), NEG, jnp.float32), jnp.zeros((bq,), jnp.float32),
           jnp.zeros((bq, q.shape[-1]), jnp.float32))
  carry = jax.lax.fori_loop(0, n_free, functools.partial(body, masked=False), carry)
  m, l, acc = jax.lax.fori_loop(n_free, n_all, functools.partial(body, masked=True), carry)
  ok = l > 0
  o_ref[...] = (acc / jnp.where(ok, l, 1.0)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), -jnp.inf)


def _dq_kernel(ks_ref, ke_ref, rq_ref, lo_ref, hi_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               dl_ref, dq_ref, *, bq, bk, scale, lay):
  i, b = pl.program_id(0), pl.program_id(1)
  batch, kvh = lay.split(b)
  ks, ke = ks_ref[b, i], ke_ref[b, i]
  rows = pl.ds(i * bq, bq)
  lo, hi, rq = lo_ref[b, rows], hi_ref[b, rows], rq_ref[b, rows]
  live = rq >= 0
  qr = lay.q_rows(rq, kvh)
  q, do = q_ref[batch, qr, :], do_ref[batch, qr, :]  # [Mq, D]
  lse = jnp.where(live, lse_ref[batch, qr], jnp.inf)  # dead rows: p = 0
  delta = dl_ref[batch, qr]  # [Mq]

  def body(c, dq, masked):
    start = ks + c * bk
    kr = lay.k_rows(start + _iota(bk), kvh)
    k, v = k_ref[batch, kr, :], v_ref[batch, kr, :]
    p = jnp.exp(_dot(q, k, trans_b=True) * scale - lse[:, None])  # [Mq, Bk]
    if masked:
      p = jnp.where(_row_mask(start + _iota(bk), lo, hi), p, 0.0)
    ds = p * (_dot(do, v, trans_b=True) - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k)  # [Mq, D]

  n_all = _cdiv(ke - ks, bk)
  n_free = _unmasked_chunks(ks, lo, hi, live, bk, n_all)
  dq = jnp.zeros(q.shape, jnp.float32)
  dq = jax.lax.fori_loop(0, n_free, functools.partial(body, masked=False), dq)
  dq = jax.lax.fori_loop(n_free, n_all, functools.partial(body, masked=True), dq)
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(iks_ref, ir0_ref, iru_ref, ir1_ref, ig0_ref, ig1_ref, rq_ref, lo_ref, hi_ref,
                 q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, *refs, bq, bk, scale, lay, extra):
  """One key tile: rows [r0, r1) of which [r0, ru) may need the mask, then rows [g0, g1) (a
  past-block group) that see the whole tile. With `extra`, float32 dK/dV contributions computed
  elsewhere ([B, T, K, Dp]) are added before the one rounding to the output dtype."""
  if extra:
    ek_ref, ev_ref, dk_ref, dv_ref = refs
  else:
    dk_ref, dv_ref = refs
  j, b = pl.program_id(0), pl.program_id(1)
  batch, kvh = lay.split(b)
  ks = iks_ref[b, j]
  r0, ru, r1, g0, g1 = (r[b, j] for r in (ir0_ref, iru_ref, ir1_ref, ig0_ref, ig1_ref))
  kpos = ks + _iota(bk)
  kr = lay.k_rows(kpos, kvh)
  k, v = k_ref[batch, kr, :], v_ref[batch, kr, :]  # [Bk, D]

  def chunk(first, end, carry, masked):
    dk, dv = carry
    rows = pl.ds(first, bq)
    rq = rq_ref[b, rows]
    live = ((first + _iota(bq)) < end) & (rq >= 0)
    qr = lay.q_rows(rq, kvh)
    q, do = q_ref[batch, qr, :], do_ref[batch, qr, :]  # [Mq, D]
    lse = jnp.where(live, lse_ref[batch, qr], jnp.inf)  # dead rows: p = 0
    delta = dl_ref[batch, qr]
    pt = jnp.exp(_dot(k, q, trans_b=True) * scale - lse[None, :])  # [Bk, Mq]
    if masked:
      lo, hi = lo_ref[b, rows], hi_ref[b, rows]
      pt = jnp.where((kpos[:, None] >= lo[None, :]) & (kpos[:, None] < hi[None, :]), pt, 0.0)
    dv = dv + _dot(pt.astype(do.dtype), do)  # [Bk, D]
    dst = pt * (_dot(v, do, trans_b=True) - delta[None, :])
    return dk + _dot(dst.astype(q.dtype), q), dv

  n_masked = _cdiv(ru - r0, bq)
  rf = r0 + n_masked * bq  # first row of the unmasked part of [r0, r1)
  n_dense = _cdiv(jnp.maximum(r1 - rf, 0), bq)
  zeros = jnp.zeros(k.shape, jnp.float32)
  carry = jax.lax.fori_loop(0, n_masked, lambda c, x: chunk(r0 + c * bq, r1, x, True),
                            (zeros, zeros))
  carry = jax.lax.fori_loop(0, n_dense, lambda c, x: chunk(rf + c * bq, r1, x, False), carry)
  dk, dv = jax.lax.fori_loop(0, _cdiv(g1 - g0, bq), lambda c, x: chunk(g0 + c * bq, g1, x, False),
                             carry)
  dk = dk * scale
  if extra:
    at = (batch, jnp.minimum(kpos, lay.seq - 1), kvh)
    dk, dv = dk + ek_ref[at + (slice(None),)], dv + ev_ref[at + (slice(None),)]
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _whole(x):
  return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def _call(kernel, grid, args, out_shape, out_specs, sizes, interpret, warps=None):
  kwargs = {}
  if not interpret:
    kwargs["compiler_params"] = plgpu.CompilerParams(num_warps=warps or sizes.num_warps,
                                                     num_stages=sizes.num_stages)
  return pl.pallas_call(kernel, grid=grid, in_specs=[_whole(a) for a in args],
                        out_specs=out_specs, out_shape=out_shape, interpret=interpret,
                        name=_kernel_name(kernel), **kwargs)(*args)


def _kernel_name(kernel) -> str:
  """"moba_gpu_fwd" for _fwd_kernel: what profiles and HLO dumps show."""
  return "moba_gpu_" + kernel.func.__name__.strip("_").removesuffix("_kernel")


def _row_specs(bq, dim):
  return [pl.BlockSpec((pl.squeezed, bq, dim), lambda i, b: (b, i, 0)),
          pl.BlockSpec((pl.squeezed, bq), lambda i, b: (b, i))]


def flat_rows(x, dp):
  """[B, T, N, D] -> [B, T * N, Dp]: a reshape (head_dim padded only if not a power of two)."""
  batch, seq, n, dim = x.shape
  if dp != dim:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, dp - dim)))
  return x.reshape(batch, seq * n, dp)


def padded_head_dim(dim):
  """The kernels' head_dim: the next power of two, at least 16."""
  return max(16, pl.next_power_of_2(dim))


def _pad_rows(r: rt.Routing, extra):
  pad = lambda x, f: jnp.pad(x, ((0, 0), (0, extra)), constant_values=f)
  return pad(r.rq, -1), pad(r.lo, 0), pad(r.hi, 0)


def forward_rows(routing, dims, qf, kf, vf, sizes, scale, interpret):
  """The forward kernel alone: partial rows o_rows [BK, R, Dp] in q's dtype (normalized, rounded
  once; merged in float32 by the caller) and lse_rows [BK, R] float32.

  qf [B, T * H, Dp], kf/vf [B, T * K, Dp] (`flat_rows`)."""
  batch, dp = qf.shape[0], qf.shape[-1]
  kv_heads = kf.shape[1] // dims.seq
  batch_kv, bq = batch * kv_heads, sizes.block_q
  lay = _RowLayout(dims.seq, kv_heads, dims.groups)
  args = (routing.tile_ks, routing.tile_ke, routing.rq, routing.lo, routing.hi, qf, kf, vf)
  kernel = functools.partial(_fwd_kernel, bq=bq, bk=sizes.block_k, scale=scale, lay=lay)
  out_shape = [jax.ShapeDtypeStruct((batch_kv, dims.rows, dp), qf.dtype),
               jax.ShapeDtypeStruct((batch_kv, dims.rows), jnp.float32)]
  return _call(kernel, (dims.tiles, batch_kv), args, out_shape, _row_specs(bq, dp), sizes,
               interpret)


def _query_major(rows, pos, batch, dims):
  """Partial rows [BK, R, ...] and pos [BK, TG, S] -> rows [B, K * R, ...] and the positions of
  each query's partial rows in them, in the caller's order [B, T * H, S] (-1: none)."""
  batch_kv, _, n_sel = pos.shape
  kv_heads = batch_kv // batch
  p = pos.reshape(batch, kv_heads, dims.queries, dims.groups, n_sel)
  first_row = jnp.arange(kv_heads, dtype=jnp.int32) * dims.rows  # of each kv head's rows
  p = jnp.where(p >= 0, p + first_row[:, None, None, None], -1)
  p = jnp.moveaxis(p, 1, 2).reshape(batch, -1, n_sel)
  return rows.reshape(batch, kv_heads * dims.rows, *rows.shape[2:]), p


def forward(q, k, v, routing, dims, sizes, scale, interpret):
  """The custom VJP's forward with routing given: (out [B, T, H, D], residuals (o, lse)).
  Public with `backward` so that `moba-jax bench --breakdown` can time the stages apart.
  k, v wider than q (float32 for half-precision q, the context-parallel path's) are rounded to
  q's dtype for the products; their gradients come back in their own dtype."""
  batch, seq, heads, dim = q.shape
  dp = padded_head_dim(dim)
  if sizes.mosaic_head_chunks > 1:
    o, lse = _mosaic_forward_by_head_chunks(q, k, v, routing, dims, sizes, scale, interpret)
    return o.reshape(batch, seq, heads, dp)[..., :dim], (o, lse)
  if sizes.mosaic_block_kv:
    kq, vq = k.astype(q.dtype), v.astype(q.dtype)
    q_rows = moba_mgpu.rows_of(q, routing.rq, k.shape[2], dims.groups)
    nfree = moba_mgpu.free_chunks(routing.tile_ks, routing.tile_ke, routing.lo, routing.hi,
                                  routing.rq, sizes.mosaic_block_kv)
    o_rows, lse_rows = moba_mgpu.forward_rows(
        routing.tile_ks, routing.tile_ke, nfree, routing.lo, routing.hi, q_rows, kq, vq,
        scale=scale, block_kv=sizes.mosaic_block_kv, interpret=interpret,
        overlap=sizes.overlaps(dims.block_size))
  else:
    qf, kf, vf = (flat_rows(x.astype(q.dtype), dp) for x in (q, k, v))
    o_rows, lse_rows = forward_rows(routing, dims, qf, kf, vf, sizes, scale, interpret)
  o_rows, pos = _query_major(o_rows, routing.pos, batch, dims)
  lse_rows = lse_rows.reshape(batch, -1)
  o, lse = rt.merge_rows(o_rows, lse_rows, pos)  # [B, T * H, Dp], [B, T * H]
  o = o.astype(q.dtype)
  return o.reshape(batch, seq, heads, dp)[..., :dim], (o, lse)


class _HeadChunk(NamedTuple):
  """A chunk of kv heads: its query heads (a slice of q's), its kv heads (a slice of k's; the
  first is the kernels' `kv_head0`) and the batch and kv head counts of the whole call."""
  heads: slice
  kv: slice
  batch: int
  kv_heads: int

  def part(self, x):  # [B * K, ...] (per batch row and kv head) -> this chunk's [B * per, ...]
    x = x.reshape(self.batch, self.kv_heads, *x.shape[1:])[:, self.kv]
    return x.reshape(-1, *x.shape[2:])

  def routing(self, routing):  # the routing's per-(batch, kv head) fields of this chunk
    fields = ("rq", "lo", "hi", "tile_ks", "tile_ke", "pos")
    return routing._replace(**{f: self.part(getattr(routing, f)) for f in fields})


def _head_chunks(batch, kv_heads, groups, chunks):
  """The chunks of kv heads, in order (query head h = kv head * G + g: a chunk's query heads are
  contiguous); `chunks` divides kv_heads (checked on each shard by `_moba_attention_gpu`)."""
  per = kv_heads // chunks
  return [_HeadChunk(slice(c * per * groups, (c + 1) * per * groups),
                     slice(c * per, (c + 1) * per), batch, kv_heads) for c in range(chunks)]


def _mosaic_forward_by_head_chunks(q, k, v, routing, dims, sizes, scale, interpret):
  """The Mosaic forward over `mosaic_head_chunks` chunks of kv heads, one after another
  (optimization barriers order them, so that one chunk's partial rows are live at a time): each
  chunk runs the kernel on its heads of q, k and v and merges its rows into the whole o and lse
  (updates in place). Returns o [B, T * H, Dp] in q's dtype and lse [B, T * H] float32, as `forward`'s
  residuals."""
  batch, seq, heads, _ = q.shape
  kv_heads = k.shape[2]
  kq, vq = k.astype(q.dtype), v.astype(q.dtype)
  o_all = jnp.zeros((batch, seq, heads, padded_head_dim(q.shape[-1])), q.dtype)
  lse_all = jnp.zeros((batch, seq, heads), jnp.float32)
  for chunk in _head_chunks(batch, kv_heads, dims.groups, sizes.mosaic_head_chunks):
    r, hq = chunk.routing(routing), chunk.heads.stop - chunk.heads.start
    q_rows = moba_mgpu.rows_of(q, r.rq, hq // dims.groups, dims.groups, chunk.kv.start)
    nfree = moba_mgpu.free_chunks(r.tile_ks, r.tile_ke, r.lo, r.hi, r.rq, sizes.mosaic_block_kv)
    o_rows, lse_rows = moba_mgpu.forward_rows(
        r.tile_ks, r.tile_ke, nfree, r.lo, r.hi, q_rows, kq, vq, scale=scale,
        block_kv=sizes.mosaic_block_kv, interpret=interpret, kv_head0=chunk.kv.start,
        overlap=sizes.overlaps(dims.block_size))
    o_rows, pos = _query_major(o_rows, r.pos, batch, dims)
    o, lse = rt.merge_rows(o_rows, lse_rows.reshape(batch, -1), pos)  # [B, T * hq, Dp]
    o_all = o_all.at[:, :, chunk.heads].set(o.astype(q.dtype).reshape(batch, seq, hq, -1))
    lse_all = lse_all.at[:, :, chunk.heads].set(lse.reshape(batch, seq, hq))
    # the next chunk's kernel after this chunk's merge: its rows replace these
    q, o_all, lse_all = jax.lax.optimization_barrier((q, o_all, lse_all))
  return o_all.reshape(batch, seq * heads, -1), lse_all.reshape(batch, -1)


# two 16-bit row matrices (Q, dO), double-buffered, leave room for 64-key ring slots
MOSAIC_DQ_BLOCK_KV = 64


class _MosaicRows(NamedTuple):
  """The backward's operands in the routing's row order, for the Mosaic GPU kernels."""
  q: moba_mgpu.Rows  # [BK, R, D], gathered by the kernels
  do: moba_mgpu.Rows  # [BK, R, D]
  lse2: jax.Array  # [BK, R] base-2 log-sum-exp of each row's query (+inf: padding row, p = 0)
  delta: jax.Array  # [BK, R]


def _mosaic_rows(q, do, routing, lse, delta, kv_heads, groups, kv_head0=0) -> _MosaicRows:
  """kv_heads: this call's, from kv head kv_head0 of q's (a chunk of them)."""
  q_rows = moba_mgpu.rows_of(q, routing.rq, kv_heads, groups, kv_head0)
  like = lambda x: moba_mgpu.Rows(x.reshape(-1, x.shape[-1]), q_rows.index)  # q's rows of x
  vec = lambda x: like(x.reshape(q.shape[:3] + (1,))).gathered()[..., 0]  # [B, T * H] -> [BK, R]
  lse2 = jnp.where(routing.rq >= 0, vec(lse) * moba_mgpu.LOG2E, jnp.inf)
  return _MosaicRows(q_rows, like(do.astype(q.dtype)), lse2, vec(delta))


def _mosaic_dq_rows(rows: _MosaicRows, k, v, routing, scale, interpret, overlap, kv_head0=0):
  """dQ partial rows [BK, R, D] in q's dtype from the Mosaic GPU kernel (overlapped: see
  `moba_mgpu.dq_rows`)."""
  nfree = moba_mgpu.free_chunks(routing.tile_ks, routing.tile_ke, routing.lo, routing.hi,
                                routing.rq, MOSAIC_DQ_BLOCK_KV)
  return moba_mgpu.dq_rows(routing.tile_ks, routing.tile_ke, nfree, routing.lo, routing.hi,
                           rows.lse2, rows.delta, rows.q, rows.do, k, v, scale=scale,
                           block_kv=MOSAIC_DQ_BLOCK_KV, interpret=interpret, kv_head0=kv_head0,
                           overlap=overlap)


def _mosaic_backward_by_head_chunks(q, do, k, v, routing, lse, delta, items, dims, scale,
                                    interpret, chunks, overlap, split):
  """(dq, dk, dv) of the Mosaic backward with the dQ over `chunks` chunks of kv heads: the dK/dV
  kernel once over every head (it gathers its own rows and holds no partial rows: besides its
  outputs, only the row vectors of every head, [BK, R] each, and with split its float32 slots,
  all dead before the first dQ chunk's rows), then the dQ chunk by chunk, one after another
  (optimization barriers order them, so that one chunk's dQ rows are live at a time), each
  chunk's sum written into the whole dq (an update in place; a concatenation would hold every
  chunk's pieces and the whole gradient at once).

  Until run 48 the dK/dV ran per chunk too, writing its heads into the whole gradients: a chunk's
  kernel had a chunk's items only, and with GQA few and long ones (16K block 128 top-8, 16/2
  heads: 128 items a call on 132 CTAs, the busiest CTA 3.6x the mean work), where one call over
  both chunks deals 256 (2.2x; MHA 16/16: 1.12 -> 1.05; tools/dkdv_balance.py)."""
  batch, seq, kv_heads, dim = k.shape
  per = kv_heads // chunks
  rows = _mosaic_rows(q, do, routing, lse, delta, kv_heads, dims.groups)
  dk, dv = moba_mgpu.dkdv_tiles(items, rows.lse2, rows.delta, routing.lo, routing.hi, rows.q,
                                rows.do, k, v, scale=scale, interpret=interpret, split=split)
  dk, dv = dk[:, :seq], dv[:, :seq]
  # the dQ chunks after the dK/dV (their row vectors too): its vectors of every head are gone
  # before a chunk's rows exist
  q, do, lse, delta, dk, dv = jax.lax.optimization_barrier((q, do, lse, delta, dk, dv))
  dq_all = jnp.zeros(q.shape, q.dtype)
  for chunk in _head_chunks(batch, kv_heads, dims.groups, chunks):
    r, heads, kvs = chunk.routing(routing), chunk.heads, chunk.kv
    hq = heads.stop - heads.start
    rows = _mosaic_rows(q, do, r, lse, delta, per, dims.groups, kvs.start)
    dq_rows = _mosaic_dq_rows(rows, k, v, r, scale, interpret, overlap, kvs.start)
    dq = rt.gather_rows_sum(*_query_major(dq_rows, r.pos, batch, dims))  # [B, T * hq, D]
    dq_all = dq_all.at[:, :, heads].set(dq.reshape(batch, -1, hq, dim).astype(q.dtype))
    # the next chunk's kernel after this chunk's sum: its rows replace these
    q, do, dq_all = jax.lax.optimization_barrier((q, do, dq_all))
  return dq_all, dk, dv


def _dense_items(routing, dims, bkd, seq):
  """The dense part of the dK/dV items of key tiles of bkd keys: (first key, r0, ru, r1), each
  [BK, tiles], and (each tile's first key's block start, whether the tile lies in one block).
  Dense rows [r0, r1) are the queries from the tile's first key to the end of the block of its
  last key, masked only up to the diagonal (ru) when the tile lies in one block. With a query
  offset the rows are the local queries' (positions q_start + t): clipped to them (empty for
  tiles outside [block start of q_start, q_start + Tq))."""
  g = dims.groups
  first = jnp.arange(0, seq, bkd, dtype=jnp.int32)
  last = jnp.minimum(first + bkd, seq) - 1
  if routing.q_start is None:
    block_start = routing.lo[:, :seq * g:g]  # dense row t*G has lo = the block start of t
    rows = lambda t: t * g  # first dense row of query position t
  else:
    block_start = routing.block_start
    rows = lambda t: jnp.clip(t - routing.q_start, 0, dims.queries) * g
  bs_first, bs_last = block_start[:, first], block_start[:, last]
  clean = (bs_first == bs_last) & (first + bkd <= seq)
  t_ks = jnp.broadcast_to(first, bs_first.shape)
  t_r0 = rows(t_ks)
  t_r1 = rows(routing.block_end[:, last])
  t_ru = jnp.where(clean, rows(first + bkd - 1), t_r1)
  return (t_ks, t_r0, t_ru, t_r1), bs_first, clean


def mosaic_dkdv_items(routing, dims, seq):
  """The Mosaic dK/dV's items for any documents, block size and query offset: per key tile of
  `moba_mgpu.KEYS` keys, (first key, r0, ru, r1, g0, g1, gmask) [BK, tiles] int32: its dense
  rows (`_dense_items`) and the rows [g0, g1) of every past-block group whose block meets the
  tile (groups are laid out in block order, so these rows are contiguous), masked by each row's
  [lo, hi) unless one group's block covers the whole tile (gmask 0: single documents with
  blocks a multiple of 128, where each tile has one group and no mask). A group meets every
  tile its block overlaps, so each key has one owner and dK/dV come out in key order: no
  group items, no scatter and no branch."""
  bkd, blk = moba_mgpu.KEYS, dims.block_size
  (t_ks, t_r0, t_ru, t_r1), _, _ = _dense_items(routing, dims, bkd, seq)
  # the kernel's chunks start on multiples of 8 rows (TMA boxes); with a query offset r0 may
  # not: the rows before it are queries before the tile's keys, which its first (masked) chunk
  # sees as zeros
  dense = (t_ks, t_r0 - t_r0 % 8, t_ru, t_r1)
  zero = jnp.zeros_like(t_ks)
  if dims.max_groups == 0:
    return dense + (zero, zero, zero)
  gp = routing.group_p  # [BK, Gm] sorted block starts of the non-empty groups (seq: none)
  n_g = gp.shape[1]
  search = functools.partial(jnp.searchsorted, method="compare_all"
                             if t_ks.shape[1] * n_g <= 1 << 22 else "sort")
  # groups with a block [p, p + blk) meeting the tile [ks, ks + bkd): ks - blk < p < ks + bkd
  i0 = jax.vmap(search)(gp, t_ks - blk + 1)
  i1 = jax.vmap(search)(gp, jnp.minimum(t_ks + bkd, seq))
  take = lambda x, i: jnp.take_along_axis(x, jnp.clip(i, 0, n_g - 1), axis=1)
  has = i1 > i0
  g0 = jnp.where(has, take(routing.group_r0, i0), 0)
  g1 = jnp.where(has, take(routing.group_r1, i1 - 1), 0)
  p0 = take(gp, i0)
  whole = (i1 - i0 == 1) & (p0 <= t_ks) & (p0 + blk >= t_ks + bkd)
  return dense + (g0, g1, (has & ~whole).astype(jnp.int32))


def _dkdv_items(routing, dims, sizes, seq):
  """dK/dV work items of the Triton kernel, each (first key, r0, ru, r1, g0, g1) per program
  (see `_dkdv_kernel`).

  Tile items: one per key tile c of [0, seq): its dense rows (`_dense_items`) and, when the
  tile's block is a past-block group aligned to the tile size, that group's rows: each key then
  has one owner and dK/dV come out in key order. Group items: the key tiles of groups that are
  not aligned (documents starting off the tile grid, or block_size % Bk != 0), all rows
  masked; their outputs are added by scatter. Returns (tile items, group items or None, any
  group item). With a query offset key tiles still cover all seq keys (past-block groups lie
  anywhere before).
  """
  bkd, blk = sizes.block_k_dkv, dims.block_size
  (t_ks, t_r0, t_ru, t_r1), bs_first, clean = _dense_items(routing, dims, bkd, seq)
  zero = jnp.zeros_like(t_ks)
  if dims.max_groups == 0:
    return (t_ks, t_r0, t_ru, t_r1, zero, zero), None, False
  gp = routing.group_p  # [BK, Gm] sorted block starts of the non-empty groups (seq: none)
  aligned = (gp < seq) & (gp % bkd == 0) & (blk % bkd == 0)
  # no `while` in the step (run 25): one compare-and-count fusion where [tiles, groups] is
  # small (every benchmark shape), else a sort; the default scan is a loop of log2(groups) steps
  small = bs_first.shape[1] * gp.shape[1] <= 1 << 22
  search = functools.partial(jnp.searchsorted, method="compare_all" if small else "sort")
  idx = jnp.minimum(jax.vmap(search)(gp, bs_first), gp.shape[1] - 1)
  take = lambda x: jnp.take_along_axis(x, idx, axis=1)
  inline = clean & (take(gp) == bs_first) & take(aligned)
  t_g0 = jnp.where(inline, take(routing.group_r0), 0)
  t_g1 = jnp.where(inline, take(routing.group_r1), 0)
  if dims.one_doc and blk % bkd == 0 and routing.q_start is None:
    # one document per row, known when tracing: every past block starts on a multiple of blk,
    # so of the tile size, and is a tile item's group (no group items, no lax.cond)
    return (t_ks, t_r0, t_ru, t_r1, t_g0, t_g1), None, False
  n_c = -(-blk // bkd)
  c = jnp.arange(n_c, dtype=jnp.int32) * bkd
  rest = ((gp < seq) & ~aligned)[:, :, None]  # [BK, Gm, 1]
  flat = lambda x: jnp.broadcast_to(x, rest.shape[:2] + (n_c,)).reshape(rest.shape[0], -1)
  s_ks = flat(jnp.where(rest, gp[:, :, None] + c, 0))
  s_r0 = flat(jnp.where(rest, routing.group_r0[:, :, None], 0))
  s_r1 = flat(jnp.where(rest, routing.group_r1[:, :, None], 0))
  s_zero = jnp.zeros_like(s_ks)
  return ((t_ks, t_r0, t_ru, t_r1, t_g0, t_g1), (s_ks, s_r0, s_r1, s_r1, s_zero, s_zero),
          jnp.any(rest))


def backward(q, k, v, routing, o, lse, do, dims, sizes, scale, interpret):
  """The custom VJP's backward: (dq, dk, dv) for the cotangent do, routing given. dk, dv are
  [B, T, K, D] in k's dtype (T keys; rounded once from float32)."""
  batch, seq, kv_heads, dim = k.shape
  dp = padded_head_dim(dim)
  qf, dof = flat_rows(q, dp), flat_rows(do, dp)
  kf, vf = flat_rows(k.astype(q.dtype), dp), flat_rows(v.astype(q.dtype), dp)
  delta = jnp.sum(o.astype(jnp.float32) * dof.astype(jnp.float32), axis=-1)  # [B, T * H]
  batch_kv, lay = batch * kv_heads, _RowLayout(seq, kv_heads, dims.groups)
  bq = sizes.block_q
  mosaic_dkdv = sizes.mosaic_dkdv and k.dtype == q.dtype
  overlap = sizes.overlaps(dims.block_size)  # the Mosaic dQ's schedule
  if sizes.mosaic_head_chunks > 1 and mosaic_dkdv and sizes.mosaic_dq:
    return _mosaic_backward_by_head_chunks(q, do, k, v, routing, lse, delta,
                                           mosaic_dkdv_items(routing, dims, seq), dims, scale,
                                           interpret, sizes.mosaic_head_chunks, overlap,
                                           bool(sizes.mosaic_dkdv_split))
  if sizes.mosaic_dq or mosaic_dkdv:
    m_rows = _mosaic_rows(q, do, routing, lse, delta, kv_heads, dims.groups)
  bkd = sizes.block_k_dkv
  tiles, groups, any_group = _dkdv_items(routing, dims, sizes, seq)
  rows = _pad_rows(routing, sizes.block_q_dkv)
  # item j of program row b writes keys [j * Bk, (j + 1) * Bk) of (batch, kv head) = split(b)
  spec = pl.BlockSpec((pl.squeezed, bkd, pl.squeezed, dp),
                      lambda j, b: (b // kv_heads, j, b % kv_heads, 0))

  def dkdv(items, dtype, extra=()):
    kernel = functools.partial(_dkdv_kernel, bq=sizes.block_q_dkv, bk=bkd, scale=scale, lay=lay,
                               extra=bool(extra))
    shape = jax.ShapeDtypeStruct((batch, items[0].shape[1] * bkd, kv_heads, dp), dtype)
    return _call(kernel, (items[0].shape[1], batch_kv),
                 items + rows + (qf, kf, vf, dof, lse, delta) + extra, [shape, shape],
                 [spec, spec], sizes, interpret, warps=sizes.num_warps_dkv)

  def tile_items(extra=()):  # in key order: blocks land on [B, T, K, D] directly, in k's dtype
    dk, dv = dkdv(tiles, k.dtype, extra)
    if tiles[0].shape[1] * bkd != seq or dp != dim:
      dk, dv = dk[:, :seq, :, :dim], dv[:, :seq, :, :dim]
    return dk, dv

  def with_groups():  # unaligned groups: own programs, added onto key positions in float32
    gk, gv = dkdv(groups, jnp.float32)  # [B, NI * Bk, K, Dp]
    pos = (groups[0][:, :, None] + jnp.arange(bkd, dtype=jnp.int32)).reshape(batch, kv_heads, -1)
    bi, hi = jnp.arange(batch)[:, None, None], jnp.arange(kv_heads)[None, :, None]
    zero = jnp.zeros((batch, seq, kv_heads, dp), jnp.float32)
    add = lambda x: zero.at[bi, pos, hi].add(jnp.moveaxis(x, 2, 1), mode="drop")
    return tile_items((add(gk), add(gv)))

  def triton_dkdv():
    if groups is None:
      return tile_items()
    return jax.lax.cond(any_group, with_groups, tile_items)

  if mosaic_dkdv:  # any layout: one owner per key, no scatter, no branch
    dk, dv = moba_mgpu.dkdv_tiles(mosaic_dkdv_items(routing, dims, seq), m_rows.lse2,
                                  m_rows.delta, routing.lo, routing.hi, m_rows.q, m_rows.do, k, v,
                                  scale=scale, interpret=interpret,
                                  split=bool(sizes.mosaic_dkdv_split))
    dk, dv = dk[:, :seq], dv[:, :seq]
  else:
    dk, dv = triton_dkdv()

  if sizes.mosaic_dq:
    dq_rows = _mosaic_dq_rows(m_rows, k.astype(q.dtype), v.astype(q.dtype), routing, scale,
                              interpret, overlap)
  else:
    args = (routing.tile_ks, routing.tile_ke, routing.rq, routing.lo, routing.hi, qf, kf, vf, dof,
            lse, delta)
    kernel = functools.partial(_dq_kernel, bq=bq, bk=sizes.block_k, scale=scale, lay=lay)
    dq_rows = _call(kernel, (dims.tiles, batch_kv), args,
                    jax.ShapeDtypeStruct((batch_kv, dims.rows, dp), q.dtype),
                    _row_specs(bq, dp)[0], sizes, interpret)
  dq = rt.gather_rows_sum(*_query_major(dq_rows, routing.pos, batch, dims))  # [B, T * H, Dp]
  dq = dq.reshape(q.shape[:3] + (dp,))[..., :dim].astype(q.dtype)
  return dq, dk, dv


_moba_vjp = rt.custom_vjp_attention(forward, backward)


# The Mosaic kernels' own split of the kv heads also keeps a chunk's partial rows within this many
# selected blocks per query (the forward's rows, then the dQ's, each about that many times the
# chunk's share of q). Measured on the H200 (run 24, docs/kernel_notes.md): 16K block 128 top-8
# plans 1.67x cuDNN's memory in one pass and 1.24x in two chunks, the synced step 4.371 -> 4.389
# and 4.460 ms (two calls); top-3 (3 rows a query) stays one pass: 1.03-1.06x at every block.
MOSAIC_SELECTED_PER_CHUNK = 4


def _split_heads(sizes, q, k, q_start, block_size, topk):
  """Who splits the kv heads where the partial rows exceed their budget: (sizes, the `lax.map`
  chunks for `run_kernel`, None: `kv_head_chunks`' count). The Mosaic kernels split them
  themselves (mosaic_head_chunks, in one call: run 19) where all three run (any documents and
  block size since run 27; no query offset) and no split was asked for, over
  `_routing.PARTIAL_BYTES` or `MOSAIC_SELECTED_PER_CHUNK`; elsewhere `lax.map` does, over
  `PARTIAL_BYTES` (each chunk a whole call)."""
  if (sizes.mosaic_head_chunks == 1 and sizes.mosaic_block_kv and sizes.mosaic_dq
      and sizes.mosaic_dkdv and q_start is None and k.dtype == q.dtype):
    chunks = rt.kv_head_chunks(q.shape, k.shape[2], block_size, topk, k.shape[1],
                               max_selected=MOSAIC_SELECTED_PER_CHUNK)
    return dataclasses.replace(sizes, mosaic_head_chunks=chunks), 1
  return sizes, None


def moba_attention_gpu(q, k, v, segment_ids, *, block_size, topk, softmax_scale=None,
                       options: KernelOptions | None = None, q_start=None):
  """Causal MoBA attention. q [B, T, H, D]; k, v [B, T, K, D]; segment_ids [B, T] int or None
  (one document per row: no data-dependent branch in the routing or the backward).
  options: interpret mode and tiles (BlockSizes fields in order; default get_default).

  q_start (an int or int32 scalar, traced inside shard_map): q [B, Tq, H, D] are the queries at
  positions [q_start, q_start + Tq) of the sequence of k, v [B, T, K, D] and segment_ids [B, T]
  (a context-parallel shard's queries over the gathered keys); returns [B, Tq, H, D], with dq for
  the Tq queries and dk, dv over all T keys. k, v may then be float32 with half-precision q
  (rounded to q's dtype for the products; dk, dv float32). Tq and q_start need no alignment to
  the block size (`_routing.check_query_offset` has the constraints)."""
  rt.check_query_offset(q, k, v, segment_ids, q_start)
  return _moba_attention_gpu(q, k, v, segment_ids, q_start, block_size=block_size, topk=topk,
                             softmax_scale=softmax_scale, options=options)


@functools.partial(jax.jit, static_argnames=("block_size", "topk", "softmax_scale", "options"))
def _moba_attention_gpu(q, k, v, segment_ids, q_start, *, block_size, topk, softmax_scale,
                        options):
  options = options or KernelOptions()
  sizes = options.block_sizes(
      BlockSizes, BlockSizes.get_default(q.shape[-1], q.dtype, options.interpret))
  if sizes.mosaic_block_kv or sizes.mosaic_dq or sizes.mosaic_dkdv:
    why = moba_mgpu.refusal(q.dtype, q.shape[-1], sizes.block_q, options.interpret)
    if why:
      raise ValueError(f"tiles={list(options.tiles)}: {why}")
  def run(q, k, v, segment_ids):  # on each device's shard
    if k.shape[2] % sizes.mosaic_head_chunks:  # the shard's kv heads under a mesh
      raise ValueError(f"tiles={list(options.tiles)}: mosaic_head_chunks="
                       f"{sizes.mosaic_head_chunks} must divide the kv heads ({k.shape[2]}, "
                       "on each device where a mesh splits them)")
    s, n = _split_heads(sizes, q, k, q_start, block_size, topk)
    return rt.run_kernel(_moba_vjp, q, k, v, segment_ids, block_size=block_size, topk=topk,
                         softmax_scale=softmax_scale, interpret=options.interpret, sizes=s,
                         q_start=q_start, head_chunks=n)

  return rt.over_mesh_shards(run, q, k, v, segment_ids)  # a custom call: XLA cannot split it
