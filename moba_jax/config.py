"""Typed, frozen configuration dataclasses (the project's one config system).

Sections are frozen dataclasses; each validates itself in __post_init__ and raises ValueError naming
the key and the accepted range. TOML loading and dotted key=value overrides build on these.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Union

HybridFull = Union[int, Literal["all"]]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder shape. head_dim * heads need not equal d_model."""

  vocab_size: int = 256
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 2
  head_dim: int = 32
  mlp_dim: int = 384
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  dtype: str = "float32"  # compute dtype of activations (bfloat16 on accelerators)
  param_dtype: str = "float32"
  remat: bool = False  # rematerialize each layer in the backward pass

  def __post_init__(self):
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                "mlp_dim"):
      value = getattr(self, key)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"model.{key}={value!r} must be an integer >= 1")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"model.n_heads={self.n_heads} must be divisible by "
                       f"model.n_kv_heads={self.n_kv_heads}")
    for key in ("dtype", "param_dtype"):
      if getattr(self, key) not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"model.{key}={getattr(self, key)!r} must be one of "
                         "'float32', 'bfloat16', 'float16'")
    if not self.rope_theta > 0:
      raise ValueError(f"model.rope_theta={self.rope_theta} must be > 0")
    if not self.norm_eps > 0:
      raise ValueError(f"model.norm_eps={self.norm_eps} must be > 0")


@dataclasses.dataclass(frozen=True)
class MobaConfig:
  """Attention of each layer: the last `hybrid_full_layers` are full attention, the rest MoBA.

  hybrid_full_layers: 0 = all MoBA; n_layers or "all" = all full attention.
  implementation / full_implementation: names from moba_jax.attention.implementations().
  """

  block_size: int = 64
  topk: int = 3
  hybrid_full_layers: HybridFull = 0
  implementation: str = "auto"
  full_implementation: str = "auto"
  interpret: bool = False  # run Pallas kernels in interpret mode (CPU testing)

  def __post_init__(self):
    from moba_jax.attention import implementations  # late import: no cycle at module load

    if not isinstance(self.block_size, int) or self.block_size < 1:
      raise ValueError(f"moba.block_size={self.block_size!r} must be an integer >= 1")
    if not isinstance(self.topk, int) or self.topk < 1:
      raise ValueError(f"moba.topk={self.topk!r} must be an integer >= 1")
    hfl = self.hybrid_full_layers
    if not (hfl == "all" or (isinstance(hfl, int) and not isinstance(hfl, bool) and hfl >= 0)):
      raise ValueError(f"moba.hybrid_full_layers={hfl!r} must be an integer >= 0 or 'all'")
    for key, kind in (("implementation", "moba"), ("full_implementation", "full")):
      valid = implementations(kind)
      if getattr(self, key) not in valid:
        raise ValueError(f"moba.{key}={getattr(self, key)!r} must be one of {valid}")


def layer_kinds(n_layers: int, hybrid_full_layers: HybridFull) -> tuple[str, ...]:
  """Attention kind per layer: the last `hybrid_full_layers` layers "full", the others "moba"."""
  n_full = n_layers if hybrid_full_layers == "all" else int(hybrid_full_layers)
  if not 0 <= n_full <= n_layers:
    raise ValueError(f"moba.hybrid_full_layers={hybrid_full_layers!r} must be in "
                     f"[0, n_layers={n_layers}] or 'all'")
  return ("moba",) * (n_layers - n_full) + ("full",) * n_full


@dataclasses.dataclass(frozen=True)
class GridConfig:
  """The layer-wise hybrid grid (owned by moba_jax/grid.py; fields may grow)."""

  out_dir: str = "runs/grid"
  seeds: tuple[int, ...] = (0, 1, 2)
  # hybrid_full_layers of each SFT variant: 0 = all MoBA, "all" = all full attention.
  variants: tuple[HybridFull, ...] = (0, 1, 3, 5, 10, "all")
