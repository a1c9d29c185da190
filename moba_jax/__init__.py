"""moba_jax: MoBA (Mixture of Block Attention) for JAX: exact semantics, kernels, models, grids.

`moba_jax.moba_attention` and `moba_jax.full_attention` are the entry points; both go through the
one dispatcher `moba_jax.attention.attention(q, k, v, kind=..., implementation=...)`.
"""

from moba_jax.attention import KernelOptions, full_attention, implementations, moba_attention

__all__ = ["KernelOptions", "full_attention", "implementations", "moba_attention"]
__version__ = "0.1.0"
