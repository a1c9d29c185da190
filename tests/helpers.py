"""Helpers shared by the behavioural suite (tests/test_moba.py) and the kernel tests.

The implementations come from the dispatcher's registry. By default the Pallas kernels run in
interpret mode on the CPU (CI); `pytest --compiled` runs them compiled on this machine's
accelerator, as JAX's own Pallas tests run one suite both ways, and skips the kernels of other
platforms (pallas_tpu on a GPU, pallas_gpu on a TPU; both on a CPU).
"""

import functools
import importlib
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moba_jax import attention, moba_attention

COMPILED = False  # set by tests/conftest.py from --compiled
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def import_installed(name: str):
  """Imports the installed distribution `name` where the checkout's own top-level directory of
  that name would shadow it (pytest puts the checkout first on sys.path): `kernels/` is
  moba_jax.kernels once installed, and transformers >= 5.25 requires Hugging Face's `kernels`
  package, which it imports as `kernels`. Returns the module, or None where none is installed."""
  saved = sys.path[:]
  sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != CHECKOUT]
  try:
    return importlib.import_module(name)
  except ImportError:
    return None
  finally:
    sys.path[:] = saved
KERNEL_PLATFORM = {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}


def runs_here(name: str):
  """A skipif mark for a test that runs the implementation `name`: a kernel skips where
  `--compiled` would compile it for another platform (pallas_tpu on a GPU)."""
  platform = KERNEL_PLATFORM.get(name)
  skip = COMPILED and platform is not None and jax.default_backend() != platform
  return pytest.mark.skipif(skip, reason=f"{name} compiles for {platform} only")


def moba_impls() -> list:
  """Every registered MoBA implementation, as pytest params (kernels skipped where they cannot
  run in this mode)."""
  return [pytest.param(name, marks=runs_here(name))
          for name in attention.implementations("moba") if name != "auto"]


def kernel_impls() -> list:
  return [p for p in moba_impls() if p.values[0] in KERNEL_PLATFORM]


def options(impl: str, tiles=()) -> attention.KernelOptions:
  return attention.KernelOptions(interpret=impl in KERNEL_PLATFORM and not COMPILED, tiles=tiles)


def run(impl, q, k, v, segment_ids=None, tiles=(), **kw):
  """MoBA through the dispatcher under one jax.jit per setting (eager dispatch compiles every op
  of the reference and XLA paths, and of their backward, one at a time: 5-10x slower on the CPU;
  tests/test_attention_api.py calls the entry points eagerly)."""
  return _jitted_run(q, k, v, segment_ids, impl=impl, tiles=tuple(tiles),
                     kw=tuple(sorted(kw.items())))


@functools.partial(jax.jit, static_argnames=("impl", "tiles", "kw"))
def _jitted_run(q, k, v, segment_ids, *, impl, tiles, kw):
  return moba_attention(q, k, v, segment_ids=segment_ids, implementation=impl,
                        options=options(impl, tiles), **dict(kw))


def route(q, k, segment_ids, *, run=True, **kw):
  """The kernels' routing (`_routing.route`) under jit, as the kernels call it: (routing, dims).
  Eagerly every op of the routing dispatches alone (~6-15 s a call on 2 cores). run=False only
  traces it (for dims: the routing's arrays are then tracers)."""
  from moba_jax.kernels import _routing
  box = {}

  def f(q, k, segment_ids):
    routing, box["dims"] = _routing.route(q, k, segment_ids, **kw)
    return routing

  routing = jax.jit(f)(q, k, segment_ids) if run else jax.make_jaxpr(f)(q, k, segment_ids)
  return routing, box["dims"]


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def random_qkv(seed, batch, seq, heads, kv_heads, dim, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (batch, seq, heads, dim), dtype),
          jax.random.normal(kk, (batch, seq, kv_heads, dim), dtype),
          jax.random.normal(kv, (batch, seq, kv_heads, dim), dtype))


def packed_segments(batch, lengths):
  seg = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(lengths)])
  return jnp.asarray(np.broadcast_to(seg, (batch, len(seg))))


def vjp_all(fn, q, k, v, cot):
  """(out, dq, dk, dv) of fn at q, k, v for cotangent cot, fn's forward and backward compiled."""
  out, vjp = jax.vjp(jax.jit(fn), q, k, v)
  return (out, *vjp(cot))


def train_tiny_text_model(root, corpus, *, context: int, block_size: int):
  """A tiny byte-level model (1 MoBA + 1 full layer) trained one step on the JSONL `corpus`, in
  root/run: a real checkpoint for the generate and eval tests. -> its run dir."""
  from moba_jax import train
  from moba_jax.config import load_config

  cfg = load_config(None, [
      f"run_dir={root / 'run'}", "model.vocab_size=259", "model.d_model=16", "model.n_layers=2",
      "model.n_heads=2", "model.n_kv_heads=1", "model.head_dim=8", "model.mlp_dim=32",
      f"moba.block_size={block_size}", "moba.topk=2", "moba.hybrid_full_layers=1",
      "train.steps=1", "train.batch_size=1", f"train.seq_len={context}", "train.warmup_steps=0",
      "data.task=corpus", f"data.path={corpus}", "data.prefetch=0", "eval.batches=0",
      "eval.trailing_tokens=8", "checkpoint.async_save=false", "log.progress=false",
      "mesh.data=1"])
  train.run(cfg, progress=False)
  return root / "run"


def primitives_outside_kernels(jaxpr) -> set:
  """Every primitive's name in jaxpr and the jaxprs in its equations' params (cond branches,
  loop bodies, custom_vjp rules), not inside kernels (`pl.when` in a kernel body is a cond):
  pallas_call, and mpmd_map (`pl.kernel`, the Mosaic GPU kernels')."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    kernel = eqn.primitive.name in ("pallas_call", "mpmd_map")
    subs = [] if kernel else list(eqn.params.values())
    while subs:
      x = subs.pop()
      if isinstance(x, (tuple, list)):
        subs.extend(x)
      elif hasattr(x, "eqns"):
        names |= primitives_outside_kernels(x)
      elif hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns"):
        names |= primitives_outside_kernels(x.jaxpr)
  return names


def flip_a_params_byte(step_dir) -> None:
  """One byte flipped mid-way through the largest array file of a checkpoint step's params: the
  step still restores, and fails its checksums (moba_jax/checkpoint.py)."""
  from pathlib import Path
  blob = max((f for f in (Path(step_dir) / "params").rglob("*")
              if f.is_file() and "METADATA" not in f.name.upper()), key=lambda f: f.stat().st_size)
  data = bytearray(blob.read_bytes())
  data[len(data) // 2] ^= 0xFF
  blob.write_bytes(bytes(data))
