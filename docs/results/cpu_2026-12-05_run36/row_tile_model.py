"""A two-parameter model of the Mosaic row-tile kernels' time (run 36, kernel_notes.md).

The forward and the dQ (kernels/moba_mgpu.py `_row_tiles`) deal their row tiles to 132
persistent CTAs in snake rounds; a kernel lasts as long as its busiest CTA. Model: a CTA's time
= a x its chunk-equivalents (a masked chunk 1.5, run 33's trace) + e x its live tiles. The
tiles come from the benchmark routings (batch 1, 16 heads, head_dim 128, random bf16 q and k)
built on the CPU; the forward's chunks are 128 keys, the dQ's 64 (`MOSAIC_DQ_BLOCK_KV`); a and
e are least-squares fits to the kernels' device times measured on the H200 in run 34 (block
512) and run 33 (block 128 top-8, two head chunks: the sum of its two calls). Run from the
repository root: python docs/results/cpu_2026-12-05_run36/row_tile_model.py (about 4 minutes).
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, ".")
from moba_jax.kernels import moba_mgpu as mm  # noqa: E402
from tests import helpers  # noqa: E402

C = 132
SHAPES = [(8192, 512, 3), (32768, 512, 3), (131072, 512, 3), (16384, 128, 8)]
MEASURED = {"forward": (128, [0.197, 0.765, 3.094, 0.480]),  # ms a step: run 34, run 33
            "dQ": (64, [0.231, 0.944, 3.871, 0.561])}


def snake_loads(work):
  """Each CTA's sum of `work` (one entry a tile, in index order) under `mm.snake_tile`."""
  items = work.size
  loads = np.zeros(C)
  for i in range(-(-items // C)):
    idx = np.arange(i * C, min((i + 1) * C, items))
    ctas = np.arange(len(idx)) if i % 2 == 0 else C - 1 - np.arange(len(idx))
    loads[ctas] += work[idx]
  return loads


def tile_stats(routing, bkv):
  """(chunk-equivalents, live tiles) of the busiest CTA, and the totals."""
  r = routing
  nf = np.asarray(mm.free_chunks(r.tile_ks, r.tile_ke, r.lo, r.hi, r.rq, bkv))
  ks, ke = np.asarray(r.tile_ks) // 8 * 8, np.asarray(r.tile_ke)
  n = np.maximum(-(-(ke - ks) // bkv), 0)
  nf = np.minimum(nf, n)
  live = (np.asarray(r.rq) >= 0).reshape(n.shape[0], n.shape[1], -1).any(-1)
  chunks = np.where(live, nf + 1.5 * (n - nf), 0.0).reshape(-1)
  tiles = live.reshape(-1).astype(float)
  lc, lt = snake_loads(chunks), snake_loads(tiles)
  c = np.argmax(lc + lt)
  return lc[c], lt[c], int(n.sum()), int(live.sum())


def main():
  routings = {}
  for seq, block, topk in SHAPES:
    keys = jax.random.split(jax.random.key(1), 2)
    q = jax.random.normal(keys[0], (1, seq, 16, 128), jnp.bfloat16)
    k = jax.random.normal(keys[1], (1, seq, 16, 128), jnp.bfloat16)
    routings[seq, block, topk] = helpers.route(q, k, None, block_size=block, topk=topk,
                                               block_q=128)[0]
  for kernel, (bkv, ms) in MEASURED.items():
    stats = [tile_stats(routings[s], bkv) for s in SHAPES]
    a_mat = np.array([[c, t] for c, t, _, _ in stats])
    (a, e), *_ = np.linalg.lstsq(a_mat, np.array(ms) * 1e3, rcond=None)
    print(f"{kernel}: a = {a:.3f} us a {bkv}-key chunk, e = {e:.3f} us a tile ({e / a:.2f} "
          "chunks)")
    for (seq, block, topk), m, row, (_, _, chunks, live) in zip(SHAPES, ms, a_mat, stats):
      model = row @ (a, e)
      print(f"  {seq // 1024}K b{block} k{topk}: {live} live tiles, {chunks} chunks; busiest CTA "
            f"{row[0]:.0f} chunk-equivalents, {row[1]:.0f} tiles; measured {m:.3f} ms, model "
            f"{model / 1e3:.3f}; the tiles' share {row[1] * e / model:.0%}; e halved: "
            f"{(row @ (a, e / 2)) / 1e3:.3f} ms")


if __name__ == "__main__":
  main()
