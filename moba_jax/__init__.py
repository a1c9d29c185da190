"""moba_jax: MoBA (Mixture of Block Attention) for JAX: exact semantics, kernels, models, grids."""

from moba_jax.attention import attention, full_attention, implementations, moba_attention

__all__ = ["attention", "full_attention", "implementations", "moba_attention"]
__version__ = "0.1.0"
