"""Logical axis names, their default rules onto the (data, fsdp, tensor) mesh, and activation hints.

Model code names logical axes only; rules map them to mesh axes (MaxText style).
"""

from __future__ import annotations

import jax
from flax.core import spmd

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes, or None = replicated)
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
)


def shard(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
  """Hints the sharding of an activation by logical axis names; a no-op without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  rules = spmd.get_logical_axis_rules() or LOGICAL_AXIS_RULES
  spec = jax.sharding.PartitionSpec(*spmd.from_sharding_rules(logical_axes, rules))
  return jax.lax.with_sharding_constraint(x, spec)
