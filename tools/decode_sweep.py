"""Tile sweep of the Pallas GPU decode kernel (kernels/moba_decode.py) on this machine's GPU.

Per (batch, cache) and DecodeBlockSizes (block_k, splits, num_warps): ms per decode-step attention
inside a device loop (bench_decode.looped), the gate included, against the XLA step; the fastest
tiles per shape are printed last. Checks each variant's output against the XLA step first.

  python tools/decode_sweep.py [--caches 131072,1048576] [--batches 1,16]
"""

from __future__ import annotations

import argparse
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np

from moba_jax import decode
from moba_jax.bench import int_list, time_ms
from moba_jax.bench_decode import looped, random_cache
from moba_jax.kernels import moba_decode


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--caches", type=int_list, default=[131072, 1048576])
  p.add_argument("--batches", type=int_list, default=[1, 16])
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--kv-heads", type=int, default=None)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--block", type=int, default=512)
  p.add_argument("--topk", type=int, default=3)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--inner", type=int, default=200)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--json", default=None)
  p.add_argument("--grid", choices=("full", "default"), default="full",
                  help="default: time only the default tiles (and the gate alone)")
  args = p.parse_args()
  grid = [moba_decode.DecodeBlockSizes(bk, sp, w)
          for bk, sp, w in itertools.product((32, 64, 128), (0, 4, 1), (4, 8))]
  if args.grid == "default":
    grid = [moba_decode.DecodeBlockSizes()]
  rows = []
  for batch, cache in itertools.product(args.batches, args.caches):
    if batch * cache > 2 ** 22:
      continue
    layer = random_cache(batch, cache, args)
    n = jnp.full((batch,), cache, jnp.int32)
    qs = jnp.stack([jax.random.normal(jax.random.key(s), (batch, args.heads, args.dim),
                                      jnp.dtype(args.dtype)) for s in range(4)])
    step = lambda sizes: (lambda q, c, n: decode.moba_step_attention(
        q, c, n, block_size=args.block, topk=args.topk, implementation="xla") if sizes is None
        else _kernel_step(q, c, n, args, sizes))
    want = np.asarray(jax.jit(step(None))(qs[0], layer, n), np.float32)
    gate = lambda q, c, n: decode.choose_blocks(q, c.block_sums, n, block_size=args.block,
                                                topk=args.topk)[0]
    gate_ms = time_ms(looped(gate, args.inner), [(qs, layer, n)], 1, args.repeats) / args.inner
    print(json.dumps(dict(batch=batch, cache=cache, gate_only_ms=gate_ms)), flush=True)
    for sizes in [None] + grid:
      try:
        got = np.asarray(jax.jit(step(sizes))(qs[0], layer, n), np.float32)
        err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        ms = time_ms(looped(step(sizes), args.inner), [(qs, layer, n)], 1, args.repeats)
        ms /= args.inner
      except Exception as e:  # noqa: BLE001 - a tile that does not compile: say so, go on
        err, ms = float("nan"), float("nan")
        print(f"{sizes}: {repr(e)[:200]}")
      row = dict(batch=batch, cache=cache, sizes=None if sizes is None else list(
          sizes.__dict__.values()), ms=ms, rel_err=err)
      rows.append(row)
      print(json.dumps(row), flush=True)
  print(f"{'batch':>5s} {'cache':>8s} {'xla ms':>8s} {'best ms':>8s} best tiles")
  for (batch, cache), group in itertools.groupby(rows, lambda r: (r["batch"], r["cache"])):
    group = list(group)
    best = min((r for r in group[1:] if r["ms"] == r["ms"]), key=lambda r: r["ms"])
    print(f"{batch:5d} {cache:8d} {group[0]['ms']:8.4f} {best['ms']:8.4f} {best['sizes']}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f)


def _kernel_step(q, cache, n, args, sizes):
  blocks, valid = decode.choose_blocks(q, cache.block_sums, n, block_size=args.block,
                                       topk=args.topk)
  return moba_decode.decode_attention_gpu(q, cache.k, cache.v, blocks, valid, n,
                                          block_size=args.block, scale=args.dim ** -0.5,
                                          sizes=sizes)


if __name__ == "__main__":
  main()
