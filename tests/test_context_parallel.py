"""Context parallelism (moba_jax/context_parallel.py), on 8 fake CPU devices in subprocesses:
  - the xla path: MoBA attention with the sequence sharded over 2, 4 and 8 devices equals the
    single-device reference, outputs and gradients, with packed documents that cross shard
    boundaries; so does full attention on 8 (its queries in several chunks);
  - a whole hybrid model (one MoBA, one full layer) through the dispatcher: loss and every
    parameter gradient under mesh (data, context, tensor) = (1, 8, 1), (2, 2, 2), (2, 4, 1)
    equal one device's;
  - the Pallas kernels, interpreted: the kernel entry with a query offset (no mesh) against the
    oracle at offsets on and off the block grid (pallas_tpu), and each kernel context parallel
    (pallas_gpu on 4 shards of 12 positions through the dispatcher, offsets off the block grid;
    pallas_tpu on 2), packed documents across the shards;
  - the errors: a sequence the axis does not divide, an implementation that cannot run context
    parallel, a query offset that does not fit.
The two subprocesses (xla path and model; kernels) run side by side: each compiles on one core.
XLA's CPU backend optimizations are off in them: compiling is half the time, and the numbers stay
float32 programs (the tolerance is the same)."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, os
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                           "--xla_backend_optimization_level=0 "
                           "--xla_llvm_disable_expensive_passes=true")
import jax
import jax.numpy as jnp
from flax import nnx
from moba_jax import attention, config as C, moba as M, sharding as S, train_step as ts
from moba_jax.context_parallel import context_parallel_attention, moba_context_parallel
from moba_jax.model import Decoder
from tests.helpers import packed_segments, random_qkv, rel_err

q, k, v = random_qkv(3, 2, 128, 4, 2, 16)
seg = packed_segments(2, (50, 45, 33))  # 16 positions a shard at 8: documents cross shards
ct = jax.random.normal(jax.random.key(9), q.shape)
kw = dict(block_size=8, topk=3)

def out_and_grads(fn):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(ct))

reference = jax.jit(out_and_grads, static_argnums=0)  # one compilation, not op by op
with jax.default_matmul_precision("highest"):
  want = reference(lambda q, k, v: M.moba_reference(q, k, v, seg, **kw))
errors = {}
for n in (2, 4, 8):
  mesh = jax.make_mesh((n,), ("context",), devices=jax.devices()[:n])
  fn = jax.jit(lambda q, k, v: moba_context_parallel(q, k, v, seg, mesh=mesh, axis="context", **kw))
  errors[n] = [float(rel_err(a, b)) for a, b in zip(out_and_grads(fn), want)]
# Full attention (a hybrid's full layers), queries in chunks of 4 (a budget of 4 queries' logits).
with jax.default_matmul_precision("highest"):
  want = reference(lambda q, k, v: M.full_reference(q, k, v, seg))
mesh = jax.make_mesh((8,), ("context",), axis_types=(jax.sharding.AxisType.Auto,))
fn = jax.jit(lambda q, k, v: context_parallel_attention(
    q, k, v, seg, kind="full", mesh=mesh, seq_axes=("context",), chunk_budget_bytes=2**17))
with jax.set_mesh(mesh):
  errors["full"] = [float(rel_err(a, b)) for a, b in zip(out_and_grads(fn), want)]
try:
  moba_context_parallel(q[:, :100], k[:, :100], v[:, :100], None, mesh=mesh, axis="context", **kw)
except ValueError as e:
  errors["message"] = str(e)

# The whole model: 2 layers (MoBA, then full), packed documents 50/45/33 over 128 positions,
# RoPE positions restarting per document.
cfg = C.load_config(None, ["model.n_layers=2", "model.d_model=32", "model.mlp_dim=64",
                           "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=8",
                           "moba.block_size=8", "moba.topk=3", "moba.hybrid_full_layers=1",
                           "train.seq_len=128", "train.batch_size=2", "eval.trailing_tokens=8"])
graph, params = nnx.split(nnx.jit(lambda: Decoder(cfg.model, cfg.moba, rngs=nnx.Rngs(0)))())
positions = jnp.arange(128)[None] - M.doc_layout(seg, 1).doc_start
tokens = jax.random.randint(jax.random.key(1), (2, 129), 0, cfg.model.vocab_size)
batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": jnp.ones((2, 128)),
         "segment_ids": seg, "positions": positions}

def loss_grads(params, batch):
  return nnx.value_and_grad(lambda m: ts.loss_fn(m, batch)[0])(nnx.merge(graph, params))

with jax.default_matmul_precision("highest"):
  want = jax.tree.leaves(jax.jit(loss_grads)(params, batch))
for data, context, tensor in ((1, 8, 1), (2, 2, 2), (2, 4, 1)):
  mesh_cfg = C.MeshConfig(data=data, context=context, tensor=tensor)
  mesh = S.make_mesh(mesh_cfg, jax.devices()[:data * context * tensor])
  rules = S.rules_from_config(mesh_cfg)
  with S.activate(mesh, rules):
    p = jax.device_put(params, S.state_shardings(params, mesh, rules))
    b = jax.device_put(batch, S.batch_sharding(mesh, rules))
    lowered = jax.jit(loss_grads).lower(p, b)
    got = jax.tree.leaves(lowered.compile()(p, b))
  hlo = lowered.as_text()
  errors[f"model {data}x{context}x{tensor}"] = {
      "loss": rel_err(got[0], want[0]), "grads": max(map(rel_err, got[1:], want[1:])),
      "shard_map": "shard_map" in hlo or "sdy.manual_computation" in hlo}
with S.activate(mesh, rules):  # raised while tracing, before anything compiles
  try:
    attention.attention(q, k, v, kind="moba", implementation="reference", block_size=8, topk=3)
  except ValueError as e:
    errors["reference message"] = str(e)
print(json.dumps(errors))
"""

KERNELS = r"""
import json, os
os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                           "--xla_backend_optimization_level=0 "
                           "--xla_llvm_disable_expensive_passes=true")
import jax
import jax.numpy as jnp
from moba_jax import attention, config as C, moba as M, sharding as S
from moba_jax.context_parallel import moba_context_parallel
from moba_jax.kernels import moba_tpu
from tests.helpers import packed_segments, random_qkv, rel_err

# 48 positions, documents 19 / 17 / 12, block 8: documents and their blocks cross the shard
# boundaries of 2 and 4 shards (12 positions a shard at 4: offsets off the block grid).
q, k, v = random_qkv(5, 1, 48, 4, 2, 16)  # one row: the TPU interpreter's time is per row
seg = packed_segments(1, (19, 17, 12))
ct = jax.random.normal(jax.random.key(7), q.shape)
kw = dict(block_size=8, topk=3)
options = {"pallas_gpu": attention.KernelOptions(interpret=True, tiles=(16, 16, 16, 16)),
           "pallas_tpu": attention.KernelOptions(interpret=True)}
@jax.jit
def reference(ct):  # the oracle's output and gradients for cotangent ct
  out, vjp = jax.vjp(lambda q, k, v: M.moba_reference(q, k, v, seg, **kw), q, k, v)
  return (out, *vjp(ct))

with jax.default_matmul_precision("highest"):
  want = reference(ct)
errors = {}

# The kernel entry, no mesh (pallas_tpu; pallas_gpu's offsets are its 4 shards below): 12
# queries at offsets 0, 21 and 36 (21 and 36 off the block grid, 36 the last 12) against the
# oracle's rows and its dK/dV for their cotangent alone. The offset is traced: one compilation
# serves every offset. Key tiles of 8: the dense dK/dV pass runs over a band of 4 of the 6 key
# tiles (those the local queries' blocks reach), which moves with the offset.
n_q = 12
band = attention.KernelOptions(interpret=True, tiles=(16, 16, 8))

@jax.jit
def local(start, q_l, ct_l):
  attend = lambda q_l, k, v: moba_tpu.moba_attention_tpu(
      q_l, k, v, seg, q_start=start, options=band, **kw)
  out, vjp = jax.vjp(attend, q_l, k, v)
  return (out, *vjp(ct_l))

for start in (0, 21, 36):
  rows = slice(start, start + n_q)
  mine = jnp.zeros_like(ct).at[:, rows].set(ct[:, rows])
  with jax.default_matmul_precision("highest"):
    out, dq, dk, dv = reference(mine)
  got = local(start, q[:, rows], ct[:, rows])
  errors[f"pallas_tpu offset {start}"] = [
      rel_err(a, b) for a, b in zip(got, (out[:, rows], dq[:, rows], dk, dv))]

# Context parallel: pallas_gpu on 4 shards through the dispatcher (mesh.context = 4, the model's
# route), pallas_tpu on 2 through moba_context_parallel.
def out_and_grads(attend):  # one program: forward and backward
  def step(q, k, v):
    out, vjp = jax.vjp(attend, q, k, v)
    return (out, *vjp(ct))
  return jax.jit(step).lower(q, k, v)

mesh_cfg = C.MeshConfig(context=4)
mesh, rules = S.make_mesh(mesh_cfg, jax.devices()[:4]), S.rules_from_config(mesh_cfg)
with S.activate(mesh, rules):
  lowered = out_and_grads(lambda q, k, v: attention.attention(
      q, k, v, kind="moba", implementation="pallas_gpu", segment_ids=seg,
      options=options["pallas_gpu"], **kw))
  got = lowered.compile()(q, k, v)
errors["pallas_gpu context 4"] = [rel_err(a, b) for a, b in zip(got, want)]
hlo = lowered.as_text()
errors["pallas_gpu context 4 shard_map"] = "shard_map" in hlo or "sdy.manual_computation" in hlo
mesh = jax.make_mesh((2,), ("context",), devices=jax.devices()[:2])
lowered = out_and_grads(lambda q, k, v: moba_context_parallel(
    q, k, v, seg, mesh=mesh, axis="context", implementation="pallas_tpu",
    options=options["pallas_tpu"], **kw))
errors["pallas_tpu context 2"] = [rel_err(a, b) for a, b in zip(lowered.compile()(q, k, v), want)]
print(json.dumps(errors))
"""


def _start(script):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def runs(request):
  """The subprocesses of this module's selected tests, started together (they overlap)."""
  scripts = {"test_context_parallel_equals_one_device": SCRIPT,
             "test_kernels_context_parallel_equal_one_device": KERNELS}
  selected = {getattr(item, "originalname", None) for item in request.session.items
              if getattr(item, "module", None) is request.module}
  procs = {name: _start(script) for name, script in scripts.items() if name in selected}
  yield procs
  for proc in procs.values():
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def _errors(proc):
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


def test_context_parallel_equals_one_device(runs):
  errors = _errors(runs["test_context_parallel_equals_one_device"])
  for n in ("2", "4", "8", "full"):
    assert max(errors[n]) < 1e-5, (n, errors[n])  # out, dq, dk, dv
  assert "sequence length 100 must be divisible by the 'context' mesh axis size 8" in \
      errors["message"]
  for mesh in ("1x8x1", "2x2x2", "2x4x1"):
    e = errors[f"model {mesh}"]
    assert e["shard_map"], mesh  # the dispatcher took the context-parallel path
    assert e["loss"] < 1e-6 and e["grads"] < 1e-5, (mesh, e)
  assert "moba implementation='reference' (moba.implementation) cannot run context parallel" \
      in errors["reference message"]


def test_kernels_context_parallel_equal_one_device(runs):
  """Both kernels, interpreted: with a query offset and context parallel (module docstring)."""
  errors = _errors(runs["test_kernels_context_parallel_equal_one_device"])
  for start in (0, 21, 36):
    e = errors[f"pallas_tpu offset {start}"]
    assert max(e) < 1e-5, (start, e)  # out, dq, dk, dv
  for key in ("pallas_gpu context 4", "pallas_tpu context 2"):
    assert max(errors[key]) < 1e-5, (key, errors[key])
  assert errors["pallas_gpu context 4 shard_map"]  # the dispatcher took the context-parallel path


def test_query_offset_errors_and_auto():
  """One-line errors before anything compiles; "auto" under context parallelism."""
  from moba_jax import attention
  from moba_jax.kernels import moba_gpu

  q, k = jnp.zeros((1, 16, 2, 8)), jnp.zeros((1, 48, 2, 8))
  seg = jnp.zeros((1, 48), jnp.int32)
  call = lambda q, k, seg, start: moba_gpu.moba_attention_gpu(q, k, k, seg, block_size=8, topk=2,
                                                              q_start=start)
  with pytest.raises(ValueError, match=r"q_start=33 must be in \[0, 32\] \(keys T=48 - queries "
                     r"Tq=16\)"):
    call(q, k, seg, 33)
  with pytest.raises(ValueError, match="q has 16 positions, more than the 8 keys"):
    call(q, k[:, :8], seg[:, :8], 0)
  with pytest.raises(ValueError, match=r"segment_ids.shape=\(1, 16\) must be \(batch, keys\) = "
                     r"\(1, 48\)"):
    call(q, k, seg[:, :16], 0)
  with pytest.raises(ValueError, match=r"k.dtype=bfloat16 must be float32 \(q's dtype, or float32"):
    call(q, k.astype(jnp.bfloat16), seg, 0)
  with pytest.raises(ValueError, match=r"moba implementation='reference' .*the dense \[T, T\] "
                     r"oracle\); use one of \('auto', 'xla', 'pallas_gpu', 'pallas_tpu'\)"):
    attention.check_context_parallel("moba", "reference")
  assert attention.resolve_context_parallel("moba", "auto", "gpu") == "pallas_gpu"
  assert attention.resolve_context_parallel("moba", "auto", "tpu") == "pallas_tpu"
  assert attention.resolve_context_parallel("moba", "auto", "cpu") == "xla"
  assert attention.resolve_context_parallel("full", "auto", "gpu") == "xla"
