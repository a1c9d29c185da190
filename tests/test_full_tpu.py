"""Full attention on TPU: JAX's splash attention kernel (kernels/full_tpu.py) behind "splash".

In interpret mode on the CPU its outputs and gradients equal the oracle (moba.full_reference);
for TPU it lowers through Mosaic's lowering rules (nothing compiles or runs: docs/tpu.md).
"""

import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import pytest

from moba_jax import attention
from moba_jax import moba as M
from moba_jax.kernels import moba_tpu
from tests import helpers

SKIP = pytest.mark.skipif(helpers.COMPILED and jax.default_backend() != "tpu",
                          reason="splash compiles for tpu only")


@SKIP
def test_splash_matches_full_reference():
  """Ragged T=200 (padded to 256, 128 tiles: several causal blocks), GQA 4:2, head_dim 32
  (padded to 128 lanes); three packed documents, two with the same id (maximal runs are
  documents)."""
  q, k, v = helpers.random_qkv(0, 1, 200, 4, 2, 32)
  seg = jnp.asarray([[0] * 50 + [1] * 70 + [0] * 80], jnp.int32)
  opts = attention.KernelOptions(interpret=not helpers.COMPILED, tiles=(128, 128))
  splash = lambda q, k, v: attention.full_attention(q, k, v, segment_ids=seg,
                                                    implementation="splash", options=opts)
  cot = jax.random.normal(jax.random.key(1), q.shape)
  vjp = lambda fn: jax.jit(lambda *args: helpers.vjp_all(fn, *args))(q, k, v, cot)
  got, want = vjp(splash), vjp(lambda q, k, v: M.full_reference(q, k, v, seg))
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    assert a.shape == b.shape and a.dtype == b.dtype, name
    assert helpers.rel_err(a, b) < 1e-5, (name, helpers.rel_err(a, b))


def test_a_models_full_layers_pass_interpret_to_the_full_kernel(monkeypatch):
  """moba.interpret reaches a model's full-attention implementation (as it reaches the MoBA one),
  so splash can run interpreted inside a model; the spy computes with the reference."""
  from flax import nnx

  from moba_jax.config import MobaConfig
  from moba_jax.model import Attention
  from tests.test_model import CFG
  seen = []

  def spy(q, k, v, segment_ids, *, softmax_scale, options):
    seen.append(options.interpret)
    return M.full_reference(q, k, v, segment_ids, softmax_scale=softmax_scale)
  monkeypatch.setitem(attention._FULL_IMPLS, "splash", spy)
  moba = MobaConfig(full_implementation="splash", interpret=True)
  layer = Attention(CFG, "full", moba, rngs=nnx.Rngs(0))
  q, k, v = helpers.random_qkv(0, 1, 16, CFG.n_heads, CFG.n_kv_heads, CFG.head_dim)
  seg = jnp.zeros((1, 16), jnp.int32)
  jax.jit(layer.attend).trace(q, k, v, seg)  # tracing is enough: what the layer asks for
  assert seen == [True]


def test_auto_prefers_splash_on_tpu_and_falls_back(monkeypatch):
  assert attention.resolve("full", "auto", platform="tpu", dtype=jnp.bfloat16) == "splash"
  assert "splash" in attention.implementations("full")
  monkeypatch.setitem(attention._FULL_IMPLS, "splash", "moba_jax.kernels.no_such_module:f")
  monkeypatch.setattr(attention, "_WARNED", set())
  with pytest.warns(RuntimeWarning, match="full implementation 'splash' is not available"):
    assert attention.resolve("full", "auto", platform="tpu") == "xla"


@pytest.mark.parametrize("tiles, msg", [((100,), "block_q=100"), ((128, 64), "block_kv=64"),
                                        ((128, 128, 128), "more than")])
def test_bad_tiles_name_the_value(tiles, msg):
  q, k, v = (jnp.zeros(s.shape, s.dtype) for s in _specs(1, 256, 2, 1, 64, jnp.float32)[:3])
  opts = attention.KernelOptions(interpret=True, tiles=tiles)
  with pytest.raises(ValueError, match=msg):
    jax.eval_shape(lambda q, k, v: attention.full_attention(q, k, v, implementation="splash",
                                                            options=opts), q, k, v)


def _specs(batch, seq, heads, kv_heads, dim, dtype):
  s = jax.ShapeDtypeStruct
  return (s((batch, seq, heads, dim), dtype), s((batch, seq, kv_heads, dim), dtype),
          s((batch, seq, kv_heads, dim), dtype), s((batch, seq), jnp.int32))


KERNELS = ["splash_mha_dkv_segmented_no_residuals", "splash_mha_dq_segmented_no_residuals",
           "splash_mha_fwd_segmented_residuals"]


@pytest.mark.parametrize("shape, dtype", [
    pytest.param((1, 8192, 16, 16, 128), jnp.bfloat16, id="bench_8k_bf16"),
    pytest.param((2, 1000, 8, 2, 64), jnp.float32, id="ragged_gqa_f32"),
    pytest.param((1, 32768, 16, 16, 128), jnp.bfloat16, id="32k_bf16", marks=pytest.mark.slow),
])
def test_splash_lowers_for_tpu(shape, dtype):
  """Forward and backward through `attention` (auto resolves to splash for TPU), blocks checked
  against Mosaic's tiling rule, lowered for TPU: three Mosaic custom calls, and no [T, T] array
  (of the sequence or its padded length) anywhere in the program."""
  def loss(q, k, v, seg):
    name = attention.resolve("full", "auto", platform="tpu")
    out = attention.full_attention(q, k, v, segment_ids=seg, implementation=name)
    return out.astype(jnp.float32).sum()

  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the kernel imports: no fallback warning
    traced = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*_specs(*shape, dtype))
  assert sorted(moba_tpu.check_tiles(traced.jaxpr)) == KERNELS
  text = traced.lower(lowering_platforms=("tpu",)).as_text()
  assert text.count("@tpu_custom_call") == len(KERNELS)
  for name in KERNELS:
    assert name in text
  seq = shape[1]
  for n in {seq, -(-seq // 512) * 512}:
    assert f"{n}x{n}" not in text


SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from moba_jax import attention, moba
mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
rules = (("batch", ("data",)), ("heads", ("tensor",)), ("kv_heads", ("tensor",)))
opts = attention.KernelOptions(interpret=True)
splash = lambda q, k, v, s: attention.full_attention(q, k, v, segment_ids=s,
                                                     implementation="splash", options=opts)
ref = lambda q, k, v, s: moba.full_reference(q, k, v, s)
keys = jax.random.split(jax.random.key(0), 4)
q = jax.random.normal(keys[0], (2, 160, 4, 32))
k, v = (jax.random.normal(x, (2, 160, 2, 32)) for x in keys[1:3])
w = jax.random.normal(keys[3], q.shape)
seg = jnp.asarray([[0] * 60 + [1] * 100, [5] * 160], jnp.int32)
def grads(attn):
  return jax.jit(jax.value_and_grad(lambda q, k, v, s: (attn(q, k, v, s) * w).sum(), (0, 1, 2)))
with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
  got = grads(splash)(q, k, v, seg)
  assert grads(splash).lower(q, k, v, seg).as_text().count("manual_computation") == 2
want = grads(ref)(q, k, v, seg)
for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
print("ok")
"""


@pytest.mark.slow
def test_splash_runs_per_mesh_shard():
  """On 4 fake devices (batch over data, GQA heads over tensor with their kv heads), splash runs
  per shard (`_routing.over_mesh_shards`) and gives the unsharded oracle's value and gradients."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
