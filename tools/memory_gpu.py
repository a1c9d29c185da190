"""Where the fwd+bwd step's peak memory goes: XLA's plan for `moba-jax bench`'s jitted step.

usage: python tools/memory_gpu.py --seq 8192 [--block 512 --topk 3] [--impls pallas_gpu,cudnn]
         [--gpu-block-sizes 128,64,64,64,4,3,4,128,1,1,2] [--top 16] [--out DIR]

Compiles the step of `moba-jax bench` (batch 1, 16 heads, head_dim 128, bf16; nothing runs) for
each implementation with XLA's dumps on, prints `memory_analysis()` (arguments, outputs,
temporaries, and the peak the benchmark reports) and the buffers XLA counts live at the peak of
its plan, largest first, under the JAX operation that made each (the "stack trace breakdown for
peak usage" of the dump's live ranges). The dumps stay in DIR (default: a temporary directory).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
import tempfile

MiB = 2 ** 20


def peak_breakdown(text: str, top: int):
  """The "Stack trace breakdown for peak usage" of XLA's live-range dump: its total line and the
  `top` largest entries (JAX operation, bytes at the peak), tree marks dropped."""
  if "Stack trace breakdown for peak usage" not in text:
    return []
  lines = text.split("Stack trace breakdown for peak usage", 1)[1].splitlines()
  rows = []
  for line in lines[1:]:
    m = re.match(r"[\s│├└─]*(.+?) \(([\d.]+)%, total: ([\d\s]+) bytes, current: ([\d\s]+) bytes",
                 line)
    if m:
      depth = len(line) - len(line.lstrip(" │├└─"))
      rows.append((int(m[4].replace(" ", "")) / MiB, depth, m[1]))
  return ["total" + lines[0].strip().rstrip(":")] + [
      f"{mib:9.1f} MiB {'  ' * (depth // 8)}{name[-110:]}"
      for mib, depth, name in rows if mib >= 0.5][:top]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seq", type=int, default=8192)
  p.add_argument("--block", type=int, default=512)
  p.add_argument("--topk", type=int, default=3)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--impls", default="pallas_gpu,cudnn")
  p.add_argument("--gpu-block-sizes", default=None,
                 help="pallas_gpu's tiles, as `moba-jax bench --gpu-block-sizes`")
  p.add_argument("--top", type=int, default=16)
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  root = args.out or tempfile.mkdtemp(prefix="moba_mem_")
  for impl in args.impls.split(","):
    dump = os.path.join(root, impl)
    # the flags must be set before XLA compiles; a fresh process per implementation keeps the
    # dumps apart (XLA reads XLA_FLAGS once)
    if os.fork() == 0:
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                 f" --xla_dump_to={dump} --xla_dump_hlo_as_text").strip()
      report(impl, args, dump)
      os._exit(0)
    os.wait()
  print(f"dumps: {root}")


def report(impl, args, dump):
  import jax.numpy as jnp

  from moba_jax import bench

  ns = argparse.Namespace(batch=1, heads=args.heads, kv_heads=None, dim=args.dim)
  q, k, v, do = bench.inputs(1, ns, args.seq, jnp.bfloat16)
  step = bench.make_fn(impl, args.block, args.topk, bwd=True, tiles=args.gpu_block_sizes)
  m = step.lower(q, k, v, do).compile().memory_analysis()
  peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes \
      - m.alias_size_in_bytes
  tiles = f" tiles {args.gpu_block_sizes}" if impl == "pallas_gpu" and args.gpu_block_sizes else ""
  print(f"== {impl}{tiles} seq {args.seq} block {args.block} topk {args.topk}: peak {peak / MiB:.1f} "
        f"MiB = arguments {m.argument_size_in_bytes / MiB:.1f} + outputs "
        f"{m.output_size_in_bytes / MiB:.1f} + temporaries {m.temp_size_in_bytes / MiB:.1f} "
        f"- aliased {m.alias_size_in_bytes / MiB:.1f}")
  files = sorted(glob.glob(os.path.join(dump, "*jit_step*live-range.txt")), key=os.path.getsize)
  if not files:
    print(f"  no live-range dump of jit_step under {dump}")
    return
  rows = peak_breakdown(open(files[-1]).read(), args.top)
  if not rows:
    print(f"  {os.path.basename(files[-1])} has no peak breakdown")
  for row in rows:
    print("  " + row)
  sys.stdout.flush()


if __name__ == "__main__":
  main()
