"""The dispatcher: implementation names, "auto", and errors raised before anything compiles."""

import jax
import jax.numpy as jnp
import pytest

import moba_jax
import moba_jax.attention as attn


def shapes(batch=1, seq=32, heads=4, kv_heads=2, dim=8):
  q = jax.ShapeDtypeStruct((batch, seq, heads, dim), jnp.float32)
  kv = jax.ShapeDtypeStruct((batch, seq, kv_heads, dim), jnp.float32)
  return q, kv, kv


def test_auto_resolves_by_platform():
  assert attn.resolve("moba", "auto", platform="cpu") == "xla"
  assert attn.resolve("full", "auto", platform="cpu") == "xla"
  # Off GPU/TPU, short sequences take the dense path (faster there), long ones the linear one.
  assert attn.resolve("moba", "auto", platform="cpu", dense_bytes=2**20) == "reference"
  assert attn.resolve("moba", "auto", platform="cpu", dense_bytes=2**40) == "xla"
  assert attn.resolve("full", "auto", platform="gpu", dtype=jnp.float32) == "xla"
  assert attn.resolve("full", "auto", platform="gpu", dtype=jnp.bfloat16) == "cudnn"
  assert attn.resolve("moba", "reference") == "reference"
  assert "cudnn" in attn.implementations("full")
  assert {"reference", "xla", "pallas_gpu", "pallas_tpu"} <= set(attn.implementations("moba"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_size=0, topk=2), "block_size=0 must be an integer >= 1"),
    (dict(block_size=-3, topk=2), "block_size=-3"),
    (dict(block_size=16, topk=0), "topk=0 must be an integer >= 1"),
    (dict(block_size=16, topk=2, implementation="triton"), r"implementation='triton'.*'xla'"),
    (dict(block_size=16, topk=2, softmax_scale=-1.0), "softmax_scale=-1.0"),
])
def test_bad_arguments_name_the_value_and_the_range(kwargs, match):
  q, k, v = (jnp.zeros(s.shape, s.dtype) for s in shapes())
  with pytest.raises(ValueError, match=match):
    moba_jax.moba_attention(q, k, v, **kwargs)


def test_bad_shapes_are_reported_before_tracing():
  q, k, v = (jnp.zeros(s.shape, s.dtype) for s in shapes(heads=4, kv_heads=3))
  with pytest.raises(ValueError, match="heads=4 must be divisible by kv_heads=3"):
    moba_jax.moba_attention(q, k, v, block_size=8, topk=2)
  q, k, v = (jnp.zeros(s.shape, s.dtype) for s in shapes())
  with pytest.raises(ValueError, match="head_dim mismatch: q has 8, k/v have 4"):
    moba_jax.moba_attention(q, k[..., :4], v[..., :4], block_size=8, topk=2)
  with pytest.raises(ValueError, match=r"segment_ids.shape=\(1, 31\) must be"):
    moba_jax.moba_attention(q, k, v, block_size=8, topk=2,
                            segment_ids=jnp.zeros((1, 31), jnp.int32))
  with pytest.raises(ValueError, match="kind='sparse'"):
    attn.attention(q, k, v, kind="sparse")
  with pytest.raises(ValueError, match="implementation='flash'.*'cudnn'"):
    moba_jax.full_attention(q, k, v, implementation="flash")


def test_validation_happens_before_compilation():
  # Under jit the error is raised while tracing, from static shapes: nothing compiles.
  fn = jax.jit(lambda q, k, v: moba_jax.moba_attention(q, k, v, block_size=0, topk=2))
  with pytest.raises(ValueError, match="block_size=0"):
    fn.trace(*shapes())


def test_xla_path_under_jit_matches_reference():
  q, k, v = (jax.random.normal(jax.random.key(i), s.shape) for i, s in enumerate(shapes()))
  out = jax.jit(lambda q, k, v: moba_jax.moba_attention(q, k, v, block_size=8, topk=2,
                                                        implementation="xla"))(q, k, v)
  ref = moba_jax.moba_attention(q, k, v, block_size=8, topk=2, implementation="reference")
  assert jnp.allclose(out, ref, atol=1e-5)
