"""moba_jax: MoBA (Mixture of Block Attention) for JAX: exact semantics, kernels, models, grids.

`moba_jax.moba_attention` and `moba_jax.full_attention` are the entry points; both go through the
one dispatcher `moba_jax.attention.attention(q, k, v, kind=..., implementation=...)`.

The names below load on first use (PEP 562), so `import moba_jax.cli` imports no JAX: the CLI
installs its signal handling before anything slow starts (a Ctrl-C during `import jax` would
otherwise print a traceback).
"""

import importlib

__all__ = ["KernelOptions", "full_attention", "implementations", "moba_attention"]
__version__ = "0.1.0"


def __getattr__(name):
  if name in __all__:
    return getattr(importlib.import_module("moba_jax.attention"), name)
  raise AttributeError(f"module 'moba_jax' has no attribute {name!r}")


def __dir__():
  return sorted([*globals(), *__all__])
