"""Grid steps of each pallas_tpu kernel in one fwd+bwd step, traced on the CPU (nothing runs).

A Pallas TPU grid pays a fixed cost each step (the pipeline's bookkeeping and DMA issue) on top
of its DMAs and products, so how much work a step holds decides how near the roofline a small
tile can come (docs/tpu_roofline.md). For each shape: each kernel's grid steps (empty steps
included: a rectangular grid's steps past a tile's keys still pay the fixed cost) and the FLOPs
of the attended pairs' nine products (fwd 2, dQ 3, dK/dV 4) per grid step.

  python tools/tpu_steps.py [--shapes 8192:512:3,16384:128:8,...] [--heads 16] [--dim 128]
      [--tiles 256]  (moba_tpu.BlockSizes fields in order, as `moba.tiles`)

The counts of the kernel before run 35's windows are in docs/tpu_roofline.md.
"""

import argparse
import jax
import jax.numpy as jnp
from moba_jax import attention, flops
from moba_jax.kernels import moba_tpu

SHAPES = "8192:512:3,16384:128:8,32768:512:3,131072:512:3,131072:4096:12"


def steps_of(seq, block, topk, heads, dim, dtype=jnp.bfloat16, tiles=()):
  """{kernel name: grid steps} of one fwd+bwd step at [1, seq, heads, dim], one document."""
  def loss(q, k, v):
    out = attention.moba_attention(q, k, v, segment_ids=None, block_size=block, topk=topk,
                                   implementation="pallas_tpu",
                                   options=attention.KernelOptions(tiles=tiles))
    return out.astype(jnp.float32).sum()

  spec = jax.ShapeDtypeStruct((1, seq, heads, dim), dtype)
  traced = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(spec, spec, spec)
  return moba_tpu.grid_steps(traced.jaxpr)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--shapes", default=SHAPES, help="SEQ:BLOCK:TOPK,... (16 heads, head_dim 128)")
  ap.add_argument("--heads", type=int, default=16)
  ap.add_argument("--dim", type=int, default=128)
  ap.add_argument("--tiles", default="", help="moba_tpu.BlockSizes fields in order, e.g. 256")
  args = ap.parse_args()
  tiles = tuple(int(x) for x in args.tiles.split(",") if x)
  print(f"pallas_tpu grid steps of one fwd+bwd step ({args.heads} heads, head_dim {args.dim}, "
        f"bf16, one document, tiles {list(tiles) or 'default'})")
  print(f"{'shape':<18} {'fwd':>9} {'dq':>9} {'dkdv dense':>11} {'dkdv sparse':>12} "
        f"{'all':>10} {'MFLOP/step':>11}")
  for spec in args.shapes.split(","):
    seq, block, topk = (int(x) for x in spec.split(":"))
    steps = steps_of(seq, block, topk, args.heads, args.dim, tiles=tiles)
    total = sum(steps.values())
    # fwd 2 products, dQ 3, dK/dV 4: 9 of 2 x pairs x dim FLOPs each, over all grid steps
    flop = 9 * 2 * args.heads * flops.attended_pairs([seq], "moba", block, topk) * args.dim
    get = lambda n: steps.get(f"moba_tpu_{n}", 0)
    print(f"{seq // 1024}K b{block} k{topk}".ljust(18)
          + f" {get('fwd'):>9} {get('dq'):>9} {get('dkdv_dense'):>11} {get('dkdv_sparse'):>12}"
          f" {total:>10} {flop / total / 1e6:>11.1f}")


if __name__ == "__main__":
  main()
