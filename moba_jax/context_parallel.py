"""MoBA with one sequence sharded over devices (context parallelism): the all-gather baseline.

The sequence axis of q, k, v and segment_ids [B, T, ...] is split over one mesh axis (`axis`,
e.g. "context"); shard i holds positions [i * T/n, (i + 1) * T/n). Each shard all-gathers the keys,
values and segment ids (the gate needs the block means of every past block, and a query may choose
any past block of its document), computes the layout, the block means and the gate locally, and
attends its own queries with the xla path's chunked loop (`moba.attend_queries`): exactly MoBA
(docs/semantics.md), packed documents across shard boundaries included. Gradients come back
through the all-gather's transpose (a reduce-scatter of dK/dV).

What the issue (16) asks beyond this baseline, not built yet: a `mesh.context` axis in the config
and the model, a cheaper exchange of only the chosen blocks, ring attention for full layers, and
the memory and communication measurements.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moba_jax import moba as moba_lib


def moba_context_parallel(q, k, v, segment_ids, *, mesh, axis: str, block_size: int, topk: int,
                          softmax_scale=None):
  """MoBA attention [B, T, H, D] of q [B, T, H, D], k, v [B, T, K, D] (segment_ids [B, T] or
  None) with T sharded over mesh axis `axis`; T must be divisible by its size."""
  n = mesh.shape[axis]
  if q.shape[1] % n:
    raise ValueError(f"sequence length {q.shape[1]} must be divisible by the {axis!r} mesh axis "
                     f"size {n}")
  if segment_ids is None:
    segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
  seq_spec = P(None, axis)

  def shard(q_l, k_l, v_l, seg_l):  # [B, T/n, ...] each
    gather = lambda x: jax.lax.all_gather(x, axis, axis=1, tiled=True)
    k_all, v_all, seg_all = gather(k_l), gather(v_l), gather(seg_l)
    layout = moba_lib.doc_layout(seg_all, block_size)
    start = jax.lax.axis_index(axis) * q_l.shape[1]
    positions = start + jnp.arange(q_l.shape[1], dtype=jnp.int32)
    layout_q = moba_lib.Layout(*(jax.lax.dynamic_slice_in_dim(a, start, q_l.shape[1], axis=1)
                                 for a in layout))
    return moba_lib.attend_queries(q_l, positions, layout_q, layout, k_all, v_all,
                                   block_size=block_size, topk=topk,
                                   softmax_scale=softmax_scale)

  sharded = [jax.reshard(x, jax.sharding.NamedSharding(mesh, seq_spec))
             for x in (q, k, v, segment_ids)]
  return jax.shard_map(shard, mesh=mesh, in_specs=(seq_spec,) * 4, out_specs=seq_spec)(*sharded)
