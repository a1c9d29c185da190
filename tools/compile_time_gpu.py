"""How long pallas_gpu's fwd+bwd step takes to compile, per tiles spec, and how fast it then runs.

usage: python tools/compile_time_gpu.py [--seq 1024 --block 64 --topk 3 --heads 4 --kv-heads 2
         --dim 128 --dtype float32] [--parallel 4] [SPEC ...]

Each SPEC is a `moba-jax bench --tiles` value ("-": the kernel's default) and runs in its own
process (no compile cache shared between specs), up to --parallel at a time: side by side
processes on a many-core host slow each other little (the table prints the host's load).
Per spec: jax.jit's lower and compile seconds of the step of `moba-jax bench` (q, k, v and the
output's cotangent -> dq, dk, dv), then the median of --repeats synced calls. Run 46 asked it
why float32 inputs (the Triton kernels with IEEE float32 dots) compiled for 17 s forward and 69 s
backward at a 37-token case on an H100 (docs/kernel_notes.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time


def one(args, spec: str) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from moba_jax import bench

  tiles = None if spec == "-" else spec
  fn = bench.make_fn("pallas_gpu", args.block, args.topk, bwd=True, tiles=tiles)
  sets = [bench.inputs(seed, args, args.seq, jnp.dtype(args.dtype)) for seed in range(2)]
  t0 = time.perf_counter()
  lowered = fn.lower(*sets[0])
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  grads = [np.asarray(g, np.float32) for g in compiled(*sets[0])]
  ms = bench.time_ms(compiled, sets, warmup=2, repeats=args.repeats)
  return {"spec": spec, "lower_s": t1 - t0, "compile_s": t2 - t1, "run_ms": ms,
          "grad_norms": [float(np.linalg.norm(g)) for g in grads],
          "device": jax.devices()[0].device_kind}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("specs", nargs="*", default=["-"])
  p.add_argument("--seq", type=int, default=1024)
  p.add_argument("--block", type=int, default=64)
  p.add_argument("--topk", type=int, default=3)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--heads", type=int, default=4)
  p.add_argument("--kv-heads", dest="kv_heads", type=int, default=2)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--parallel", type=int, default=4)
  p.add_argument("--one", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.one is not None:
    print(json.dumps(one(args, args.one)))
    return 0
  base = [a for a in (argv if argv is not None else sys.argv[1:]) if a not in args.specs]
  rows, running, pending = [], [], list(args.specs)
  while pending or running:
    while pending and len(running) < args.parallel:
      spec = pending.pop(0)
      running.append((spec, time.perf_counter(), subprocess.Popen(
          [sys.executable, __file__, *base, "--one", spec], stdout=subprocess.PIPE,
          stderr=subprocess.PIPE, text=True)))
    time.sleep(0.5)
    for item in list(running):
      spec, start, proc = item
      if proc.poll() is None:
        continue
      running.remove(item)
      out, err = proc.communicate()
      load = os.getloadavg()[0]
      try:
        row = json.loads(out.strip().splitlines()[-1])
      except (ValueError, IndexError):
        lines = err.strip().splitlines() or ["no output"]
        errors = [x for x in lines if re.match(r"[\w.]*(Error|Exception)\b", x)]
        row = {"spec": spec, "error": (errors or lines)[-1][:200]}
      row.update(wall_s=time.perf_counter() - start, load=load)
      rows.append(row)
      print(json.dumps(row), flush=True)
  print(f"\n{args.dtype} seq {args.seq} block {args.block} top-{args.topk} heads "
        f"{args.heads}/{args.kv_heads} head_dim {args.dim}, fwd+bwd step")
  print(f"{'tiles':28} {'lower s':>8} {'compile s':>10} {'run ms':>8} {'wall s':>7} {'load':>5}")
  for r in rows:
    if "error" in r:
      print(f"{r['spec']:28} error: {r['error']}")
    else:
      print(f"{r['spec']:28} {r['lower_s']:8.1f} {r['compile_s']:10.1f} {r['run_ms']:8.3f} "
            f"{r['wall_s']:7.1f} {r['load']:5.1f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
