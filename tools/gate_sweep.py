"""The GPU gate kernel alone (kernels/moba_gate.py: block scores and top-k) at each of several
program shapes (`moba_gate.GateTiles`), timed on a GPU: which shape to make the default.

usage: python tools/gate_sweep.py [--specs 131072:512:3 ...] [--tiles 64:64:4:2 128:64:8:2 ...]
         [--repeats 20] [--interpret]

The gate is 0.13 ms of a 3.8 ms fwd+bwd step at 32K block 512 top-3 on the H200, 1.02 ms of 15.6
at 128K (run 34) and 0.18 of 2.7 at 16K block 128 top-8 (run 33; docs/benchmarks.md) in the
shape of run 26; run 36's sweep made 32 slots a chunk the default (e_gate.txt, d_gate.txt in
docs/results/h200_2026-12-05_run36). Per spec (seq:block:topk; 16 heads, head_dim 128, bf16, one
document) and tiles (bt:bn:num_warps:num_stages) it prints the median ms of a call, 8 calls back
to back on fresh inputs (the device's time, without a synced call's host share;
tools/README.md), its ratio to the first tiles', the queries whose choice differs from the first
tiles' (none expected: the same exact bf16 products, summed in float32 in an order the tiles
may change only at a near tie), and the TF/s of the products the queries need (three bf16
pieces of each past block's mean key: 201 TF/s at 128K b512 in run 34's 1.02 ms). --interpret
runs it on the CPU at a small shape (the tool's own check; times meaningless).
"""

from __future__ import annotations

import argparse

DEFAULT_SPECS = ("8192:512:3", "16384:128:8", "32768:512:3", "131072:512:3", "131072:4096:12")
DEFAULT_TILES = ("64:32:4:2", "64:64:4:2", "128:64:4:2", "128:64:8:2", "64:128:4:2",
                 "128:128:8:2", "32:64:4:2", "64:64:4:3", "64:16:4:2", "256:64:8:2")


def parse_tiles(text: str):
  from moba_jax.kernels import moba_gate
  try:
    bt, bn, warps, stages = (int(x) for x in text.split(":"))
  except ValueError:
    raise SystemExit(f"--tiles {text!r}: bt:bn:num_warps:num_stages, four integers") from None
  try:
    return moba_gate.GateTiles(bt, bn, warps, stages)
  except ValueError as e:
    raise SystemExit(f"--tiles {text!r}: {e}") from None


def gate_inputs(seed: int, seq: int, block: int, heads: int, dim: int):
  """(q, k_pieces, first, cur) of one document, as `_routing.select_chunked` gives them to the
  kernel."""
  import jax
  import jax.numpy as jnp

  from moba_jax import moba as moba_lib
  from moba_jax.kernels import _routing as rt
  kq, kk = jax.random.split(jax.random.key(seed))
  q = jax.random.normal(kq, (1, seq, heads, dim), jnp.bfloat16)
  k = jax.random.normal(kk, (1, seq, heads, dim), jnp.bfloat16)
  layout = moba_lib.doc_layout(jnp.zeros((1, seq), jnp.int32), block)
  table, first = rt.full_block_table(k, layout, block, one_doc=True)
  return q, jnp.stack(rt._bf16_pieces(table, 3)), first, layout.block_index


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--specs", nargs="+", default=None, help="seq:block:topk")
  p.add_argument("--tiles", nargs="+", default=list(DEFAULT_TILES),
                 help="bt:bn:num_warps:num_stages; the first is the ratios' reference")
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--interpret", action="store_true", help="on the CPU, at a small shape")
  a = p.parse_args(argv)
  specs = a.specs or (["512:32:3"] if a.interpret else list(DEFAULT_SPECS))
  tiles = [parse_tiles(t) for t in a.tiles]
  parsed = []
  for spec in specs:
    try:
      parsed.append(tuple(int(x) for x in spec.split(":")))
      assert len(parsed[-1]) == 3
    except (ValueError, AssertionError):
      raise SystemExit(f"--specs {spec!r}: seq:block:topk, three integers") from None

  import functools

  import jax
  import numpy as np

  from moba_jax import bench
  from moba_jax.kernels import moba_gate
  if not a.interpret and jax.default_backend() != "gpu":
    raise SystemExit(f"the gate kernel compiles on a GPU (this is {jax.default_backend()}); "
                     "--interpret runs it on the CPU")
  print(f"{'shape':>16} {'bt:bn:warps:stages':>19} {'ms':>8} {'/first':>7} {'differ':>7} "
        f"{'TF/s':>6}")
  for seq, block, topk in parsed:
    n_sel = min(topk, -(-seq // block))
    # the products a query needs: three bf16 pieces of each past block's mean key (bf16 q)
    flops = 2 * 3 * a.dim * a.heads * sum(t // block for t in range(seq))
    sets = [gate_inputs(s, seq, block, a.heads, a.dim) for s in (1, 2, 3)]
    first_ms, first_out = None, None
    for t in tiles:
      fn = jax.jit(functools.partial(moba_gate.gate_topk, n_sel=n_sel, interpret=a.interpret,
                                     tiles=t))
      try:
        ms = bench.time_ms(fn, sets, 1 if a.interpret else 3, a.repeats, pipeline=8)
      except jax.errors.JaxRuntimeError as e:  # e.g. more shared memory than the GPU has
        print(f"{t.bt}:{t.bn}:{t.num_warps}:{t.num_stages} at {seq}:{block}:{topk} does not run: "
              f"{str(e).splitlines()[0][:120]}", flush=True)
        continue
      out = np.asarray(fn(*sets[0])[0])
      if first_out is None:
        first_ms, first_out = ms, out
      differ = int((out != first_out).any(-1).sum())
      name = f"{seq // 1024}K b{block} k{topk}" if seq >= 1024 else f"{seq} b{block} k{topk}"
      print(f"{name:>16} {t.bt}:{t.bn}:{t.num_warps}:{t.num_stages:<7} {ms:8.3f} "
            f"{ms / first_ms:7.3f} {differ:7d} {flops / ms / 1e9:6.1f}", flush=True)


if __name__ == "__main__":
  main()
