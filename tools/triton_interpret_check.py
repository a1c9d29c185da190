"""Check the jax-triton forward kernel (`moba_triton._fwd`) against the Pallas one on a CPU.

Neither CI nor the default install has Triton, so this is a developer's script, not a test:

  python -m venv /tmp/tenv && /tmp/tenv/bin/pip install triton numpy jax && \
    /tmp/tenv/bin/pip install --no-deps -e .
  /tmp/tenv/bin/python tools/triton_interpret_check.py

It routes a small GQA problem with two packed documents (ragged tails), runs the Pallas forward
kernel in interpret mode, then runs the Triton kernel in Triton's own interpreter
(TRITON_INTERPRET=1) on the same routing, numpy arrays standing in for torch tensors, and prints
the largest differences of the partial rows and log-sum-exps for two key tiles. Exits 1 if they
differ by more than 1e-5.
"""

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import triton.runtime.interpreter as ti  # noqa: E402

from moba_jax.kernels import _routing as rt  # noqa: E402
from moba_jax.kernels import moba_gpu as mg  # noqa: E402
from moba_jax.kernels import moba_triton as mt  # noqa: E402


class _Array:
  """A numpy array as Triton's interpreter sees a tensor: a raw pointer and a dtype name."""

  class _Dtype:
    def __init__(self, name):
      self.name = name

    def __str__(self):
      return "torch." + self.name

  def __init__(self, a):
    self.a = np.ascontiguousarray(np.asarray(a))
    self.dtype = self._Dtype(str(self.a.dtype))

  def data_ptr(self):
    return self.a.ctypes.data


# The interpreter copies torch tensors to and from the host; numpy arrays already are there.
ti.GridExecutor._init_args_hst = lambda self, args, kwargs: (args, kwargs)
ti.GridExecutor._restore_args_dev = lambda self, *a: None
# Triton 3.6's interpreter calls int() on 1-element arrays (loaded scalars), which numpy >= 2.3
# refuses; take the element instead.
_patch_tensor = ti._patch_lang_tensor


def _patch_lang_tensor(tensor, scope):
  _patch_tensor(tensor, scope)
  scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).ravel()[0]))


ti._patch_lang_tensor = _patch_lang_tensor


def main() -> int:
  b, t, h, kh, d, blk, topk = 1, 300, 4, 2, 32, 32, 3
  keys = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(keys[0], (b, t, h, d), jnp.float32)
  k = jax.random.normal(keys[1], (b, t, kh, d), jnp.float32)
  v = jax.random.normal(keys[2], (b, t, kh, d), jnp.float32)
  seg = jnp.asarray(np.r_[np.zeros(170), np.ones(130)].astype(np.int32))[None]
  sizes = mg.BlockSizes(block_q=16, block_k=16, block_q_dkv=16, block_k_dkv=16)
  routing, dims = rt.route(q, k, seg, block_size=blk, topk=topk, block_q=sizes.block_q)
  scale = d ** -0.5
  o_p, l_p = mg.forward_rows(routing, dims, *(mg.flat_rows(x, d) for x in (q, k, v)), sizes, scale,
                             True)
  qr, kr, vr = mt.prep(q, k, v)
  o_p, l_p = np.asarray(o_p), np.asarray(l_p)
  # rows routed to a query: the Pallas kernel skips the mask on whole chunks, so padding rows
  # (never read) hold garbage there while the Triton kernel leaves them empty
  live = (np.asarray(routing.rq) >= 0) & np.isfinite(l_p)
  worst = 0.0
  for tile in (16, 32):
    o_t = _Array(np.zeros(o_p.shape, np.float32))
    l_t = _Array(np.zeros(l_p.shape, np.float32))
    ins = [_Array(x) for x in (routing.tile_ks, routing.tile_ke, routing.rq, routing.lo,
                               routing.hi, qr, kr, vr)]
    mt.kernel(False)[(dims.tiles, qr.shape[0])](
        *ins, dims.tiles, dims.rows, qr.shape[1], kr.shape[1], scale, o_t, l_t,
        BQ=dims.block_q, D=qr.shape[-1], BK=tile, IEEE=True)
    do = float(np.abs(o_t.a - o_p)[live].max())
    dl = float(np.abs(l_t.a[live] - l_p[live]).max())
    same = bool(np.isfinite(l_t.a)[live].all())
    print(f"key tile {tile}: max |o diff| {do:.2e}, max |lse diff| {dl:.2e}, "
          f"routed rows all non-empty: {same}")
    worst = max(worst, do, dl, 0.0 if same else np.inf)
  return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
  sys.exit(main())
