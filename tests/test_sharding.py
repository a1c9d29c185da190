"""Sharding: logical rules, mesh shapes, the context axis's config checks, and 8 fake devices
(fsdp x context = 2 x 4) training equal to 1 device."""

import functools
import json
import os
import subprocess
import sys
import tempfile

import jax
import pytest
from jax.sharding import PartitionSpec as P

from moba_jax import config as C
from moba_jax import sharding as S
from moba_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["model.n_layers=2", "model.d_model=64", "model.mlp_dim=128", "model.n_heads=4",
        "model.n_kv_heads=2", "model.head_dim=16", "train.steps=3", "train.batch_size=8",
        "train.seq_len=128", "moba.block_size=32", "log.every=1", "eval.batches=0",
        "data.prefetch=0", "checkpoint.async_save=false", "eval.trailing_tokens=32"]


class FakeMesh:
  shape = {"data": 2, "fsdp": 2, "context": 1, "tensor": 2}


def test_logical_to_spec_rules():
  rules = C.MeshConfig().rules.as_tuples()
  assert S.logical_to_spec(("embed", "mlp"), rules) == P(("fsdp", "context"), "tensor")
  # activation embed after batch and length: fsdp and context are used, so embed is replicated
  assert S.logical_to_spec(("batch", "length", "embed"), rules) == \
      P(("data", "fsdp"), "context", None)
  # axes of size 1 drop out (mesh.context = 1: nothing is split along the sequence)
  assert S.logical_to_spec(("batch", "length", "embed"), rules, (8, 64, 32), FakeMesh()) == \
      P(("data", "fsdp"), None, None)
  # a dimension the mesh axes do not divide stays replicated
  assert S.logical_to_spec(("embed", "kv_heads", "head_dim"), rules, (64, 1, 16), FakeMesh()) == \
      P("fsdp", None, None)
  assert S.logical_to_spec((None, "vocab"), rules) == P(None, "tensor")


def test_undivided_names_each_replicated_axis_once():
  """mesh.tensor=4 against 4 query heads (split) and 2 kv heads (not: replicated over tensor in
  the k and v projections of both layers), vocab 256 (split); an fsdp of 3 divides no embed."""
  from flax import nnx

  from moba_jax.model import Decoder

  cfg = C.load_config(None, TINY)
  params = nnx.state(nnx.eval_shape(lambda: Decoder(cfg.model, cfg.moba, rngs=nnx.Rngs(0))),
                     nnx.Param)

  class Mesh:
    shape = {"data": 1, "fsdp": 1, "context": 1, "tensor": 4}

  rules = C.MeshConfig().rules.as_tuples()
  assert S.undivided(params, Mesh(), rules) == [
      "kv_heads (2) is not divisible by mesh.tensor=4: replicated over tensor in 4 parameters"]
  Mesh.shape = {"data": 1, "fsdp": 1, "context": 1, "tensor": 2}
  assert S.undivided(params, Mesh(), rules) == []
  Mesh.shape = {"data": 1, "fsdp": 3, "context": 1, "tensor": 1}
  assert [line.split(":")[0] for line in S.undivided(params, Mesh(), rules)] == [
      "embed (64) is not divisible by mesh.fsdp=3"]
  # fsdp=3 divides no embed (64), but another dimension may take the axis: with mlp -> fsdp and
  # mlp_dim 192 the MLP's matrices are split after all
  cfg192 = C.load_config(None, [*TINY, "model.mlp_dim=192"])
  params192 = nnx.state(nnx.eval_shape(lambda: Decoder(cfg192.model, cfg192.moba,
                                                       rngs=nnx.Rngs(0))), nnx.Param)
  rules_mlp = C.load_config(None, ['mesh.rules.mlp=["fsdp"]']).mesh.rules.as_tuples()
  counts = [int(line.rsplit(" in ", 1)[1].split()[0])
            for line in S.undivided(params192, Mesh(), rules_mlp)]
  full = [int(line.rsplit(" in ", 1)[1].split()[0]) for line in S.undivided(params192, Mesh(),
                                                                             rules)]
  # 16 = embed's table and head, and 7 matrices a layer; w_gate, w_up, w_down of both layers are
  # split over fsdp on mlp (w_down's embed then skips fsdp as already used, not undivided)
  assert full == [16] and counts == [10]
  # embed -> (fsdp, context): 2 x 3 does not divide 64, fsdp alone does: context is dropped
  Mesh.shape = {"data": 1, "fsdp": 2, "context": 3, "tensor": 1}
  lines = S.undivided(params, Mesh(), rules)
  assert len(lines) == 1 and lines[0].startswith(
      "embed (64) is not divisible by mesh.fsdp=2 x mesh.context=3: replicated over context in ")


def test_mesh_shape_checks():
  assert S.mesh_shape(C.MeshConfig(), 8) == (8, 1, 1, 1)
  assert S.mesh_shape(C.MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 1, 2)
  assert S.mesh_shape(C.MeshConfig(data=2, context=-1), 8) == (2, 1, 4, 1)
  with pytest.raises(ValueError, match="must equal the device count 1"):
    S.mesh_shape(C.MeshConfig(data=2, fsdp=2, tensor=2), 1)
  mesh = S.make_mesh(C.MeshConfig())
  assert mesh.axis_names == S.MESH_AXES and mesh.devices.size == jax.device_count()


def test_context_config_errors():
  def check(*overrides):
    return train.validate(C.load_config(None, list(overrides)))

  with pytest.raises(ValueError, match=r"mesh.context=0 must be an integer >= 1 or -1"):
    check("mesh.context=0")
  with pytest.raises(ValueError, match="train.seq_len=100 must be divisible by mesh.context=8"):
    check("mesh.context=8", "train.seq_len=100", "eval.trailing_tokens=16")
  with pytest.raises(ValueError, match=r"moba implementation='reference' \(moba.implementation\) "
                     "cannot run context parallel"):
    check("mesh.context=2", "moba.implementation=reference")
  check("mesh.context=2", "moba.implementation=pallas_tpu")  # the kernels take a query offset
  with pytest.raises(ValueError, match=r"full implementation='cudnn'"):
    check("mesh.context=2", "moba.hybrid_full_layers=1", "moba.full_implementation=cudnn")
  check("mesh.context=2", "moba.full_implementation=cudnn")  # no full layer: not used
  assert S.sequence_axes(100) == ()  # no mesh set: nothing is split


def test_shard_is_a_noop_without_mesh():
  x = jax.numpy.ones((2, 3))
  assert S.shard(x, ("batch", "embed")) is x


@functools.cache
def run_helper(devices, *overrides):
  """Losses and summary of a tiny run on `devices` fake CPU devices (cached per session)."""
  run_dir = tempfile.mkdtemp(prefix="moba_jax_test_")
  cmd = [sys.executable, os.path.join(ROOT, "tests", "train_helper.py"), str(devices),
         f"run_dir={run_dir}", *TINY, *overrides]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_eight_fake_devices_match_one():
  """fsdp x context = 2 x 4: parameters split over 8 devices, each device holding 32 of the 128
  positions of a row of packed examples (attention context parallel); the losses are the
  1-device run's. (data x fsdp x tensor = 2 x 2 x 2 trains in tests/test_multiprocess.py, and the
  model's gradients under data x context x tensor meshes are tests/test_context_parallel.py's.)"""
  one = run_helper(1)
  eight = run_helper(8, "mesh.data=1", "mesh.fsdp=2", "mesh.context=4")
  assert one["devices"] == 1 and eight["devices"] == 8
  assert len(one["losses"]) == 3 and eight["summary"]["status"] == "done"
  for a, b in zip(one["losses"], eight["losses"]):
    assert abs(a - b) <= 1e-5 * abs(a)


def test_a_run_resumed_on_another_mesh_says_so(tmp_path):
  """Stopped on fsdp=2, resumed on data=2 (2 fake devices): the arrays reshard, the run goes on,
  and the log names both meshes (bit-equality holds on one mesh only)."""
  run_dir = tmp_path / "run"
  helper = [sys.executable, os.path.join(ROOT, "tests", "train_helper.py"), "2",
            f"run_dir={run_dir}", *TINY]
  first = subprocess.run(helper + ["mesh.data=1", "mesh.fsdp=2", "train.stop_after=1"],
                         capture_output=True, text=True, timeout=240, cwd=ROOT)
  assert first.returncode == 0, first.stderr[-3000:]
  second = subprocess.run(helper + ["mesh.data=2", "mesh.fsdp=1"], capture_output=True,
                          text=True, timeout=240, cwd=ROOT)
  assert second.returncode == 0, second.stderr[-3000:]
  assert json.loads(second.stdout.strip().splitlines()[-1])["summary"]["step"] == 3
  assert ("note: step 1 was saved on mesh {'data': 1, 'fsdp': 2, 'context': 1, 'tensor': 1}; it "
          "continues on {'data': 2, 'fsdp': 1, 'context': 1, 'tensor': 1}") in second.stderr
