"""The MoBA forward kernel written in Triton and called through jax-triton (issue 5, item 6).

This is the side-by-side for `moba_gpu._fwd_kernel`: the same program (one row tile of the
key-block-major routing layout, gathered query rows, one streamed key range, online softmax,
float32 partial rows + log-sum-exp) written as a raw Triton kernel, launched with
`jax_triton.triton_call`, with Triton's autotuner choosing the key tile, warps and stages on the
first call for each shape, which Pallas cannot do. Inputs are exactly those of the Pallas
forward kernel, so the two can be timed and compared on one routing (`moba-jax bench
--breakdown` does both when jax-triton is installed); its rows stay float32 where the Pallas
kernel's are in the inputs' dtype since 2026-12-02 (run 17), so for 16-bit inputs the two differ
by that rounding and in bytes written.

Not on the default path: the package's GPU attention uses the Pallas kernels (one way to do each
thing); this module exists to measure whether jax-triton serves the GPU path
(docs/kernel_notes.md, section jax-triton, has the numbers). Needs the `gpu` extra (jax-triton,
Triton) and an NVIDIA GPU; importing this module needs neither.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from moba_jax.kernels import _routing as rt

KEY_TILES = (32, 64, 128)  # autotuned key tiles; k/v are padded by the largest
WARPS = (4, 8)
STAGES = (2, 3)  # 4 stages of 128-key bf16 tiles would pass the H200's 227 KiB of shared memory


try:  # the `gpu` extra; without it the module imports and `available()` is False
  import triton
  import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
  triton = tl = None


def available() -> bool:
  """True when jax-triton and Triton import and the default backend is a GPU."""
  try:
    import jax_triton  # noqa: F401
  except ImportError:
    return False
  return triton is not None and jax.default_backend() == "gpu"


if triton is not None:
  @triton.jit
  def _fwd(ks_ptr, ke_ptr, rq_ptr, lo_ptr, hi_ptr, q_ptr, k_ptr, v_ptr,
           n_tiles, n_rows, q_len, k_len, scale,
           o_ptr, lse_ptr,  # jax-triton passes the outputs after every input, scalars included
           BQ: tl.constexpr, D: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr):
    i = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # offsets of large layouts pass 2**31
    ks = tl.load(ks_ptr + b * n_tiles + i)
    ke = tl.load(ke_ptr + b * n_tiles + i)
    r = i * BQ + tl.arange(0, BQ)
    rq = tl.load(rq_ptr + b * n_rows + r)
    lo = tl.load(lo_ptr + b * n_rows + r)
    hi = tl.load(hi_ptr + b * n_rows + r)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * q_len * D + tl.maximum(rq, 0)[:, None] * D + d[None, :])  # [BQ, D]
    m = tl.full((BQ,), -1e30, tl.float32)
    l = tl.full((BQ,), 0.0, tl.float32)
    acc = tl.full((BQ, D), 0.0, tl.float32)
    for start in range(ks, ke, BK):
      kp = start + tl.arange(0, BK)
      kv = b * k_len * D + kp[:, None] * D + d[None, :]
      k = tl.load(k_ptr + kv)  # [BK, D]; k/v padded by max(KEY_TILES) keys: no bounds checks
      v = tl.load(v_ptr + kv)
      if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
      else:
        s = tl.dot(q, tl.trans(k))
      mask = (kp[None, :] >= lo[:, None]) & (kp[None, :] < hi[:, None])
      s = tl.where(mask, s * scale, -1e30)
      m_new = tl.maximum(m, tl.max(s, 1))
      p = tl.where(mask, tl.exp(s - m_new[:, None]), 0.0)
      alpha = tl.exp(m - m_new)
      if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
      else:
        pv = tl.dot(p.to(v.dtype), v)
      acc = acc * alpha[:, None] + pv
      l = l * alpha + tl.sum(p, 1)
      m = m_new
    ok = l > 0
    l_safe = tl.where(ok, l, 1.0)
    tl.store(o_ptr + b * n_rows * D + r[:, None].to(tl.int64) * D + d[None, :],
             acc / l_safe[:, None])
    tl.store(lse_ptr + b * n_rows + r, tl.where(ok, m + tl.log(l_safe), float("-inf")))


@functools.cache
def kernel(autotune: bool = True):
  """The Triton forward kernel; with `autotune`, wrapped in `triton.autotune` over
  KEY_TILES x WARPS x STAGES (keyed on the problem sizes)."""
  if triton is None:
    raise ImportError("the jax-triton forward needs Triton: pip install -e '.[gpu]'")
  if not autotune:
    return _fwd
  configs = [triton.Config({"BK": bk}, num_warps=w, num_stages=s)
             for bk in KEY_TILES for w in WARPS for s in STAGES]
  return triton.autotune(configs, key=["n_tiles", "n_rows", "q_len", "k_len"])(_fwd)


def forward_rows(routing: rt.Routing, dims: rt.Dims, qr, kr, vr, scale: float,
                 *, autotune: bool = True, **fixed):
  """Partial rows of the forward, as the Pallas `_fwd_kernel` computes them.

  qr [BK, TG, Dp]; kr, vr [BK, T + pad, Dp] with pad >= max(KEY_TILES) (`pad_kv`);
  returns o_rows [BK, R, Dp] float32 and lse_rows [BK, R] float32. `fixed` pins metaparameters
  (BK, num_warps, num_stages) instead of autotuning them.
  """
  n_bk, q_len, dim = qr.shape
  if kr.shape[1] < dims.seq + max(KEY_TILES):
    raise ValueError(f"k/v rows {kr.shape[1]} must be >= seq + {max(KEY_TILES)} "
                     f"= {dims.seq + max(KEY_TILES)} (pad them with pad_kv)")
  import jax_triton as jt
  out_shape = [jax.ShapeDtypeStruct((n_bk, dims.rows, dim), jnp.float32),
               jax.ShapeDtypeStruct((n_bk, dims.rows), jnp.float32)]
  return jt.triton_call(
      routing.tile_ks, routing.tile_ke, routing.rq, routing.lo, routing.hi, qr, kr, vr,
      dims.tiles, dims.rows, q_len, kr.shape[1], np.float32(scale),  # a float would be fp64
      kernel=kernel(autotune and not fixed), out_shape=out_shape, grid=(dims.tiles, n_bk),
      BQ=dims.block_q, D=dim, IEEE=qr.dtype == jnp.float32, **fixed)


def prep(q, k, v):
  """[B, T, H, D] / [B, T, K, D] -> this kernel's heads-major rows: qr [BK, TG, Dp], kr and vr
  [BK, T + max(KEY_TILES), Dp] (the Pallas kernel reads the caller's layout instead)."""
  kv_heads, dim = k.shape[2], q.shape[-1]
  dp = max(16, 1 << (dim - 1).bit_length())
  padd = lambda x: jnp.pad(rt.heads_major(x, kv_heads), ((0, 0), (0, 0), (0, dp - dim)))
  return padd(q), pad_kv(padd(k), q.shape[1]), pad_kv(padd(v), q.shape[1])


def pad_kv(x, seq):
  """[BK, T + p, Dp] -> [BK, T + max(KEY_TILES), Dp] (the Pallas layout pads by its own tile)."""
  extra = seq + max(KEY_TILES) - x.shape[1]
  return jnp.pad(x, ((0, 0), (0, max(extra, 0)), (0, 0)))

