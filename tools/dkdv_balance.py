"""How evenly the Mosaic dK/dV's work items fall on the persistent CTAs, from the CPU routing.

The dK/dV kernel (kernels/moba_mgpu.py `dkdv_tiles`) takes one item per (batch, kv head, 128-key
tile) and deals the items to its CTAs in `balanced_order` (largest first, snake rounds). Its span
is the busiest CTA's work; an item's work is counted as the kernel's loop counts it: its 64-row
chunks (dense rows, then the past-block group's) plus one for its fixed cost. With GQA a kv
head's items carry every query head of its group, so there are G times fewer and longer items;
where they are about as many as the CTAs, no order balances them.

  python tools/dkdv_balance.py 16384:128:8:16:2 32768:512:3:16:16 [--calls 1,2] [--ctas 132]
                                [--row-tiles]

Each spec is seq:block:topk:heads:kv_heads[:docs] (head_dim 128, bf16, random normal q and k as
`moba-jax bench` draws them; docs packed documents of `bench.doc_lengths`, default one).
--calls: the number of calls the kv heads are split over (1: one call over every head, the
kernel's way since run 48; 2: run 47's two kv-head chunks at 16K block 128 top-8). Prints per
row: items per call, the longest item, the busiest and the mean CTA work per call (summed over
the calls), and their ratio: the span's excess over a perfect deal.

--row-tiles adds the forward's row tiles the same way: each tile's 128-key chunks plus 1.2 for
its fixed cost (run 36's model, docs/kernel_notes.md), dealt in `snake_tile`'s rounds of the
index order, one call per kv-head chunk of the step (`_routing.kv_head_chunks`).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from moba_jax import bench
from moba_jax.kernels import _routing as rt
from moba_jax.kernels import moba_gpu as mg
from moba_jax.kernels import moba_mgpu as mm


ROW_TILE_FIXED = 1.2  # a row tile's cost besides its key chunks, in chunks (run 36's model)


def item_work(seq, block, topk, heads, kv_heads, docs=1, dim=128):
  """([BK, key tiles] work of each dK/dV item (chunks + 1), [BK, row tiles] work of each forward
  row tile (128-key chunks + ROW_TILE_FIXED)) at this shape."""
  q = jax.random.normal(jax.random.key(0), (1, seq, heads, dim), jnp.bfloat16)
  k = jax.random.normal(jax.random.key(1), (1, seq, kv_heads, dim), jnp.bfloat16)
  seg = None
  if docs > 1:
    lengths = bench.doc_lengths(seq, docs)
    seg = jnp.asarray(np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)[None])
  route = jax.jit(lambda q, k, seg: rt.route(q, k, seg, block_size=block, topk=topk,
                                             block_q=mm.ROWS))
  routing, dims = route(q, k, seg)
  ks, ke = np.asarray(routing.tile_ks), np.asarray(routing.tile_ke)
  rows = np.where(ke > ks, -(-(ke - ks) // mm.ROWS), 0) + ROW_TILE_FIXED
  return np.asarray(mm.dkdv_chunks(mg.mosaic_dkdv_items(routing, dims, seq))) + 1, rows


def deal(work, ctas):
  """Each CTA's summed work under `balanced_order`."""
  order = np.asarray(mm.balanced_order(jnp.asarray(work), ctas))
  load = np.zeros(ctas)
  np.add.at(load, np.arange(order.size) % ctas, work[order])
  return load


def snake_deal(work, ctas):
  """Each CTA's summed work when it takes tiles in `snake_tile`'s order (the row-tile kernels)."""
  place = np.arange(work.size)
  rnd, col = place // ctas, place % ctas
  load = np.zeros(ctas)
  np.add.at(load, np.where(rnd % 2 == 1, ctas - 1 - col, col), work)
  return load


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("specs", nargs="+", help="seq:block:topk:heads:kv_heads[:docs]")
  p.add_argument("--calls", default="1", help="comma-separated call counts to compare")
  p.add_argument("--ctas", type=int, default=132, help="persistent CTAs (an H100's or H200's SMs)")
  p.add_argument("--row-tiles", action="store_true", help="also the forward's row tiles")
  args = p.parse_args(argv)
  print("spec                    calls  items/call  longest  busiest  mean   busiest/mean")
  for spec in args.specs:
    seq, block, topk, heads, kv_heads, *docs = map(int, spec.split(":"))
    work, rows = item_work(seq, block, topk, heads, kv_heads, *docs)
    for calls in map(int, args.calls.split(",")):
      if kv_heads % calls:
        print(f"{spec:23s} {calls:5d}  (does not divide {kv_heads} kv heads)")
        continue
      parts = np.split(work, calls, axis=0)  # kv heads in order: the chunks' rows
      busiest = mean = 0.0
      for part in parts:
        load = deal(part.reshape(-1), args.ctas)
        busiest, mean = busiest + load.max(), mean + part.sum() / args.ctas
      print(f"{spec:23s} {calls:5d}  {parts[0].size:10d}  {work.max():7d}  {busiest:7.0f}  "
            f"{mean:5.0f}  {busiest / mean:12.3f}")
    if args.row_tiles:
      calls = rt.kv_head_chunks((1, seq, heads, 128), kv_heads, block, topk, seq,
                                max_selected=mg.MOSAIC_SELECTED_PER_CHUNK)
      busiest = sum(snake_deal(part.reshape(-1), args.ctas).max()
                    for part in np.split(rows, calls, axis=0))
      mean = rows.sum() / args.ctas
      print(f"{spec:23s} {calls:5d}  {rows.size // calls:10d}  {rows.max():7.1f}  "
            f"{busiest:7.0f}  {mean:5.0f}  {busiest / mean:12.3f}  (forward row tiles)")


if __name__ == "__main__":
  main()
