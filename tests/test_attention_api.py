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


@pytest.mark.parametrize("dtypes, match", [
    ((jnp.int32,) * 3, "q.dtype=int32 must be a floating type"),
    ((jnp.bfloat16, jnp.float32, jnp.float32), "dtypes must match: got q bfloat16, k float32"),
])
@pytest.mark.parametrize("kind", ["moba", "full"])
def test_dtypes_are_checked_for_both_kinds(dtypes, match, kind):
  q, k, v = (jnp.ones(s.shape, d) for s, d in zip(shapes(), dtypes))
  with pytest.raises(ValueError, match=match):
    attn.attention(q, k, v, kind=kind, block_size=8, topk=2)


@pytest.mark.parametrize("scale", [float("inf"), float("nan"), 0.0, -0.5])
def test_softmax_scale_must_be_finite_and_positive(scale):
  q, k, v = (jnp.ones(s.shape, s.dtype) for s in shapes())
  with pytest.raises(ValueError, match="must be a finite number > 0"):
    moba_jax.moba_attention(q, k, v, block_size=8, topk=2, softmax_scale=scale)
  with pytest.raises(ValueError, match="must be a finite number > 0"):
    moba_jax.full_attention(q, k, v, softmax_scale=scale)


def test_numpy_and_jax_scalars_are_accepted_and_a_traced_scale_is_named():
  import numpy as np
  q, k, v = (jax.random.normal(jax.random.key(i), s.shape) for i, s in enumerate(shapes()))
  ref = moba_jax.moba_attention(q, k, v, block_size=8, topk=2, softmax_scale=0.5)
  out = moba_jax.moba_attention(q, k, v, block_size=np.int64(8), topk=np.int32(2),
                                softmax_scale=jnp.float32(0.5))
  assert jnp.array_equal(out, ref)
  fn = jax.jit(lambda s: moba_jax.moba_attention(q, k, v, block_size=8, topk=2, softmax_scale=s))
  with pytest.raises(ValueError, match="softmax_scale is a traced value"):
    fn(0.5)


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("batch, seq", [(0, 32), (1, 0)])
def test_empty_batch_or_sequence_gives_an_empty_result(impl, batch, seq):
  q, k, v = (jnp.ones(s.shape, s.dtype) for s in shapes(batch=batch, seq=seq))
  out = moba_jax.moba_attention(q, k, v, block_size=8, topk=2, implementation=impl)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert moba_jax.full_attention(q, k, v).shape == q.shape


def test_a_kernel_that_does_not_import_is_said_once(monkeypatch):
  monkeypatch.setitem(attn._MOBA_IMPLS, "pallas_gpu", "moba_jax.no_such_module:fn")
  monkeypatch.setattr(attn, "_WARNED", set())
  with pytest.warns(RuntimeWarning, match="'pallas_gpu' is not available.*falls back"):
    assert attn.resolve("moba", "auto", platform="gpu") == "xla"
  import warnings
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # a second resolve says nothing more
    assert attn.resolve("moba", "auto", platform="gpu") == "xla"


def test_the_attention_plan_names_each_layers_implementation():
  from moba_jax import config as C
  from moba_jax import train
  cfg = C.load_config(None, ["model.n_layers=12", "moba.hybrid_full_layers=3",
                             "moba.implementation=xla"])
  assert train.attention_plan(cfg) == "layers 0-8: moba -> xla; layers 9-11: full -> xla"
  one = C.load_config(None, ["model.n_layers=2", "moba.hybrid_full_layers=1"])
  auto = {"cpu": "reference", "gpu": "pallas_gpu", "tpu": "pallas_tpu"}[jax.default_backend()]
  assert train.attention_plan(one) == f"layer 0: moba -> {auto}; layer 1: full -> xla"


@pytest.mark.parametrize("kind,name,interpret,platform,match", [
    ("moba", "pallas_gpu", False, "cpu", "moba.implementation='pallas_gpu' compiles for gpu and "
     "this process runs on cpu: set moba.interpret=true"),
    ("moba", "pallas_tpu", False, "gpu", "runs on gpu: set moba.interpret=true .* name one that "
     "runs here: auto, reference, xla, pallas_gpu$"),
    ("full", "cudnn", True, "tpu", "moba.full_implementation='cudnn' compiles for gpu and this "
     "process runs on tpu: name one that runs here: auto, reference, xla, splash$"),
    ("moba", "pallas_gpu", True, "cpu", None), ("full", "splash", True, "cpu", None),
    ("moba", "pallas_tpu", False, "tpu", None), ("moba", "xla", False, "cpu", None)])
def test_a_kernel_of_another_platform_is_refused_before_the_run(kind, name, interpret, platform,
                                                                match):
  """`attention.check_runs_here`: a kernel compiled for another platform runs only interpreted
  (the Pallas ones; cuDNN never); the error names the key, the fix and what runs here."""
  if match is None:
    attn.check_runs_here(kind, name, interpret, platform)
    return
  with pytest.raises(ValueError, match=match):
    attn.check_runs_here(kind, name, interpret, platform)


def test_training_refuses_a_foreign_kernel_before_building_the_model(tmp_path, monkeypatch,
                                                                    capsys):
  """`moba-jax train` with moba.implementation=pallas_gpu on a CPU without moba.interpret: one
  line naming the key, before any model is built or compiled."""
  from moba_jax import cli
  from moba_jax import train_step
  if jax.default_backend() == "gpu":
    pytest.skip("pallas_gpu runs here")
  monkeypatch.setattr(train_step, "init_state", lambda *a: pytest.fail("the model was built"))
  assert cli.main(["train", f"run_dir={tmp_path}/r", "train.steps=1",
                   "moba.implementation=pallas_gpu"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("moba-jax train: moba.implementation='pallas_gpu' compiles for gpu")
  assert err.count("\n") == 1, err

