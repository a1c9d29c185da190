"""Two ways to run MoBA over chunks of kv heads, timed and planned on one shape (one per process).

usage: python tools/head_chunks_gpu.py --seq 8192 --block 512 --topk 3 --way map --chunks 2
         [--gpu-block-sizes 128,64,64,64,4,3,4,128,1,1] [--repeats 20]

--way map: the whole attention (routing, forward, backward) over `chunks` chunks with `lax.map`
  (`_routing.over_kv_head_chunks`, forced by lowering `_routing.PARTIAL_BYTES` for this process,
  and by turning off `moba_gpu._split_heads`' choice of the kernels' own chunks);
--way kernels: the Mosaic kernels over `chunks` chunks (BlockSizes.mosaic_head_chunks: the
  forward and the backward; `lax.map`'s chunks turned off; the backward alone, as `mosaic_bwd_chunks`, before commit 92c013b of
  2026-12-02: run 19b in docs/benchmarks.md).
Prints the fwd+bwd step's median ms, each call synced and 8 back to back, and XLA's memory plan
(arguments + outputs + temporaries, as `moba-jax bench` reports its peak).
"""

from __future__ import annotations

import argparse
import math


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seq", type=int, default=8192)
  p.add_argument("--block", type=int, default=512)
  p.add_argument("--topk", type=int, default=3)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--way", choices=("map", "kernels"), default="map")
  p.add_argument("--chunks", type=int, default=2)
  p.add_argument("--gpu-block-sizes", default="128,64,64,64,4,3,4,128,1,1")
  p.add_argument("--repeats", type=int, default=20)
  a = p.parse_args(argv)

  import jax.numpy as jnp

  from moba_jax import bench
  from moba_jax.kernels import _routing as rt
  from moba_jax.kernels import moba_gpu as mg

  tiles = a.gpu_block_sizes
  if a.way == "map":  # the budget that gives exactly `chunks` chunks (kv_head_chunks' count)
    n_sel = min(a.topk, math.ceil(a.seq / a.block))
    rt.PARTIAL_BYTES = 4 * a.seq * a.heads * a.dim * n_sel // a.chunks
    assert rt.kv_head_chunks((1, a.seq, a.heads, a.dim), a.heads, a.block, a.topk) == a.chunks
    mg._split_heads = lambda sizes, *_: (sizes, None)  # lax.map's, not the kernels' own
  else:  # one call for all heads (no lax.map) that chunks inside
    rt.PARTIAL_BYTES = 1 << 62
    tiles = f"{tiles},{a.chunks}"
  ns = argparse.Namespace(batch=1, heads=a.heads, kv_heads=None, dim=a.dim)
  sets = [bench.inputs(s, ns, a.seq, jnp.bfloat16) for s in (1, 2)]
  step = bench.make_fn("pallas_gpu", a.block, a.topk, bwd=True, tiles=tiles)
  peak = bench.peak_bytes(step, sets[0]) / 2 ** 20
  synced = bench.time_ms(step, sets, 3, a.repeats)
  piped = bench.time_ms(step, sets, 3, a.repeats, pipeline=8)
  print(f"seq {a.seq} block {a.block} topk {a.topk} way {a.way} chunks {a.chunks}: synced "
        f"{synced:.3f} ms, back to back {piped:.3f} ms, plan {peak:.1f} MiB", flush=True)


if __name__ == "__main__":
  main()
