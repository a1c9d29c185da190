"""Per-kernel time of one `pallas_gpu` fwd+bwd step on a GPU, from a JAX profiler trace.

usage: python tools/profile_gpu.py --seq 32768 [--block 512 --topk 3]
         [--gpu-block-sizes 64,64,64,64,4,3[,1]] [--out DIR]

Runs the jitted step of `moba-jax bench` (batch 1, 16 heads, head_dim 128, bf16), traces a few
steps with `jax.profiler.trace(create_perfetto_trace=True)` and prints the device kernels grouped
by name, in ms per step, largest first: where the fwd+bwd time goes (routing ops, the Pallas
kernels, the XLA glue). The raw trace stays in DIR (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import tempfile

import jax
import jax.numpy as jnp

from moba_jax import bench


def kernel_times(trace_path, steps):
  """{kernel name: (ms per step, launches per step, one hlo op name)} from a perfetto trace."""
  with gzip.open(trace_path, "rt") as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device = {pid for pid, n in names.items() if "GPU" in n or "gpu" in n}
  threads = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in device}
  # kernels run on "Stream #..." lines; "XLA Ops"/"XLA Modules" lines would count them twice
  streams = {key for key, n in threads.items() if n.lower().startswith("stream")}
  print("device lines:", sorted(set(threads.values())) or sorted(names.values()))
  total, count, op = collections.Counter(), collections.Counter(), {}
  for e in events:
    if e.get("ph") != "X" or (e.get("pid"), e.get("tid")) not in streams:
      continue
    name = e.get("name", "?")
    total[name] += float(e.get("dur", 0.0)) / 1e3  # us -> ms
    count[name] += 1
    args = e.get("args", {})
    op.setdefault(name, args.get("hlo_op") or args.get("long_name") or "")
  return {n: (t / steps, count[n] / steps, op[n]) for n, t in total.items()}


def idle_gaps(trace_path, steps, top=8):
  """Where the GPU idles inside a step: the kernels of all streams, split into the `steps` steps
  at the steps - 1 longest gaps (each step ends with a host sync, whose gap is assumed longer
  than any inside a step: check the printed bound against the listed gaps); per step the span from its
  first kernel's start to its last one's end, the union of kernel time in it, and the longest
  gaps inside steps (us, with the kernels on either side). A gap is host work the device waits
  for: a launch, a conditional's predicate read back, a while loop's trip."""
  with gzip.open(trace_path, "rt") as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device = {pid for pid, n in names.items() if "gpu" in n.lower()}
  streams = {(e["pid"], e["tid"]) for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name" and e.get("pid") in device
             and e.get("args", {}).get("name", "").lower().startswith("stream")}
  kernels = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e.get("name", "?"))
                   for e in events if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in streams)
  if len(kernels) < steps:
    print("idle gaps: too few kernels on the stream lines")
    return
  gaps, end, prev = [], kernels[0][1], kernels[0][2]
  busy = kernels[0][1] - kernels[0][0]
  for a, b, n in kernels[1:]:
    if a > end:
      gaps.append((a - end, prev, n))
    if b > end:
      busy += b - max(a, end)
      end, prev = b, n
  gaps.sort(reverse=True)
  between, inside = gaps[:steps - 1], gaps[steps - 1:]
  span = end - kernels[0][0] - sum(g for g, _, _ in between)
  sep = f" (between steps: {between[-1][0] / 1e3:.3f} ms or more)" if between else ""
  print(f"per step: span {span / steps / 1e3:.3f} ms, kernels busy {busy / steps / 1e3:.3f} ms, "
        f"idle {(span - busy) / steps / 1e3:.3f} ms in {len(inside) / steps:.1f} gaps{sep}")
  for g, a, b in inside[:top]:
    print(f"  gap {g:8.1f} us  after {a[:50]}  before {b[:50]}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--seq", type=int, default=32768)
  p.add_argument("--block", type=int, default=512)
  p.add_argument("--topk", type=int, default=3)
  p.add_argument("--gpu-block-sizes", default=None)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--out", default=None)
  p.add_argument("--top", type=int, default=40)
  a = p.parse_args(argv)
  args = bench.parse_args(["--seqs", str(a.seq)])
  fn = bench.make_fn("pallas_gpu", a.block, a.topk, True, a.gpu_block_sizes)
  sets = [bench.inputs(s, args, a.seq, jnp.bfloat16) for s in range(1, a.steps + 3)]
  for s in sets[:2]:
    jax.block_until_ready(fn(*s))
  out = a.out or tempfile.mkdtemp()
  with jax.profiler.trace(out, create_perfetto_trace=True):
    for s in sets[2:]:
      jax.block_until_ready(fn(*s))
  traces = glob.glob(os.path.join(out, "**", "perfetto_trace.json.gz"), recursive=True)
  if not traces:
    raise SystemExit(f"no trace written under {out}")
  times = kernel_times(max(traces, key=os.path.getmtime), a.steps)
  total = sum(t for t, _, _ in times.values())
  print(f"seq {a.seq} block {a.block} topk {a.topk} sizes {a.gpu_block_sizes}: "
        f"device kernels {total:.3f} ms per step")
  print(f"{'ms/step':>8} {'share':>6} {'calls':>6}  kernel (hlo op)")
  for name, (t, c, o) in sorted(times.items(), key=lambda x: -x[1][0])[:a.top]:
    print(f"{t:8.3f} {100 * t / total:5.1f}% {c:6.1f}  {name[:70]} ({o[:60]})")
  idle_gaps(max(traces, key=os.path.getmtime), a.steps)


if __name__ == "__main__":
  main()
