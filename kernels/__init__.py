"""Pallas MoBA kernels, installed as `moba_jax.kernels`. Reached through moba_jax.attention."""
