"""Mesh, logical axis names and their rules onto the (data, fsdp, context, tensor) mesh, helpers.

Model code names logical axes only (MaxText style); rules map them to mesh axes:
  params:      vocab, embed, mlp, heads, kv_heads, head_dim, norm, layers
  activations: batch, length, embed, heads, kv_heads, head_dim, mlp, vocab
One rule table serves both. When a logical axis maps to a mesh axis that an earlier dimension of the
same array already uses (activation "embed" -> fsdp after "batch" -> (data, fsdp)), or to mesh axes
whose size does not divide the dimension, that mesh axis is dropped (the dimension is replicated on
it) instead of failing. `activate(mesh, rules)` sets both `jax.set_mesh` and the Flax rule context.

Context parallelism: the rule for `length` (default: the `context` axis) splits the sequence of
every activation. Attention is the one place that needs the whole sequence: the dispatcher
(moba_jax.attention) asks `sequence_axes()` which mesh axes of the active mesh split it and, if any,
runs the context-parallel implementation (moba_jax/context_parallel.py) over them.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.sharding import NamedSharding, PartitionSpec

from moba_jax.config import MESH_AXES, AxisRules

# The mesh axes and the default rules are the config's (moba_jax.config: MESH_AXES, AxisRules).
LOGICAL_AXIS_RULES = AxisRules().as_tuples()


def mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, ...]:
  """(data, fsdp, context, tensor) with a -1 entry resolved; raises naming the keys if it does not
  fit."""
  sizes = [getattr(mesh_cfg, a) for a in MESH_AXES]
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n_devices % fixed:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({fixed}) must "
                       f"divide the device count {n_devices}")
    sizes[sizes.index(-1)] = n_devices // fixed
  if math.prod(sizes) != n_devices:
    raise ValueError(f"mesh.{' * mesh.'.join(MESH_AXES)} = {math.prod(sizes)} "
                     f"({dict(zip(MESH_AXES, sizes))}) must equal the device count {n_devices}")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A (data, fsdp, context, tensor) mesh, Auto axis types, over all (or the given) devices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)


def rules_from_config(mesh_cfg) -> tuple[tuple[str, tuple[str, ...]], ...]:
  return mesh_cfg.rules.as_tuples()


def _as_tuple(target) -> tuple[str, ...]:
  if target is None:
    return ()
  return (target,) if isinstance(target, str) else tuple(target)


def logical_to_spec(logical_axes, rules=None, shape=None, mesh=None) -> PartitionSpec:
  """PartitionSpec for logical axis names under `rules`, skipping reused or non-dividing axes."""
  return _resolve(logical_axes, rules, shape, mesh)[0]


def _resolve(logical_axes, rules, shape, mesh):
  """(PartitionSpec, [(logical name, dimension size, the rule's mesh axes (size > 1), those
  dropped because their product did not divide the dimension)] a dimension that lost some)."""
  table = {name: _as_tuple(target) for name, target in (rules or LOGICAL_AXIS_RULES)}
  sizes = dict(mesh.shape) if mesh is not None else {}
  used: set[str] = set()
  spec, dropped = [], []
  for dim, name in enumerate(logical_axes):
    axes = [a for a in table.get(name, ()) if a not in used] if name else []
    if shape is not None and sizes:
      want, lost = tuple(a for a in axes if sizes.get(a, 1) > 1), []
      while axes and shape[dim] % math.prod(sizes.get(a, 1) for a in axes):
        lost.append(axes.pop())
      if lost := tuple(a for a in lost if sizes.get(a, 1) > 1):
        dropped.append((name, shape[dim], want, lost))
    axes = [a for a in axes if sizes.get(a, 1) > 1] if sizes else axes
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return PartitionSpec(*spec), dropped


def undivided(state, mesh, rules=None) -> list[str]:
  """One line per (logical axis, size) whose rule's mesh axes do not divide the parameters'
  dimension, which is then replicated over the axes dropped (more memory and compute a device
  than the mesh suggests): "kv_heads (2) is not divisible by mesh.tensor=4: replicated over
  tensor in 4 parameters"."""
  counts: dict = {}
  for v in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    if names := _logical_names(v):
      spec, drops = _resolve(names, rules, v.shape, mesh)
      used = {a for entry in spec if entry for a in _as_tuple(entry)}
      for name, size, want, lost in drops:
        if lost := tuple(a for a in lost if a not in used):  # not taken by a later dimension
          key = (name, size, want, lost)
          counts[key] = counts.get(key, 0) + 1
  sizes = dict(mesh.shape)
  return [f"{name} ({size}) is not divisible by {' x '.join(f'mesh.{a}={sizes[a]}' for a in want)}"
          f": replicated over {', '.join(lost)} in {n} parameter{'s' * (n > 1)}"
          for (name, size, want, lost), n in sorted(counts.items())]


def shard(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
  """Hints the sharding of an activation by logical axis names; a no-op without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  rules = spmd.get_logical_axis_rules() or LOGICAL_AXIS_RULES
  spec = logical_to_spec(logical_axes, rules, x.shape, mesh)
  return jax.lax.with_sharding_constraint(x, spec)


def sequence_axes(seq_len: int, rules=None) -> tuple[str, ...]:
  """The mesh axes of the active mesh (`jax.set_mesh`) that the `length` rule splits the sequence
  over: those of size > 1 not already manual (inside a shard_map over them); () without a mesh.
  Raises ValueError if `seq_len` is not a multiple of their product (an error, not a silent
  replication: a context-parallel run would otherwise hold the whole sequence on every device)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  table = dict(rules or spmd.get_logical_axis_rules() or LOGICAL_AXIS_RULES)
  sizes, manual = dict(mesh.shape), set(mesh.manual_axes)
  axes = tuple(a for a in _as_tuple(table.get("length")) if sizes.get(a, 1) > 1 and a not in manual)
  check_divisible(seq_len, axes, sizes)
  return axes


def check_divisible(seq_len: int, axes: tuple[str, ...], sizes) -> int:
  """The number of sequence shards over mesh `axes` ({name: size} in `sizes`); ValueError naming
  them if it does not divide `seq_len`."""
  n = math.prod(sizes[a] for a in axes)
  if seq_len % n:
    names = " * ".join(f"{a!r}" for a in axes)
    raise ValueError(f"sequence length {seq_len} must be divisible by the {names} mesh axis size "
                     f"{n} (the sequence is split over it)")
  return n


@contextlib.contextmanager
def activate(mesh: jax.sharding.Mesh, rules=None):
  """Sets the mesh (jax.set_mesh) and the logical axis rules for tracing model code."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules or LOGICAL_AXIS_RULES):
    yield


def _logical_names(v) -> tuple | None:
  """A variable's logical axis names (its `out_sharding` metadata), one a dimension, or None."""
  names = v.get_metadata().get("out_sharding") if hasattr(v, "get_metadata") else None
  return names if names and len(names) == len(getattr(v, "shape", ())) else None


def _variable_spec(v, mesh, rules) -> NamedSharding:
  if not (names := _logical_names(v)):
    return NamedSharding(mesh, PartitionSpec())
  return NamedSharding(mesh, logical_to_spec(names, rules, v.shape, mesh))


def state_shardings(state, mesh, rules=None):
  """NamedSharding per leaf of an nnx.State (same structure), from its logical axis metadata."""
  def f(v):
    if isinstance(v, nnx.Variable):
      return v.replace(_variable_spec(v, mesh, rules))
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(f, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh, rules=None) -> NamedSharding:
  """Sharding of [B, T] batch arrays: batch over the rule's mesh axes, length per its rule (the
  context axis: each device reads its slice of the sequence)."""
  return NamedSharding(mesh, logical_to_spec(("batch", "length"), rules, mesh=mesh))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def global_batch(local: dict, sharding: NamedSharding, global_rows: int) -> dict:
  """Assembles each process's rows into global jax.Arrays laid out by `sharding`."""
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, (global_rows,) + x.shape[1:])
  return {k: put(v) for k, v in local.items()}
