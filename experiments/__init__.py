"""Experiment grids as TOML files, installed as `moba_jax.experiments` (package data)."""
