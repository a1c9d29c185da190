"""MoBA decode attention as Pallas kernels: one new token per row, over its chosen blocks only.

The gate (block means scored in float32, top-k, the current block always chosen) stays in XLA
(`moba_jax.decode.choose_blocks`, shared with the XLA step); these kernels do the attention over
the blocks it chose, reading each chosen key and value once, in the cache's own layout and dtype.

Split-K (flash-decoding): the keys a query head must read are its S chosen blocks, each cut into
chunks of `block_k` keys, C = S * ceil(L / block_k) chunks in all; program (b, h, j) of the grid
takes chunks [j * per, (j + 1) * per) of row b's head h and writes a partial softmax (running max
m, sum l, unnormalised output acc [D], float32). `merge` combines the partials of a head by
log-sum-exp in XLA (one small fused op). Heads of one kv group are adjacent programs, so a block
chosen by several heads of the group is read from DRAM once and from L2 after.

GPU: Triton lowering; the whole cache stays in HBM and each program gathers its key rows
(k viewed as [B, T * K, D], row t * K + kv_head). TPU: Mosaic, one program per (row, head,
chosen block) whose BlockSpec index map reads the block index from scalar prefetch, the cache
viewed as [B, T, K * D] so a block is an (L, D) tile (proved in interpret mode; not run on a TPU).

Shapes: q [B, H, D]; k, v [B, T, K, D]; blocks [B, H, S] int32 block indices; valid [B, H, S];
n [B] int32 keys held per row (the new token's included). Positions >= n, and blocks not valid,
get probability 0 whatever the cache holds there.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

NEG = -1e30


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
  """block_k: keys per chunk (a power of two); splits: programs per head (0 = one per chunk);
  num_warps: the GPU kernel's warps."""

  block_k: int = 64
  splits: int = 0
  num_warps: int = 4


def _chunks(block_size: int, n_sel: int, bk: int) -> tuple[int, int]:
  """(chunks per block, chunks per head)."""
  per_block = math.ceil(block_size / bk)
  return per_block, n_sel * per_block


def _partial_softmax(s, keep, v, carry):
  """One chunk's online-softmax update. s [Bk] float32 logits, keep [Bk] bool, v [Bk, D]."""
  m, l, acc = carry
  s = jnp.where(keep, s, NEG)
  m_new = jnp.maximum(m, jnp.max(s))
  p = jnp.where(keep, jnp.exp(s - m_new), 0.0)  # [Bk]
  alpha = jnp.exp(m - m_new)
  v = jnp.where(keep[:, None], v.astype(jnp.float32), 0.0)  # whatever unread rows hold
  acc = acc * alpha + jnp.sum(p[:, None] * v, axis=0)  # [D]
  return m_new, l * alpha + jnp.sum(p), acc


def _gpu_kernel(blocks_ref, valid_ref, n_ref, q_ref, k_ref, v_ref, m_ref, l_ref, o_ref, *,
                block_size, bk, per_block, per, n_chunks, kv_heads, groups, seq, scale):
  b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  kvh = h // groups
  n = n_ref[b]
  q = q_ref[b, h, :].astype(jnp.float32) * scale  # [D]

  def body(c, carry):
    chunk = j * per + c
    s_idx = jnp.minimum(chunk // per_block, n_chunks // per_block - 1)
    block = blocks_ref[b, h, s_idx]
    live = (valid_ref[b, h, s_idx] != 0) & (chunk < n_chunks)
    off = (chunk % per_block) * bk + jax.lax.broadcasted_iota(jnp.int32, (bk,), 0)
    pos = block * block_size + off  # [Bk]
    keep = live & (off < block_size) & (pos < n)
    rows = jnp.minimum(pos, seq - 1) * kv_heads + kvh
    k = k_ref[b, rows, :].astype(jnp.float32)  # [Bk, D]
    s = jnp.sum(k * q[None, :], axis=1)  # [Bk]
    return _partial_softmax(s, keep, v_ref[b, rows, :], carry)

  dim = q_ref.shape[-1]
  init = (jnp.float32(NEG), jnp.float32(0.0), jnp.zeros((dim,), jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, per, body, init)
  m_ref[b, h, j] = m
  l_ref[b, h, j] = l
  o_ref[b, h, j, :] = acc


def _whole(x):
  return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def decode_partials_gpu(q, k, v, blocks, valid, n, *, block_size: int, scale: float,
                        sizes: DecodeBlockSizes, interpret: bool = False):
  """Partial softmax rows (m [B, H, P], l [B, H, P], acc [B, H, P, D]) of the split-K GPU kernel,
  P programs per head."""
  batch, heads, dim = q.shape
  seq, kv_heads = k.shape[1], k.shape[2]
  n_sel = blocks.shape[-1]
  per_block, n_chunks = _chunks(block_size, n_sel, sizes.block_k)
  splits = min(sizes.splits or n_chunks, n_chunks)
  per = math.ceil(n_chunks / splits)
  kernel = functools.partial(
      _gpu_kernel, block_size=block_size, bk=sizes.block_k, per_block=per_block, per=per,
      n_chunks=n_chunks, kv_heads=kv_heads, groups=heads // kv_heads, seq=seq, scale=scale)
  args = (blocks.astype(jnp.int32), valid.astype(jnp.int32), n.astype(jnp.int32), q,
          k.reshape(batch, seq * kv_heads, dim), v.reshape(batch, seq * kv_heads, dim))
  part = jax.ShapeDtypeStruct((batch, heads, splits), jnp.float32)
  out_shape = (part, part, jax.ShapeDtypeStruct((batch, heads, splits, dim), jnp.float32))
  kwargs = {} if interpret else dict(
      compiler_params=_triton_params(sizes.num_warps))
  return pl.pallas_call(kernel, grid=(batch, heads, splits), in_specs=[_whole(a) for a in args],
                        out_specs=[_whole(s) for s in out_shape], out_shape=out_shape,
                        interpret=interpret, name="moba_decode_gpu", **kwargs)(*args)


def _triton_params(num_warps):
  from jax.experimental.pallas import triton as plgpu
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=1)


def _tpu_kernel(blocks_ref, valid_ref, n_ref, q_ref, k_ref, v_ref, m_ref, l_ref, o_ref, *,
                block_size, scale):
  b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  block = blocks_ref[b, h, s]
  pos = block * block_size + jax.lax.broadcasted_iota(jnp.int32, (block_size, 1), 0)  # [L, 1]
  keep = (valid_ref[b, h, s] != 0) & (pos < n_ref[b])  # [L, 1]
  q = q_ref[0].astype(jnp.float32) * scale  # [1, D]
  k = jnp.where(keep, k_ref[0].astype(jnp.float32), 0.0)  # [L, D]; unread rows may hold NaN
  v = jnp.where(keep, v_ref[0].astype(jnp.float32), 0.0)
  logits = jnp.sum(k * q, axis=1, keepdims=True)  # [L, 1]
  logits = jnp.where(keep, logits, NEG)
  m = jnp.max(logits, axis=0, keepdims=True)  # [1, 1]
  p = jnp.where(keep, jnp.exp(logits - m), 0.0)  # [L, 1]
  acc = jnp.sum(p * v, axis=0, keepdims=True)  # [1, D]
  o_ref[0] = acc
  m_ref[0] = jnp.broadcast_to(m, m_ref.shape[1:])
  l_ref[0] = jnp.broadcast_to(jnp.sum(p, axis=0, keepdims=True), l_ref.shape[1:])


def decode_partials_tpu(q, k, v, blocks, valid, n, *, block_size: int, scale: float,
                        interpret=False):
  """Partial softmax rows (m, l [B, H, S], acc [B, H, S, D]) of the TPU kernel: one program per
  (row, head, chosen block), the block's (L, D) key and value tiles fetched by the BlockSpec index
  map from the scalar-prefetched block indices."""
  from jax.experimental.pallas import tpu as pltpu

  batch, heads, dim = q.shape
  seq, kv_heads = k.shape[1], k.shape[2]
  groups, n_sel = heads // kv_heads, blocks.shape[-1]
  pad = -seq % block_size  # whole blocks: a ragged last block reads zeros past the cache
  kf = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else k
  vf = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0))) if pad else v
  kf = kf.reshape(batch, seq + pad, kv_heads * dim)  # [B, T, K * D]: a block is an (L, D) tile
  vf = vf.reshape(batch, seq + pad, kv_heads * dim)
  q3 = q.reshape(batch, 1, heads * dim)
  lanes = 128
  # lax.div, not //: floor division lowers through `sign`, which Mosaic asks the chip about
  kv_spec = pl.BlockSpec((1, block_size, dim),
                         lambda b, h, s, blk, *_: (b, blk[b, h, s], jax.lax.div(h, groups)))
  q_spec = pl.BlockSpec((1, 1, dim), lambda b, h, s, *_: (b, 0, h))
  stat_spec = pl.BlockSpec((1, 1, lanes), lambda b, h, s, *_: (b, 0, h * n_sel + s))
  o_spec = pl.BlockSpec((1, 1, dim), lambda b, h, s, *_: (b, 0, h * n_sel + s))
  stat = jax.ShapeDtypeStruct((batch, 1, heads * n_sel * lanes), jnp.float32)
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=3, grid=(batch, heads, n_sel), in_specs=[q_spec, kv_spec, kv_spec],
      out_specs=[stat_spec, stat_spec, o_spec])
  kernel = functools.partial(_tpu_kernel, block_size=block_size, scale=scale)
  m, l, acc = pl.pallas_call(
      kernel, grid_spec=grid_spec, name="moba_decode_tpu", interpret=interpret,
      out_shape=(stat, stat, jax.ShapeDtypeStruct((batch, 1, heads * n_sel * dim), jnp.float32)),
  )(blocks.astype(jnp.int32), valid.astype(jnp.int32), n.astype(jnp.int32), q3, kf, vf)
  stats = lambda x: x.reshape(batch, heads, n_sel, lanes)[..., 0]
  return stats(m), stats(l), acc.reshape(batch, heads, n_sel, dim)


def merge(m, l, acc, dtype):
  """Softmax output [B, H, D] in `dtype` from partials m, l [B, H, P], acc [B, H, P, D]."""
  top = jnp.max(m, axis=-1, keepdims=True)
  w = jnp.exp(m - top)  # [B, H, P]
  den = jnp.sum(w * l, axis=-1)  # [B, H]
  out = jnp.einsum("bhp,bhpd->bhd", w, acc, precision=jax.lax.Precision.HIGHEST)
  return (out / den[..., None]).astype(dtype)


def decode_attention_gpu(q, k, v, blocks, valid, n, *, block_size: int, scale: float,
                         sizes: DecodeBlockSizes | None = None, interpret: bool = False):
  """MoBA decode attention [B, H, D] (q's dtype) through the split-K GPU kernel."""
  parts = decode_partials_gpu(q, k, v, blocks, valid, n, block_size=block_size, scale=scale,
                              sizes=sizes or DecodeBlockSizes(), interpret=interpret)
  return merge(*parts, q.dtype)


def decode_attention_tpu(q, k, v, blocks, valid, n, *, block_size: int, scale: float,
                         sizes=None, interpret: bool = False):
  """MoBA decode attention [B, H, D] (q's dtype) through the TPU kernel."""
  del sizes  # one program per chosen block: nothing to tile
  interpret = _tpu_interpret() if interpret else False
  parts = decode_partials_tpu(q, k, v, blocks, valid, n, block_size=block_size, scale=scale,
                              interpret=interpret)
  return merge(*parts, q.dtype)


def _tpu_interpret():
  from jax.experimental.pallas import tpu as pltpu
  return pltpu.InterpretParams() if hasattr(pltpu, "InterpretParams") else True
