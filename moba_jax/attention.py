"""The one attention dispatcher: full or MoBA, implementation chosen by a config string.

  attention(q, k, v, kind="full" | "moba", implementation="auto" | ..., segment_ids=..., ...)

Implementations live in one registry. "auto" picks by platform: on GPU the Pallas GPU kernel for
MoBA and cuDNN flash attention for full; on TPU the Pallas TPU kernel for MoBA and JAX's Pallas
splash attention for full; elsewhere XLA.
Kernels are imported lazily, so importing the library never needs jax-triton or a GPU.
All arguments are validated from static shapes before anything is traced or compiled.

Context parallelism is a mode of this one dispatcher, not a registry entry: when the active mesh
(`jax.set_mesh`, as the train step sets it through `sharding.activate`) splits the sequence, i.e.
the `length` rule maps to mesh axes of size > 1 (`sharding.sequence_axes`; mesh.context in the
config), `attention` runs `moba_jax.context_parallel` over those axes, with batch and heads split
as the rules split them. The implementations that can run that way are CONTEXT_PARALLEL's (MoBA:
the Pallas kernels with a query offset, or the xla loop; full: xla); "auto" resolves among them
(`resolve_context_parallel`), and another one named explicitly is an error
(`check_context_parallel`), raised while tracing, before anything compiles. Without a mesh, or
with mesh.context = 1, nothing changes.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import numbers
import warnings
from typing import Callable

import jax
import jax.numpy as jnp

from moba_jax import moba as _moba

KINDS = ("full", "moba")


@dataclasses.dataclass(frozen=True)
class KernelOptions:
  """What a kernel may be told besides the problem; the same object for every implementation
  (the reference and XLA paths ignore it). Hashable: kernels take it as a static argument.

  interpret: run Pallas kernels in interpret mode (CPU testing).
  tiles: the first fields of the kernel's BlockSizes, in order (moba_gpu: block_q, block_k,
    block_q_dkv, block_k_dkv, num_warps, num_stages, num_warps_dkv, mosaic_block_kv, mosaic_dq,
    mosaic_dkdv (the Mosaic GPU kernels, kernels/moba_mgpu.py: the default on Hopper),
    mosaic_head_chunks (their forward and backward over that many chunks of kv heads, one
    after another: less memory);
    moba_tpu: block_q, block_k, block_k_dkv, block_kv_window, block_kv_window_dkv; splash, for
    full attention: block_q, block_kv), the rest at their class defaults; () = the kernel's
    get_default().
  """

  interpret: bool = False
  tiles: tuple[int, ...] = ()

  def block_sizes(self, cls, default):
    """cls(*tiles), or `default` without tiles; too many tiles is an error naming the fields."""
    if not self.tiles:
      return default
    names = [f.name for f in dataclasses.fields(cls)]
    if len(self.tiles) > len(names):
      raise ValueError(f"tiles={list(self.tiles)} gives more than {cls.__module__.split('.')[-1]}"
                       f"'s {len(names)} tile fields ({', '.join(names)}; the rest default)")
    return cls(*self.tiles)


# name -> "module:function" (lazy) or a callable. Every MoBA implementation takes
# (q, k, v, segment_ids, *, block_size, topk, softmax_scale, options: KernelOptions); segment_ids
# None means one document per row, known when tracing (the kernels then skip data-dependent
# branches; `moba.segments` turns it into zeros).
_MOBA_IMPLS: dict[str, str | Callable] = {
    "reference": "moba_jax.moba:moba_reference",
    "xla": "moba_jax.moba:moba_xla",
    "pallas_gpu": "moba_jax.kernels.moba_gpu:moba_attention_gpu",
    "pallas_tpu": "moba_jax.kernels.moba_tpu:moba_attention_tpu",
}
# Every full implementation takes (q, k, v, segment_ids, *, softmax_scale, options: KernelOptions).
_FULL_IMPLS: dict[str, str | Callable] = {
    "reference": "moba_jax.attention:_full_reference",
    "xla": "moba_jax.attention:_full_dot_product_xla",
    "cudnn": "moba_jax.attention:_full_dot_product_cudnn",
    "splash": "moba_jax.kernels.full_tpu:full_attention_tpu",
}
_AUTO = {
    ("moba", "gpu"): ("pallas_gpu", "xla"),
    ("moba", "tpu"): ("pallas_tpu", "xla"),
    ("full", "gpu"): ("cudnn", "xla"),
    ("full", "tpu"): ("splash", "xla"),
}


# The platform each kernel compiles for (the others run anywhere); the Pallas ones also run
# interpreted on any platform (KernelOptions.interpret: slow, for tests).
KERNEL_PLATFORM = {"pallas_gpu": "gpu", "pallas_tpu": "tpu", "cudnn": "gpu", "splash": "tpu"}
_INTERPRETABLE = ("pallas_gpu", "pallas_tpu", "splash")


def check_runs_here(kind: str, name: str, interpret: bool = False,
                    platform: str | None = None) -> None:
  """Raises ValueError naming the config key where the implementation `name` (resolved) cannot
  run on `platform` (default: this process's backend): a kernel of another platform, not
  interpreted. A run calls it before building its model; a lowering for another platform
  (`moba-jax plan`, tests) does not."""
  want = KERNEL_PLATFORM.get(name)
  platform = platform or jax.default_backend()
  if want is None or want == platform or (interpret and name in _INTERPRETABLE):
    return
  key = "implementation" if kind == "moba" else "full_implementation"
  fix = ("set moba.interpret=true (Pallas interpret mode: slow, for tests), or "
         if name in _INTERPRETABLE else "")
  here = [n for n in implementations(kind) if KERNEL_PLATFORM.get(n, platform) == platform]
  raise ValueError(f"moba.{key}={name!r} compiles for {want} and this process runs on "
                   f"{platform}: {fix}name one that runs here: {', '.join(here)}")


# Implementation names that run context parallel: for MoBA the Pallas kernels (each shard's queries
# at their offset over the gathered keys) and the xla path's loop, for full dense xla per query
# chunk; "auto" resolves among them when the sequence is split (`resolve_context_parallel`).
CONTEXT_PARALLEL = {"moba": ("auto", "xla", "pallas_gpu", "pallas_tpu"), "full": ("auto", "xla")}
# Why the others cannot (yet): named in the error.
_NOT_CONTEXT_PARALLEL = {
    "reference": "the dense [T, T] oracle", "cudnn": "no ring or all-gather form yet",
    "splash": "no ring or all-gather form yet"}


def check_context_parallel(kind: str, implementation: str) -> None:
  """Raises ValueError naming `implementation` if it cannot run with the sequence split."""
  if implementation not in CONTEXT_PARALLEL[_check_kind(kind)]:
    key = "implementation" if kind == "moba" else "full_implementation"
    why = _NOT_CONTEXT_PARALLEL.get(implementation)
    raise ValueError(f"{kind} implementation={implementation!r} (moba.{key}) cannot run context "
                     f"parallel (the sequence split over mesh.context > 1"
                     f"{'; ' + why if why else ''}); use one of {CONTEXT_PARALLEL[kind]}")


def resolve_context_parallel(kind: str, implementation: str = "auto",
                             platform: str | None = None) -> str:
  """The implementation that runs `implementation` with the sequence split: a named one that can
  (else the error of `check_context_parallel`); "auto": the platform's MoBA kernel where it
  imports (pallas_gpu on GPU, pallas_tpu on TPU), else xla; for full attention xla."""
  check_context_parallel(kind, implementation)
  if implementation != "auto":
    return implementation
  platform = platform or jax.default_backend()
  names = [n for n in _AUTO.get((kind, platform), ()) if n in CONTEXT_PARALLEL[kind]]
  return next((n for n in names if n == "xla" or _importable(kind, n)), "xla")


def implementation_fn(kind: str, name: str) -> Callable:
  """The function registered as `name` for `kind` (a kernel module is imported on first use)."""
  if name not in _registry(_check_kind(kind)):
    raise ValueError(f"implementation={name!r} is not valid for kind={kind!r}; expected one of "
                     f"{tuple(_registry(kind))}")
  return _load(_registry(kind)[name])


def implementations(kind: str) -> tuple[str, ...]:
  """Valid implementation names for `kind`, "auto" included."""
  _check_kind(kind)
  return ("auto",) + tuple(_registry(kind))


def _check_kind(kind):
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r} is not valid; expected one of {KINDS}")
  return kind


def _registry(kind):
  return _MOBA_IMPLS if kind == "moba" else _FULL_IMPLS


def _load(entry):
  if callable(entry):
    return entry
  module, fn = entry.split(":")
  return getattr(importlib.import_module(module), fn)


_WARNED: set = set()


def _importable(kind, name):
  """Whether the implementation loads; a kernel that does not is said once (with the reason)."""
  try:
    _load(_registry(kind)[name])
    return True
  except ImportError as e:
    if (kind, name) not in _WARNED:
      _WARNED.add((kind, name))
      warnings.warn(f"{kind} implementation {name!r} is not available ({e}); 'auto' falls back "
                    "to the next one (on a GPU or TPU the XLA path is far slower: install the "
                    "project's 'gpu' extra, or name an implementation)", RuntimeWarning,
                    stacklevel=3)
    return False


# "auto" MoBA off GPU/TPU: below this size of dense float32 logits ([B, H, T, T]) the dense-mask
# path trains faster than the block-gathered one (whose backward is a scatter-add), measured on the
# CPU: 0.46 vs 1.24 s/step at T=256 (docs/training.md).
DENSE_AUTO_BYTES = 64 * 2**20


def resolve(kind: str, implementation: str = "auto", platform: str | None = None, *,
            dtype=None, dense_bytes: int | None = None) -> str:
  """The implementation name that `implementation` stands for.

  "auto" picks by platform (kernels where importable), then by problem: cuDNN only for half
  precision `dtype`; for MoBA without a kernel, the dense `reference` when its logits take at most
  DENSE_AUTO_BYTES (`dense_bytes`), else the block-gathered `xla`.
  """
  valid = implementations(kind)
  if implementation not in valid:
    raise ValueError(f"implementation={implementation!r} is not valid for kind={kind!r}; "
                     f"expected one of {valid}")
  if implementation != "auto":
    return implementation
  platform = platform or jax.default_backend()
  name = next((n for n in _AUTO.get((kind, platform), ()) if _importable(kind, n)), "xla")
  if name == "cudnn" and dtype is not None and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    name = "xla"  # cuDNN flash attention takes half precision only
  if kind == "moba" and name == "xla" and dense_bytes is not None and (
      dense_bytes <= DENSE_AUTO_BYTES):
    name = "reference"
  return name


def _scalar(name: str, value, lo: int | None = None) -> int | float | None:
  """A Python number from `value` (numpy and concrete jax scalars included). A traced value is
  refused: the kernels take block_size, topk and softmax_scale as static arguments."""
  if value is None or isinstance(value, bool):
    return value
  integer = isinstance(value, numbers.Integral) or (
      hasattr(value, "dtype") and jnp.issubdtype(value.dtype, jnp.integer))
  if not (integer or isinstance(value, numbers.Real) or hasattr(value, "dtype")):
    return value  # not a number: the range checks name it
  try:
    return int(value) if integer else float(value)
  except jax.errors.JAXTypeError:  # a tracer: its value is not known when the kernel is built
    raise ValueError(f"{name} is a traced value; pass a Python number (it is a static argument "
                     "of the attention kernels)") from None
  except TypeError:  # e.g. an array of several values
    return value


def check_scalars(block_size=None, topk=None, softmax_scale=None):
  """(block_size, topk, softmax_scale) as Python numbers, validated; errors name the value."""
  block_size, topk = _scalar("block_size", block_size), _scalar("topk", topk)
  softmax_scale = _scalar("softmax_scale", softmax_scale)
  if softmax_scale is not None and not (isinstance(softmax_scale, (int, float))
                                        and math.isfinite(softmax_scale) and softmax_scale > 0):
    raise ValueError(f"softmax_scale={softmax_scale!r} must be a finite number > 0 (or None for "
                     "head_dim**-0.5)")
  return block_size, topk, softmax_scale


def validate(q, k, v, segment_ids=None, *, kind="moba", block_size=None, topk=None,
             softmax_scale=None) -> None:
  """Raises ValueError naming the bad argument and the accepted range."""
  _check_kind(kind)
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError("q, k, v must be [batch, seq, heads, head_dim]; got ndim "
                     f"q={q.ndim}, k={k.ndim}, v={v.ndim}")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name}.dtype={x.dtype} must be a floating type (float32, bfloat16, "
                       "float16)")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k, v dtypes must match: got q {q.dtype}, k {k.dtype}, v {v.dtype} "
                     "(cast them to one dtype)")
  batch, seq, heads, dim = q.shape
  if k.shape != v.shape:
    raise ValueError(f"k.shape={k.shape} must equal v.shape={v.shape}")
  if k.shape[0] != batch or k.shape[1] != seq:
    raise ValueError(f"k batch/seq {k.shape[:2]} must equal q's {(batch, seq)} "
                     "(self-attention: one sequence of keys per sequence of queries)")
  if k.shape[3] != dim:
    raise ValueError(f"head_dim mismatch: q has {dim}, k/v have {k.shape[3]}; they must be equal")
  kv_heads = k.shape[2]
  if kv_heads < 1 or heads % kv_heads:
    raise ValueError(f"heads={heads} must be divisible by kv_heads={kv_heads} (GQA groups); "
                     f"valid kv_heads are the divisors of {heads}")
  if segment_ids is not None:
    if tuple(segment_ids.shape) != (batch, seq):
      raise ValueError(f"segment_ids.shape={tuple(segment_ids.shape)} must be (batch, seq) = "
                       f"{(batch, seq)}")
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
      raise ValueError(f"segment_ids.dtype={segment_ids.dtype} must be an integer type")
  check_scalars(softmax_scale=softmax_scale)
  if kind == "moba":
    if not isinstance(block_size, int) or block_size <= 0:
      raise ValueError(f"block_size={block_size!r} must be an integer >= 1")
    if not isinstance(topk, int) or topk <= 0:
      raise ValueError(f"topk={topk!r} must be an integer >= 1 (it counts the current block)")


def attention(q, k, v, *, kind="full", implementation="auto", segment_ids=None,
              block_size=None, topk=None, softmax_scale=None, interpret=False,
              options: KernelOptions | None = None):
  """Causal self-attention. q [B, T, H, D]; k, v [B, T, K, D]; segment_ids [B, T] ints, or None
  for one document per row (the same result as zeros; the MoBA kernels then know it when tracing
  and skip the branches that zeros, being data, need).

  kind="moba" needs block_size and topk; kind="full" ignores them. options: for the kernels
  (`interpret=True` is short for KernelOptions(interpret=True)). Returns [B, T, H, D].
  """
  block_size, topk, softmax_scale = check_scalars(block_size, topk, softmax_scale)
  validate(q, k, v, segment_ids, kind=kind, block_size=block_size, topk=topk,
           softmax_scale=softmax_scale)
  batch, seq, heads, _ = q.shape
  if batch == 0 or seq == 0:  # nothing to attend: an empty result of the right shape
    return jnp.zeros(q.shape, q.dtype)
  from moba_jax import sharding  # the active mesh and rules; imports nothing of this module

  options = options or KernelOptions(interpret=interpret)
  seq_axes = sharding.sequence_axes(seq)
  if seq_axes:
    return _context_parallel(q, k, v, segment_ids, kind=kind, seq_axes=seq_axes,
                             implementation=resolve_context_parallel(kind, implementation),
                             options=options, block_size=block_size, topk=topk,
                             softmax_scale=softmax_scale)
  name = resolve(kind, implementation, dtype=q.dtype, dense_bytes=4 * batch * heads * seq * seq)
  fn = _load(_registry(kind)[name])
  if segment_ids is None and kind == "full" and name == "reference":
    segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
  if kind == "full":
    return fn(q, k, v, segment_ids, softmax_scale=softmax_scale, options=options)
  return fn(q, k, v, segment_ids, block_size=block_size, topk=topk, softmax_scale=softmax_scale,
            options=options)


def _context_parallel(q, k, v, segment_ids, *, kind, seq_axes, implementation, options, **kw):
  """`attention` with the sequence split over `seq_axes` of the active mesh; implementation
  resolved (`resolve_context_parallel`)."""
  from flax.core import spmd

  from moba_jax import context_parallel as cp
  from moba_jax import sharding

  mesh = jax.sharding.get_abstract_mesh()
  rules = spmd.get_logical_axis_rules() or sharding.LOGICAL_AXIS_RULES
  batch_axes, head_axes = cp.rule_axes(q.shape, k.shape, mesh, rules, seq_axes)
  if kind == "full":
    kw = {"softmax_scale": kw["softmax_scale"]}
  else:
    kw.update(implementation=implementation, options=options)
  return cp.context_parallel_attention(q, k, v, segment_ids, kind=kind, mesh=mesh,
                                       seq_axes=seq_axes, batch_axes=batch_axes,
                                       head_axes=head_axes, **kw)


def moba_attention(q, k, v, *, block_size, topk, segment_ids=None, softmax_scale=None,
                   implementation="auto", interpret=False, options=None):
  """Causal MoBA attention (docs/semantics.md). See `attention`."""
  return attention(q, k, v, kind="moba", implementation=implementation,
                   segment_ids=segment_ids, block_size=block_size, topk=topk,
                   softmax_scale=softmax_scale, interpret=interpret, options=options)


def full_attention(q, k, v, *, segment_ids=None, softmax_scale=None, implementation="auto",
                   interpret=False, options=None):
  """Causal full attention with the same segment_ids semantics as MoBA. See `attention`."""
  return attention(q, k, v, kind="full", implementation=implementation,
                   segment_ids=segment_ids, softmax_scale=softmax_scale, interpret=interpret,
                   options=options)


def _doc_mask(segment_ids):
  """[B, 1, T, T] bool: same document (maximal run of equal ids); causality added by the op."""
  doc_start = _moba.doc_layout(segment_ids, 1).doc_start
  return (doc_start[:, :, None] == doc_start[:, None, :])[:, None]


def _full_dot_product(q, k, v, segment_ids, *, softmax_scale, implementation):
  mask = None if segment_ids is None else _doc_mask(segment_ids)
  # float32 inputs get true float32 products, as in MoBA (GPUs default to TF32: 4e-4 off).
  precision = "highest" if q.dtype == jnp.float32 else None
  with jax.default_matmul_precision(precision):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, scale=softmax_scale,
                                        implementation=implementation)


def _full_reference(q, k, v, segment_ids, *, softmax_scale, options=None):
  return _moba.full_reference(q, k, v, segment_ids, softmax_scale=softmax_scale)


def _full_dot_product_xla(q, k, v, segment_ids, *, softmax_scale, options=None):
  return _full_dot_product(q, k, v, segment_ids, softmax_scale=softmax_scale,
                           implementation="xla")


def _full_dot_product_cudnn(q, k, v, segment_ids, *, softmax_scale, options=None):
  return _full_dot_product(q, k, v, segment_ids, softmax_scale=softmax_scale,
                           implementation="cudnn")
