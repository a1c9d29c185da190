"""Full (causal, within-document) attention for TPUs: JAX's Pallas Mosaic splash attention.

The kernel is `jax.experimental.pallas.ops.tpu.splash_attention` (forward, dQ and dK/dV kernels,
its own custom_vjp), with a causal mask and segment ids. This wrapper makes it the project's full
attention exactly (moba.full_reference, docs/semantics.md):
  * documents are maximal runs of equal segment_ids: the kernel's segment ids are the run index
    (cumulative count of id changes), so two separate runs of one id never attend to each other;
  * softmax scale head_dim**-0.5 unless given: splash has no scale, so q is scaled before it
    (in float32, then cast back to q's dtype);
  * GQA: splash's multi-head kernel takes H query heads over K kv heads directly;
  * float32 inputs: the kernel's matrix products are traced at HIGHEST precision (true float32,
    as the xla path and the MoBA kernels); half precision accumulates in float32;
  * T is padded to a multiple of the tiles and head_dim to 128 lanes: padded keys come after
    every real query (causal) and carry a segment id of their own, zero lanes add nothing to
    q.k or to the output; the padding is sliced off.
Under a mesh it runs per shard of batch and heads (`_routing.over_mesh_shards`): a Mosaic call
cannot be partitioned automatically, and full attention is independent per (batch row, kv head).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from moba_jax.attention import KernelOptions
from moba_jax.kernels import _routing as rt

LANES = 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query and key tiles of every splash kernel (forward, dQ, dK/dV); multiples of 128. Both are
  capped at the sequence rounded up to 128, and the sequence is padded to a multiple of both."""

  block_q: int = 512
  block_kv: int = 512

  @classmethod
  def get_default(cls) -> "BlockSizes":
    return cls()

  def validate(self) -> None:
    for name in ("block_q", "block_kv"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0 or value % LANES:
        raise ValueError(f"{name}={value!r} must be a positive multiple of {LANES} (splash "
                         "attention's tiles: the kernel puts key positions in lanes)")


def doc_ids(segment_ids):
  """[B, T] int32 index of each position's document (maximal run of equal segment ids)."""
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], jnp.int32),
                          jnp.cumsum(change, axis=1, dtype=jnp.int32)], axis=1)


@functools.lru_cache(maxsize=32)
def _kernel(heads, seq, bq, bkv, interpret):
  mask = splash.MultiHeadMask([splash.CausalMask((seq, seq))] * heads)
  sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                            block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                            block_kv_dq=bkv)
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)


def _attend(q, k, v, segment_ids, *, scale, sizes, interpret):
  """One shard: q [B, T, H, D], k/v [B, T, K, D], segment_ids [B, T] -> [B, T, H, D]."""
  batch, seq, heads, dim = q.shape
  padded = rt._round_up(seq, LANES)
  bq, bkv = min(sizes.block_q, padded), min(sizes.block_kv, padded)
  tp = rt._round_up(seq, math.lcm(bq, bkv))
  dp = rt._round_up(dim, LANES)
  q = (q.astype(jnp.float32) * scale).astype(q.dtype)

  def layout(x):  # [B, T, N, D] -> [B, N, Tp, Dp], zero padded
    return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, tp - seq), (0, dp - dim)))

  # Padded positions form one more document (ids of real positions are < seq).
  ids = jnp.pad(doc_ids(segment_ids.astype(jnp.int32)), ((0, 0), (0, tp - seq)),
                constant_values=seq)
  kernel = _kernel(heads, tp, bq, bkv, interpret)
  one = lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(s, s))
  # float32 inputs get true float32 products in the kernel's dots, as in the xla path and MoBA.
  with jax.default_matmul_precision("highest" if q.dtype == jnp.float32 else None):
    out = jax.vmap(one)(layout(q), layout(k), layout(v), ids)  # [B, H, Tp, Dp]
  return jnp.swapaxes(out[:, :, :seq, :dim], 1, 2)


@functools.partial(jax.jit, static_argnames=("softmax_scale", "options"))
def full_attention_tpu(q, k, v, segment_ids=None, *, softmax_scale=None,
                       options: KernelOptions | None = None):
  """Causal full attention within documents. q [B, T, H, D]; k, v [B, T, K, D]; segment_ids
  [B, T] int or None (one document). options: interpret mode and tiles (block_q, block_kv)."""
  options = options or KernelOptions()
  sizes = options.block_sizes(BlockSizes, BlockSizes.get_default())
  sizes.validate()
  scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
  if segment_ids is None:
    segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
  run = functools.partial(_attend, scale=scale, sizes=sizes, interpret=options.interpret)
  return rt.over_mesh_shards(run, q, k, v, segment_ids)
