"""Per-kernel time of one `pallas_gpu` fwd+bwd step on a GPU, from a JAX profiler trace.

usage: python tools/profile_gpu.py --seq 32768 [--block 512 --topk 3] [--kv-heads 2 --dim 64]
         [--gpu-block-sizes 64,64,64,64,4,3[,1]] [--impl cudnn] [--host 30] [--sources] [--out DIR]

Runs the jitted step of `moba-jax bench` (batch 1, 16 query heads, --kv-heads of them, default
16; head_dim 128 or --dim; bf16), traces a few steps with `jax.profiler.trace(create_perfetto_trace=True)` and prints the device kernels grouped
by name, in ms per step, largest first: where the fwd+bwd time goes (routing ops, the Pallas
kernels, the XLA glue). `--host N` adds where a synced call's wall time goes on the host: per
call, the wall time, the host time before the first kernel, the kernels' span and the wait after
the last one, then the N host events (the runtime's trace annotations and the CUDA API calls)
with the most time per call. The raw trace stays in DIR (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moba_jax import bench


class Trace(NamedTuple):
  """A perfetto trace's events and lines: the GPU's processes, every thread's name, and the
  GPU's "Stream #..." lines, where kernels run ("XLA Ops"/"XLA Modules" lines would count them
  twice)."""
  events: list
  processes: dict  # pid -> name
  device: set  # GPU pids
  threads: dict  # (pid, tid) -> name
  streams: set  # (pid, tid) of the GPU's stream lines


def load(trace_path) -> Trace:
  with gzip.open(trace_path, "rt") as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  meta = lambda kind: {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "")
                       for e in events if e.get("ph") == "M" and e.get("name") == kind}
  processes = {pid: n for (pid, _), n in meta("process_name").items()}
  device = {pid for pid, n in processes.items() if "gpu" in n.lower()}
  threads = meta("thread_name")
  streams = {key for key, n in threads.items()
             if key[0] in device and n.lower().startswith("stream")}
  return Trace(events, processes, device, threads, streams)


def kernel_times(trace_path, steps):
  """{kernel name: (ms per step, launches per step, one hlo op name)} from a perfetto trace."""
  tr = load(trace_path)
  print("device lines:", sorted({n for (pid, _), n in tr.threads.items() if pid in tr.device})
        or sorted(tr.processes.values()))
  total, count, op = collections.Counter(), collections.Counter(), {}
  for e in tr.events:
    if e.get("ph") != "X" or (e.get("pid"), e.get("tid")) not in tr.streams:
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
  tr = load(trace_path)
  kernels = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e.get("name", "?"))
                   for e in tr.events
                   if e.get("ph") == "X" and (e.get("pid"), e.get("tid")) in tr.streams)
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


def hlo_sources(text):
  """{instruction name: "file:line function < caller"} from a compiled HLO module's text (each
  instruction's metadata: source_file/source_line, or stack_frame_id through the module's
  FileNames / FunctionNames / FileLocations / StackFrames tables). A fusion's entry is its
  root's: where the kernels of the trace, named after their instruction, come from."""
  tables, current = {}, None
  for line in text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      current = tables.setdefault(line, {})
      continue
    m = re.match(r"(\d+) (.*)$", line) if current is not None else None
    if m:
      current[int(m.group(1))] = m.group(2)
    else:
      current = None
  fields = lambda x: {a: int(b) for a, b in re.findall(r"(\w+)=(\d+)", x)}
  name_of = lambda table, i: tables.get(table, {}).get(i, "?").strip('"').replace(".<locals>", "")

  def frames(fid, depth=3):
    out = []
    while fid in tables.get("StackFrames", {}) and len(out) < depth:
      frame = fields(tables["StackFrames"][fid])
      loc = fields(tables.get("FileLocations", {}).get(frame.get("file_location_id"), ""))
      out.append(f"{os.path.basename(name_of('FileNames', loc.get('file_name_id')))}:"
                 f"{loc.get('line', '?')} {name_of('FunctionNames', loc.get('function_name_id'))}")
      # a frame's caller is the table's entry parent_frame_id - 1 (0: none), as checked against
      # the Python stack on jax 0.10's CPU modules (tests/test_kernels.py)
      parent = frame.get("parent_frame_id", 0) - 1
      fid = parent if 0 < parent != fid else None
    return " < ".join(out)

  out = {}
  for line in text.splitlines():
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*metadata=\{([^}]*)\}", line)
    if not m:
      continue
    meta = m.group(2)
    src = re.search(r'source_file="([^"]*)" source_line=(\d+)', meta)
    fid = re.search(r"stack_frame_id=(\d+)", meta)
    op = re.search(r'op_name="([^"]*)"', meta)
    where = (f"{os.path.basename(src.group(1))}:{src.group(2)}" if src
             else frames(int(fid.group(1))) if fid else "")
    if op:  # the op's path in the program (transformations, then the primitive), its tail
      where += f" [{'/'.join(op.group(1).split('/')[-3:])}]"
    name = re.sub(r"[.\-]", "_", m.group(1))  # as GPU kernels are named
    if where and not (":" in out.get(name, "") and ":" not in where):  # a line beats none
      out[name] = where.strip()
  return out


def source_of(sources, kernel):
  """The source of a trace's kernel name: XLA names a fusion's kernel after its instruction
  with '.' and '-' as '_' (loop_fusion.1 -> loop_fusion_1), a sort's kernels with suffixes
  (sort.3 -> sort_3_1, sort_3_1__2). Only a sort's name loses its last suffix: a fusion's
  (loop_fusion_1 -> loop_fusion) would name another fusion's line."""
  base = re.sub(r"__\d+$", "", kernel)
  sort = re.sub(r"_\d+$", "", base) if base.startswith("sort") else base
  return sources.get(kernel) or sources.get(base) or sources.get(sort, "")


STEP = "profile_gpu_step"  # the trace annotation around each synced call


def host_events(trace_path, top=30):
  """Where each synced call's wall time goes on the host (see the module's docstring)."""
  tr = load(trace_path)
  spans = [e for e in tr.events if e.get("ph") == "X"]
  steps = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in spans
                 if e.get("name") == STEP)
  if not steps:
    print(f"host events: no {STEP} annotations in the trace")
    return
  kernels = [(float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in spans
             if (e.get("pid"), e.get("tid")) in tr.streams]
  total, count, where = collections.Counter(), collections.Counter(), {}
  parts = collections.Counter()
  for a, b in steps:
    inside = [(s, t) for s, t in kernels if a <= s <= b]
    if inside:
      first, last = min(s for s, _ in inside), max(t for _, t in inside)
      parts["before the first kernel"] += first - a
      parts["first to last kernel"] += last - first
      parts["after the last kernel"] += b - last
    parts["wall"] += b - a
  for e in spans:
    if e.get("pid") in tr.device or e.get("name") == STEP:
      continue
    ts = float(e["ts"])
    if any(a <= ts <= b for a, b in steps):
      n = e.get("name", "?")
      total[n] += float(e.get("dur", 0))
      count[n] += 1
      where.setdefault(n, tr.threads.get((e["pid"], e.get("tid")), "?"))
  k = len(steps)
  print(f"host, per synced call (mean of {k}): " + ", ".join(
    f"{n} {parts[n] / k / 1e3:.3f} ms" for n in
    ("wall", "before the first kernel", "first to last kernel", "after the last kernel")))
  print(f"{'ms/call':>8} {'calls':>6}  host event (thread); nested events count in each")
  for n, t in total.most_common(top):
    print(f"{t / k / 1e3:8.3f} {count[n] / k:6.1f}  {n[:80]} ({where[n][:30]})")


# The step's own kernels by name (Mosaic GPU and Pallas Triton kernels carry their `name=`);
# everything else is XLA's (the routing, the merges of partial rows, sorts, the Triton fallbacks'
# kernels where they run).
BUDGET_PARTS = (("forward", "moba_mgpu_fwd"), ("dQ", "moba_mgpu_dq"), ("dK/dV", "moba_mgpu_dkdv"),
                ("gate", "moba_gate"))


def _part(name: str) -> str:
  return next((p for p, prefix in BUDGET_PARTS if name.startswith(prefix)), "other")


def budget(times) -> dict:
  """ms a step of each part of `BUDGET_PARTS` and "other" (the rest), from `kernel_times`."""
  out = {part: 0.0 for part, _ in BUDGET_PARTS} | {"other": 0.0}
  for name, (t, _, _) in times.items():
    out[_part(name)] += t
  return out


def budget_line(times) -> str:
  """One line: each part's ms a step, "other"'s two largest kernels named, the total."""
  parts = budget(times)
  others = sorted((n for n in times if _part(n) == "other"), key=lambda n: -times[n][0])
  named = ", ".join(f"{n[:40]} {times[n][0]:.3f}" for n in others[:2])
  body = ", ".join(f"{p} {t:.3f}" for p, t in parts.items())
  return f"budget (ms a step): {body} (largest: {named}); total {sum(parts.values()):.3f}"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--seq", type=int, default=32768)
  p.add_argument("--block", type=int, default=512)
  p.add_argument("--topk", type=int, default=3)
  p.add_argument("--gpu-block-sizes", default=None)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--out", default=None)
  p.add_argument("--top", type=int, default=40)
  p.add_argument("--docs", type=int, default=1,
                 help="documents packed in the row (bench.doc_lengths; 1: segment_ids None)")
  p.add_argument("--kv-heads", type=int, default=None,
                 help="kv heads of the 16 query heads (GQA; default 16)")
  p.add_argument("--dim", type=int, default=128, help="head_dim")
  p.add_argument("--impl", default="pallas_gpu", choices=("pallas_gpu", "cudnn", "full_xla"))
  p.add_argument("--host", type=int, default=0, metavar="N",
                 help="also the N host events with the most time per synced call")
  p.add_argument("--sources", action="store_true",
                 help="name each kernel's source line (its instruction's metadata in the HLO)")
  p.add_argument("--hlo", default=None, metavar="PATH",
                 help="also write the step's optimized HLO (the compiled module's text) to PATH")
  a = p.parse_args(argv)
  args = bench.parse_args(["--seqs", str(a.seq), "--dim", str(a.dim)]
                         + (["--kv-heads", str(a.kv_heads)] if a.kv_heads else []))
  fn = bench.make_fn(a.impl, a.block, a.topk, True, a.gpu_block_sizes)
  lengths = bench.doc_lengths(a.seq, a.docs)
  sets = [bench.inputs(s, args, a.seq, jnp.bfloat16, lengths) for s in range(1, a.steps + 3)]
  for s in sets[:2]:
    jax.block_until_ready(fn(*s))
  out = a.out or tempfile.mkdtemp()
  with jax.profiler.trace(out, create_perfetto_trace=True):
    for s in sets[2:]:
      with jax.profiler.TraceAnnotation(STEP):
        jax.block_until_ready(fn(*s))
  traces = glob.glob(os.path.join(out, "**", "perfetto_trace.json.gz"), recursive=True)
  if not traces:
    raise SystemExit(f"no trace written under {out}")
  times = kernel_times(max(traces, key=os.path.getmtime), a.steps)
  total = sum(t for t, _, _ in times.values())
  print(f"{a.impl} seq {a.seq} block {a.block} topk {a.topk} docs {a.docs} "
        f"heads 16/{args.kv_heads or 16} head_dim {a.dim} "
        f"sizes {a.gpu_block_sizes}: "
        f"device kernels {total:.3f} ms per step")
  hlo = fn.lower(*sets[0]).compile().as_text() if a.sources or a.hlo else ""
  if a.hlo:
    with open(a.hlo, "w") as f:
      f.write(hlo)
  sources = hlo_sources(hlo) if a.sources else {}
  print(f"{'ms/step':>8} {'share':>6} {'calls':>6}  kernel (hlo op)" + "  source" * a.sources)
  for name, (t, c, o) in sorted(times.items(), key=lambda x: -x[1][0])[:a.top]:
    src = f"  {source_of(sources, name)}" if a.sources else ""
    print(f"{t:8.3f} {100 * t / total:5.1f}% {c:6.1f}  {name[:70]} ({o[:60]}){src}")
  print(budget_line(times))
  idle_gaps(max(traces, key=os.path.getmtime), a.steps)
  if a.host:
    host_events(max(traces, key=os.path.getmtime), a.host)


if __name__ == "__main__":
  main()
