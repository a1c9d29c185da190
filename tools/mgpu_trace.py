"""Where the Mosaic GPU kernels' time goes inside a CTA: Mosaic GPU's on-device profiler.

usage: python tools/mgpu_trace.py --seq 8192 [--block 512 --topk 3] [--ranges 256]
           [--regions finish,stage,store,store_wait] [--out DIR]
       python tools/mgpu_trace.py --summarize DIR

Sets `MOBA_MGPU_TRACE` (kernels/moba_mgpu.py, `trace_params`) before tracing one `pallas_gpu`
fwd+bwd step of `moba-jax bench` (batch 1, 16 heads, head_dim 128, bf16), runs it twice (the
first call compiles), and summarizes the Perfetto traces the kernels wrote: per kernel and
warpgroup role (compute warpgroups 0 and 1, the producer 2), each `jax.named_scope` region's
count a CTA, median length and share of the warpgroup's span (first region's start to the last
one's end), the time outside every region, and the busiest CTA's span over the mean (the kernel
ends with its busiest CTA). Lengths are in the SM's clock cycles (the profiler reads `%clock`;
at 1,980 MHz a microsecond is 1,980 cycles). A region's recording costs a few instructions, so
the kernels run slightly slower than untraced: shares, not times. Regions past --ranges a
warpgroup are cut (the trace of that warpgroup ends early); the summary counts the warpgroups
whose trace was cut.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import statistics
import sys
import tempfile


def regions(events):
  """[(tid, name, start, end)] of one trace's B/E events in cycles (nested regions paired by a
  stack)."""
  stacks, out = collections.defaultdict(list), []
  for e in sorted(events, key=lambda e: (e["tid"], e["ts"], e["ph"] == "B")):
    if e["ph"] == "B":
      stacks[e["tid"]].append(e)
    elif stacks[e["tid"]]:
      b = stacks[e["tid"]].pop()
      # the dump writes ts = (globaltimer at the kernel's start in ns + clock cycles) / 1e3
      out.append((e["tid"], b["name"], b["ts"] * 1e3, e["ts"] * 1e3))
  return out


def union_length(intervals) -> float:
  """The length covered by [start, end) intervals (nested or overlapping ones counted once)."""
  total, reach = 0.0, float("-inf")
  for start, end in sorted(intervals):
    if end > reach:
      total += end - max(start, reach)
      reach = end
  return total


def summarize(path, ranges=None) -> str:
  """The table of every trace file in path, grouped by kernel (the file name's prefix)."""
  by_kernel = collections.defaultdict(list)
  for f in sorted(glob.glob(os.path.join(path, "*-trace.json"))):
    by_kernel[os.path.basename(f).split("-")[0]].append(f)
  lines = []
  for kernel, files in by_kernel.items():
    with open(files[-1]) as fh:  # the last call's (the first one compiled)
      events = json.load(fh)["traceEvents"]
    by_tid = collections.defaultdict(list)
    for r in regions(events):
      by_tid[r[0]].append(r)
    per_role = collections.defaultdict(lambda: collections.defaultdict(list))
    spans, inside = collections.defaultdict(list), collections.defaultdict(list)
    counts = collections.defaultdict(lambda: collections.defaultdict(list))
    cut = 0
    for tid, mine in sorted(by_tid.items()):
      role = (tid - 1) % 3  # tid = 1 + warpgroup + 3 * block
      start, end = min(r[2] for r in mine), max(r[3] for r in mine)
      spans[role].append(end - start)
      inside[role].append(union_length([(r[2], r[3]) for r in mine]))
      by_name = collections.defaultdict(list)
      for r in mine:
        by_name[r[1]].append(r[3] - r[2])
      for name, lengths in by_name.items():
        per_role[role][name].append(lengths)
        counts[role][name].append(len(lengths))
      if ranges and len(mine) >= ranges - 1:  # 4 entries a region, 4 x ranges - 3 in all
        cut += 1
    lines.append(f"== {kernel}: {len(files)} call(s), {len(by_tid)} warpgroup traces, "
                 f"{cut} cut at --ranges")
    lines.append(f"{'role':>8} {'region':>12} {'a CTA':>7} {'median cyc':>11} {'share':>7}")
    for role in sorted(per_role):
      span = statistics.median(spans[role])
      name = ("compute", "compute", "producer")[role] + str(role)
      for region, lists in sorted(per_role[role].items()):
        flat = [x for lengths in lists for x in lengths]
        share = statistics.median(sum(lengths) / s for lengths, s in zip(lists, spans[role]))
        lines.append(f"{name:>8} {region:>12} {statistics.median(counts[role][region]):>7.0f} "
                     f"{statistics.median(flat):>11.0f} {share:>7.1%}")
      outside = statistics.median(1 - i / s for i, s in zip(inside[role], spans[role]) if s)
      spread = max(spans[role]) / statistics.mean(spans[role])  # the kernel waits for its busiest
      lines.append(f"{name:>8} {'(outside)':>12} {'':>7} {'':>11} {outside:>7.1%}"
                   f"   span median {span:.0f} cyc, max / mean {spread:.3f}")
  return "\n".join(lines) if lines else f"no *-trace.json in {path}"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--seq", type=int, default=8192)
  p.add_argument("--block", type=int, default=512)
  p.add_argument("--topk", type=int, default=3)
  p.add_argument("--ranges", type=int, default=256, help="regions a warpgroup may record")
  p.add_argument("--regions", default=None,
                 help="record only these regions, comma-separated (default: every one; fewer a "
                      "tile fit more tiles in --ranges)")
  p.add_argument("--gpu-block-sizes", default=None)
  p.add_argument("--out", default=None, help="where the traces go (default: a temporary dir)")
  p.add_argument("--summarize", default=None, help="only summarize the traces in this dir")
  a = p.parse_args(argv)
  if a.summarize:
    print(summarize(a.summarize))
    return 0
  from moba_jax.kernels import moba_mgpu
  bad = sorted(set((a.regions or "").split(",")) - set(moba_mgpu.REGIONS) - {""})
  if bad:
    p.error(f"--regions: {', '.join(bad)} not among the kernels' regions "
            f"({', '.join(moba_mgpu.REGIONS)})")
  out = a.out or tempfile.mkdtemp(prefix="mgpu_trace_")
  os.makedirs(out, exist_ok=True)
  os.environ[moba_mgpu.TRACE_ENV] = f"{out}:{a.ranges}" + (f":{a.regions}" if a.regions else "")
  import jax
  import jax.numpy as jnp

  from moba_jax import bench
  args = bench.parse_args(["--impls", "pallas_gpu"])
  fn = bench.make_fn("pallas_gpu", a.block, a.topk, True, a.gpu_block_sizes)
  for seed in (1, 2):
    q, k, v, cot, seg = bench.inputs(seed, args, a.seq, jnp.bfloat16)
    jax.block_until_ready(fn(q, k, v, cot, seg))
  jax.effects_barrier()  # the profiler's host callbacks have written their files
  print(f"seq {a.seq} block {a.block} topk {a.topk}: traces in {out}")
  print(summarize(out, a.ranges))
  return 0


if __name__ == "__main__":
  sys.exit(main())
