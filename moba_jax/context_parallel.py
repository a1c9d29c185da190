"""Attention with one sequence sharded over devices (context parallelism): all-gather K/V.

The sequence axis of q, k, v and segment_ids [B, T, ...] is split over mesh axes `seq_axes` (the
`context` axis by default: the `length` rule, moba_jax.sharding.sequence_axes); with n shards,
shard i holds positions [i * T/n, (i + 1) * T/n). Batch and heads may be split over other mesh
axes at the same time (data / fsdp, tensor): the shard_map takes them as they are.

Each shard all-gathers the keys, values and segment ids of the whole sequence and attends its own
queries over them:
  - MoBA, implementation "pallas_gpu" / "pallas_tpu": the Pallas kernel with a query offset
    (`q_start` = shard index * T/n, traced): the kernel's routing computes the layout, the block
    means and the gate over the whole gathered sequence and routes only the shard's queries; its
    backward gives dq for them and dK/dV over all T keys;
  - MoBA, implementation "xla": the layout, the block means and the gate are computed locally from
    the gathered keys, and the queries go through the xla path's chunked loop
    (`moba.attend_queries`);
  - full: causal attention within documents over the gathered keys, dense per chunk of queries
    (xla; no ring attention yet).
All are exactly their single-device semantics (docs/semantics.md), packed documents across shard
boundaries included. dK and dV come back as a float32 reduce-scatter (`_gather_f32`): the kernels
take the gathered K/V as float32 (rounded back to the compute dtype inside, exactly) so that their
dK/dV come out float32 and are rounded once, after the sum over shards.

Memory: the shard function is rematerialized (`jax.checkpoint`), so what a layer keeps for its
backward is the local q, k, v shards only (1/n of the sequence); the gathered keys and values
(and the xla loop's float32 copies and block means, or the kernels' routing, block means and
partial rows) live only inside one layer's forward or backward, and the chunk budget of the xla
loop (64 MiB on one device) is split over the n shards. Communication per layer and device: the forward gathers (n-1)/n of K, V (compute dtype)
and the segment ids, the backward reduce-scatters dK, dV (float32); the rematerialization may
gather once more (XLA on the CPU reuses the forward's gather). docs/training.md has the measured
bytes. Exchanging only the chosen blocks is not built (docs/training.md: it would save about half,
the causal half, and unevenly).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moba_jax import moba as moba_lib
from moba_jax import sharding as shd


def _gather(x, seq_axes):
  """The whole sequence [B, T, ...] from this shard's [B, T/n, ...]."""
  return jax.lax.all_gather(x, seq_axes, axis=1, tiled=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _gather_f32(x, seq_axes):
  """K or V of the whole sequence in float32, gathered in x's dtype (half the bytes in bf16);
  the gradient is reduce-scattered in float32 and rounded to x's dtype once, after the sum over
  shards (as one device sums its chunks in float32)."""
  return _gather(x, seq_axes).astype(jnp.float32)


def _gather_f32_fwd(x, seq_axes):
  return _gather_f32(x, seq_axes), jnp.zeros((), x.dtype)


def _gather_f32_bwd(seq_axes, like, ct):
  out = jax.lax.psum_scatter(ct, seq_axes, scatter_dimension=1, tiled=True)
  return (out.astype(like.dtype),)


_gather_f32.defvjp(_gather_f32_fwd, _gather_f32_bwd)


def _local_start(n_local, seq_axes):
  return jax.lax.axis_index(seq_axes) * n_local


def _moba_shard(q_l, k_l, v_l, seg_l, *, seq_axes, block_size, topk, softmax_scale, budget):
  """One shard's MoBA: q_l [B, T/n, H, D] over the gathered keys -> [B, T/n, H, D]."""
  k_all, v_all = _gather_f32(k_l, seq_axes), _gather_f32(v_l, seq_axes)  # [B, T, K, D] f32
  seg_all = _gather(seg_l, seq_axes)
  n_q = q_l.shape[1]
  layout = moba_lib.doc_layout(seg_all, block_size)
  start = _local_start(n_q, seq_axes)
  positions = start + jnp.arange(n_q, dtype=jnp.int32)
  layout_q = moba_lib.Layout(*(jax.lax.dynamic_slice_in_dim(a, start, n_q, axis=1)
                               for a in layout))
  return moba_lib.attend_queries(q_l, positions, layout_q, layout, k_all, v_all,
                                 block_size=block_size, topk=topk, softmax_scale=softmax_scale,
                                 chunk_budget_bytes=budget)


def _moba_kernel_shard(q_l, k_l, v_l, seg_l, *, seq_axes, kernel, block_size, topk,
                       softmax_scale, options):
  """One shard's MoBA through a Pallas kernel: q_l [B, T/n, H, D] at their offset in the gathered
  sequence -> [B, T/n, H, D]."""
  k_all, v_all = _gather_f32(k_l, seq_axes), _gather_f32(v_l, seq_axes)  # [B, T, K, D] f32
  seg_all = _gather(seg_l, seq_axes)
  return kernel(q_l, k_all, v_all, seg_all, block_size=block_size, topk=topk,
                softmax_scale=softmax_scale, options=options,
                q_start=_local_start(q_l.shape[1], seq_axes))


def _full_chunk(batch, heads, seq, n_q, budget):
  """Queries per chunk of the full path: float32 logits [B, H, C, T] within `budget` bytes, a power
  of two dividing n_q."""
  chunk = max(1, budget // (batch * heads * seq * 4))
  chunk = 1 << (chunk.bit_length() - 1)
  return min(chunk, n_q & -n_q)


def _full_shard(q_l, k_l, v_l, seg_l, *, seq_axes, softmax_scale, budget):
  """One shard's causal full attention within documents over the gathered keys, its queries in
  chunks (dense logits [B, H, C, T] per chunk: memory O(T), not O(T^2 / n))."""
  k32, v32 = _gather_f32(k_l, seq_axes), _gather_f32(v_l, seq_axes)  # [B, T, K, D] f32
  seg_all = _gather(seg_l, seq_axes)
  batch, n_q, heads, dim = q_l.shape
  seq = k32.shape[1]
  doc_start = moba_lib.doc_layout(seg_all, 1).doc_start  # [B, T]
  start = _local_start(n_q, seq_axes)
  doc_start_q = jax.lax.dynamic_slice_in_dim(doc_start, start, n_q, axis=1)  # [B, T/n]
  pos_q = start + jnp.arange(n_q)
  chunk = _full_chunk(batch, heads, seq, n_q, budget)
  precision = "highest" if q_l.dtype == jnp.float32 else None  # as attention's full xla path

  @jax.checkpoint
  def body(q_c, pos_c, doc_c, k32, v32):  # [B, C, H, D], [C], [B, C]
    causal = pos_c[:, None] >= jnp.arange(seq)[None, :]  # [C, T]
    mask = (doc_c[:, :, None] == doc_start[:, None, :]) & causal  # [B, C, T]
    with jax.default_matmul_precision(precision):
      return jax.nn.dot_product_attention(q_c, k32.astype(q_c.dtype), v32.astype(q_c.dtype),
                                          mask=mask[:, None], scale=softmax_scale,
                                          implementation="xla")

  to_chunks = lambda x, axis: jnp.moveaxis(
      x.reshape(*x.shape[:axis], n_q // chunk, chunk, *x.shape[axis + 1:]), axis, 0)
  # k, v enter the loop in float32: their gradients sum over chunks and shards in float32.
  out = jax.lax.map(lambda xs: body(*xs, k32, v32),
                    (to_chunks(q_l, 1), to_chunks(pos_q, 0), to_chunks(doc_start_q, 1)))
  return jnp.moveaxis(out, 0, 1).reshape(q_l.shape)


def context_parallel_attention(q, k, v, segment_ids, *, kind: str, mesh, seq_axes,
                               batch_axes=(), head_axes=(), block_size=None, topk=None,
                               softmax_scale=None,
                               chunk_budget_bytes=moba_lib.DEFAULT_CHUNK_BUDGET_BYTES,
                               implementation: str = "xla", options=None):
  """Causal attention ("moba" or "full") [B, T, H, D] of q [B, T, H, D], k, v [B, T, K, D]
  (segment_ids [B, T] or None) with T split over the mesh axes `seq_axes`, B over `batch_axes`
  and both head axes over `head_axes` (they must divide B, H and K). `mesh` may be abstract
  (inside jit under `jax.set_mesh`). chunk_budget_bytes: the device's, as one device's xla path
  has it: each shard's query chunks get 1/n of it (n shards of T/n queries run as many chunks
  as one device over T, each 1/n the size). implementation: MoBA's, one of
  attention.CONTEXT_PARALLEL["moba"] less "auto" (resolved by the caller:
  `attention.resolve_context_parallel`); options: the kernels' KernelOptions (interpret, tiles).
  Full attention is xla whatever is named."""
  from moba_jax import attention  # imports this module lazily: no cycle

  n = shd.check_divisible(q.shape[1], tuple(seq_axes), dict(mesh.shape))
  if segment_ids is None:
    segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
  budget = max(1, chunk_budget_bytes // n)
  kernel = kind == "moba" and implementation != "xla"
  options = options or attention.KernelOptions()
  if kernel:
    attention.check_context_parallel(kind, implementation)
    body = functools.partial(_moba_kernel_shard, seq_axes=seq_axes,
                             kernel=attention.implementation_fn(kind, implementation),
                             block_size=block_size, topk=topk, softmax_scale=softmax_scale,
                             options=options)
  elif kind == "moba":
    body = functools.partial(_moba_shard, seq_axes=seq_axes, block_size=block_size, topk=topk,
                             softmax_scale=softmax_scale, budget=budget)
  else:
    body = functools.partial(_full_shard, seq_axes=seq_axes, softmax_scale=softmax_scale,
                             budget=budget)
  axes = lambda t: None if not t else t[0] if len(t) == 1 else tuple(t)
  qkv_spec = P(axes(batch_axes), axes(seq_axes), axes(head_axes), None)
  seg_spec = P(axes(batch_axes), axes(seq_axes))
  # Rematerialized: a layer keeps only its local shards for the backward (module docstring).
  # Except the TPU kernel interpreted (CPU tests): its interpreter (pltpu.InterpretParams) runs
  # callbacks that jax.checkpoint cannot rematerialize; the values are the same, only the memory
  # differs. The kernels' shard functions run with check_vma off: a pallas_call's outputs carry no
  # varying-axes type (jax asks for manual_axis_type on its out_shape); their collectives are the
  # explicit gathers and reduce-scatters above.
  remat = not (implementation == "pallas_tpu" and options.interpret) if kernel else True
  return jax.shard_map(jax.checkpoint(body) if remat else body, mesh=mesh,
                       in_specs=(qkv_spec,) * 3 + (seg_spec,), out_specs=qkv_spec,
                       check_vma=not kernel)(q, k, v, segment_ids)


def rule_axes(q_shape, k_shape, mesh, rules, seq_axes=()) -> tuple[tuple[str, ...], ...]:
  """(batch_axes, head_axes) the logical rules give q and k on `mesh`, less `seq_axes`: batch as
  `batch`, heads as `heads` where `kv_heads` is split the same way (else heads stay whole: a GQA
  group must sit on one shard with its kv head)."""
  names = ("batch", "length", "heads", "head_dim")
  spec_q = shd.logical_to_spec(names, rules, q_shape, mesh)
  spec_k = shd.logical_to_spec(("batch", "length", "kv_heads", "head_dim"), rules, k_shape, mesh)
  as_tuple = lambda e: () if e is None else (e,) if isinstance(e, str) else tuple(e)
  heads = as_tuple(spec_q[2]) if spec_q[2] == spec_k[2] else ()
  drop = lambda t: tuple(a for a in t if a not in seq_axes)
  return drop(as_tuple(spec_q[0])), drop(heads)


def moba_context_parallel(q, k, v, segment_ids, *, mesh, axis: str, block_size: int, topk: int,
                          softmax_scale=None, implementation: str = "xla", options=None):
  """MoBA attention [B, T, H, D] of q [B, T, H, D], k, v [B, T, K, D] (segment_ids [B, T] or
  None) with T sharded over the axis `axis` of a concrete `mesh`; T must be divisible by its size.
  implementation: "xla", "pallas_gpu" or "pallas_tpu" (options: their KernelOptions).
  (Models reach the same code through the dispatcher, moba_jax.attention.)"""
  shd.check_divisible(q.shape[1], (axis,), dict(mesh.shape))  # before resharding
  if segment_ids is None:
    segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
  seq_spec = jax.sharding.NamedSharding(mesh, P(None, axis))
  q, k, v, segment_ids = (jax.reshard(x, seq_spec) for x in (q, k, v, segment_ids))
  return context_parallel_attention(q, k, v, segment_ids, kind="moba", mesh=mesh,
                                    seq_axes=(axis,), block_size=block_size, topk=topk,
                                    softmax_scale=softmax_scale, implementation=implementation,
                                    options=options)
