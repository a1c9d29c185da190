"""Per-device compiled memory of MoBA fwd+bwd with the sequence sharded over n fake CPU devices
(moba_jax/context_parallel.py, the all-gather baseline) against one device: XLA's memory
analysis (arguments + outputs + temporaries - aliases) of one device's program.

  python tools/cp_memory.py [--seq 8192] [--block 256] [--topk 3]
"""

import argparse
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from moba_jax import moba as M  # noqa: E402
from moba_jax.context_parallel import moba_context_parallel  # noqa: E402


def peak_mib(fn, *args):
  m = jax.jit(fn).lower(*args).compile().memory_analysis()
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  return total / 2**20, m.temp_size_in_bytes / 2**20


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--seq", type=int, default=8192)
  p.add_argument("--block", type=int, default=256)
  p.add_argument("--topk", type=int, default=3)
  args = p.parse_args()
  shape_q, shape_k = (1, args.seq, 8, 64), (1, args.seq, 8, 64)
  q, ct = jnp.ones(shape_q), jnp.ones(shape_q)
  k = v = jnp.ones(shape_k)
  kw = dict(block_size=args.block, topk=args.topk)

  def step(attn):
    def f(q, k, v, ct):
      out, vjp = jax.vjp(attn, q, k, v)
      return vjp(ct)
    return f

  print(f"seq {args.seq}, 8/8 heads x 64, float32, block {args.block} top-{args.topk}")
  print(f"{'devices':>7s} {'MiB/device':>10s} {'temp MiB':>9s}")
  one = step(lambda q, k, v: M.moba_xla(q, k, v, jnp.zeros((1, args.seq), jnp.int32), **kw))
  total, temp = peak_mib(one, q, k, v, ct)
  print(f"{1:7d} {total:10.1f} {temp:9.1f}")
  for n in (2, 4, 8):
    mesh = jax.make_mesh((n,), ("context",), devices=jax.devices()[:n])
    cp = step(lambda q, k, v, mesh=mesh: moba_context_parallel(q, k, v, None, mesh=mesh,
                                                               axis="context", **kw))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "context"))
    total, temp = peak_mib(cp, *(jax.device_put(x, spec) for x in (q, k, v, ct)))
    print(f"{n:7d} {total:10.1f} {temp:9.1f}")


if __name__ == "__main__":
  main()
