"""Context parallelism (moba_jax/context_parallel.py): MoBA with the sequence sharded over 2, 4
and 8 fake CPU devices equals the single-device reference, outputs and gradients, with packed
documents that cross shard boundaries."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax
from moba_jax import moba as M
from moba_jax.context_parallel import moba_context_parallel
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
try:
  moba_context_parallel(q[:, :100], k[:, :100], v[:, :100], None, mesh=mesh, axis="context", **kw)
except ValueError as e:
  errors["message"] = str(e)
print(json.dumps(errors))
"""


def test_sharded_sequence_equals_one_device():
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  errors = json.loads(out.stdout.strip().splitlines()[-1])
  for n in ("2", "4", "8"):
    assert max(errors[n]) < 1e-5, (n, errors[n])  # out, dq, dk, dv
  assert "sequence length 100 must be divisible by the 'context' mesh axis size 8" in \
      errors["message"]
