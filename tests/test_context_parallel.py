"""Context parallelism (moba_jax/context_parallel.py), one subprocess on 8 fake CPU devices:
  - MoBA attention with the sequence sharded over 2, 4 and 8 devices equals the single-device
    reference, outputs and gradients, with packed documents that cross shard boundaries; so does
    full attention on 8 (its queries in several chunks);
  - a whole hybrid model (one MoBA, one full layer) through the dispatcher: loss and every
    parameter gradient under mesh (data, context, tensor) = (1, 8, 1), (2, 2, 2), (2, 4, 1)
    equal one device's;
  - the errors: a sequence the axis does not divide, a kernel that cannot run context parallel.
XLA's CPU backend optimizations are off in the subprocess: compiling is half the time, and the
numbers stay float32 programs (the tolerance is the same)."""

import json
import os
import subprocess
import sys

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

with jax.default_matmul_precision("highest"):
  want = out_and_grads(lambda q, k, v: M.moba_reference(q, k, v, seg, **kw))
errors = {}
for n in (2, 4, 8):
  mesh = jax.make_mesh((n,), ("context",), devices=jax.devices()[:n])
  fn = jax.jit(lambda q, k, v: moba_context_parallel(q, k, v, seg, mesh=mesh, axis="context", **kw))
  errors[n] = [float(rel_err(a, b)) for a, b in zip(out_and_grads(fn), want)]
# Full attention (a hybrid's full layers), queries in chunks of 4 (a budget of 4 queries' logits).
with jax.default_matmul_precision("highest"):
  want = out_and_grads(lambda q, k, v: M.full_reference(q, k, v, seg))
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
    attention.attention(q, k, v, kind="moba", implementation="pallas_gpu", block_size=8, topk=3)
  except ValueError as e:
    errors["kernel message"] = str(e)
print(json.dumps(errors))
"""


def test_context_parallel_equals_one_device():
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  errors = json.loads(out.stdout.strip().splitlines()[-1])
  for n in ("2", "4", "8", "full"):
    assert max(errors[n]) < 1e-5, (n, errors[n])  # out, dq, dk, dv
  assert "sequence length 100 must be divisible by the 'context' mesh axis size 8" in \
      errors["message"]
  for mesh in ("1x8x1", "2x2x2", "2x4x1"):
    e = errors[f"model {mesh}"]
    assert e["shard_map"], mesh  # the dispatcher took the context-parallel path
    assert e["loss"] < 1e-6 and e["grads"] < 1e-5, (mesh, e)
  assert "moba implementation='pallas_gpu' (moba.implementation) cannot run context parallel" \
      in errors["kernel message"]
