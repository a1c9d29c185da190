"""`moba-jax bench`: time MoBA implementations against full attention (docs/benchmarks.md).

Prints, per (seq, block, topk, implementation): fwd and fwd+bwd median ms, effective TFLOP/s
(4 x attended (query, key) pairs x head_dim x heads / time; x3.5 for fwd+bwd) and the compiled
peak device memory of the fwd+bwd step (arguments + outputs + temporaries, from XLA's memory
analysis). With a row of the platform's full-attention kernel at the same length (cuDNN on a GPU,
`splash` on a TPU), each MoBA row also gets its ratios to it (time, per-FLOP efficiency, memory)
and to the physical floor: its attended pairs at that kernel's measured time per pair (`floor
ms`; `x floor` = time / floor). Inputs are fresh random normals (two sets,
alternated), never zeros; warm-up first;
each timing is the median of `--repeats` calls, each closed by block_until_ready.

  moba-jax bench                                # the default table (H200 sizes)
  moba-jax bench --seqs 256 --heads 2 --dim 16 --configs 64:2 --impls xla --repeats 3
  moba-jax bench --impls pallas_tpu,splash --tiles 128,128,128,512  # on a TPU, set windows
  moba-jax bench --decode ...                   # decode steps over a KV cache (bench_decode.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from moba_jax.cli import OneLineParser, number_arg
from moba_jax import attention as attn
from moba_jax import flops
from moba_jax import moba as moba_lib
from moba_jax import rundir

DEFAULT_CASES = [(8192, 512, 3), (16384, 128, 8), (32768, 512, 3), (131072, 512, 3),
                 (131072, 2048, 3), (131072, 4096, 12)]
DEFAULT_IMPLS = "pallas_gpu,xla,cudnn"
FULL_IMPLS = ("cudnn", "splash", "full_xla")  # full attention (`attention.full_attention`'s names
# but "full_xla"); the first two are the platforms' kernels the ratios and floor are taken against
# fwd+bwd targets of issue 14 (one H200, batch 1, 16 heads, head_dim 128, bf16, each call synced).
TARGETS_MS = {(8192, 512, 3): 1.5, (16384, 128, 8): 2.5, (32768, 512, 3): 3.0,
              (131072, 512, 3): 12.0, (131072, 4096, 12): 320.0}


def int_list(text: str, sep: str = ",") -> list[int]:
  try:
    values = [int(x) for x in text.split(sep)]
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r} must be integers separated by {sep!r}") from None
  if any(v < 1 for v in values):
    raise argparse.ArgumentTypeError(f"{text!r}: every value must be >= 1")
  return values


def _seqs(text: str) -> str:
  int_list(text)
  return text


def _configs(text: str) -> str:
  for c in text.split(","):
    if len(int_list(c, ":")) != 2:
      raise argparse.ArgumentTypeError(f"{c!r} must look like BLOCK:TOPK, e.g. 512:3")
  return text


def _positive(text: str) -> int:
  values = int_list(text)
  if len(values) != 1:
    raise argparse.ArgumentTypeError(f"{text!r} must be one integer >= 1")
  return values[0]


def _impls(text: str) -> str:
  valid = set(attn.implementations("moba")) - {"auto"} | set(FULL_IMPLS)
  names = text.split(",")
  bad = [x for x in names if x not in valid]
  if bad:
    raise argparse.ArgumentTypeError(f"{bad[0]!r} is not one of {sorted(valid)}")
  twice = sorted({x for x in names if names.count(x) > 1})
  if twice:
    raise argparse.ArgumentTypeError(f"{text!r} names {twice[0]!r} twice")
  return text


def _xla_option(text: str) -> tuple[str, str]:
  name, eq, value = text.partition("=")
  if not eq or not name.startswith("xla_"):
    raise argparse.ArgumentTypeError(
        f"{text!r}: NAME=VALUE with an XLA option's name (xla_...), e.g. "
        "xla_gpu_enable_command_buffer= (an empty value clears a list option)")
  return name, value


def check_xla_options(options: dict[str, str]) -> str | None:
  """Why XLA refuses these compiler options (an unknown name, a bad value), or None: one tiny
  program compiled with them, before any row (XLA parses every platform's options anywhere)."""
  if not options:
    return None
  try:
    jax.jit(lambda x: x + 1, compiler_options=options)(jnp.zeros(()))
  except Exception as e:  # noqa: BLE001 - XLA's own message names the option
    return str(e).splitlines()[0]
  return None


def _tiles(text: str) -> str:
  try:
    values = [int(x) for x in text.split(",")]
  except ValueError:
    values = None
  if not values or any(v < 0 for v in values):
    raise argparse.ArgumentTypeError(f"{text!r} must be integers >= 0 separated by ','")
  return text


def tile_classes() -> dict:
  """Implementation -> the BlockSizes dataclass --tiles fills, field by field."""
  from moba_jax.kernels import moba_gpu, moba_tpu
  return {"pallas_gpu": moba_gpu.BlockSizes, "pallas_tpu": moba_tpu.BlockSizes}


def tiles_help() -> str:
  fields = {impl: ", ".join(f.name for f in dataclasses.fields(cls))
            for impl, cls in tile_classes().items()}
  return ("the pallas_gpu or pallas_tpu rows' tiles: comma-separated integers, the first fields "
          "of the kernel's BlockSizes in order (as moba.tiles), any number from the first up to "
          "all of them, the rest at the class defaults (without --tiles: the kernel's own "
          "defaults). " + "; ".join(f"{impl} ({fields[impl].count(',') + 1}): {fields[impl]}"
                                    for impl in TILED)
          + ". --gpu-block-sizes is the older name")


def tiles_error(impl: str, spec: str, dtype: str) -> str | None:
  """Why `impl`'s kernel refuses --tiles `spec` (too many, a value its BlockSizes refuses), or
  None: the checks the kernel makes of its tiles alone, made before any row runs."""
  try:
    sizes = tile_options(spec).block_sizes(tile_classes()[impl], None)
    if impl == "pallas_tpu":
      sizes.validate(jnp.dtype(dtype))
  except (TypeError, ValueError) as e:
    return f"{impl}: {e}"
  return None


def add_common_args(p: argparse.ArgumentParser) -> None:
  """The flags `bench` and `bench --decode` share, with the same types and defaults (each value
  checked by argparse: a mistake is one line naming the flag)."""
  p.add_argument("--heads", type=number_arg(int, 1), default=16)
  p.add_argument("--kv-heads", type=number_arg(int, 1), default=None, help="default: --heads")
  p.add_argument("--dim", type=number_arg(int, 1), default=128)
  p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
  p.add_argument("--repeats", type=number_arg(int, 1), default=20,
                 help="timed calls per measurement (their median)")
  p.add_argument("--warmup", type=number_arg(int, 0), default=3,
                 help="untimed calls before them")
  p.add_argument("--json", default=None, help="write the rows to this JSON file (its directory "
                 "must exist or be creatable: checked before any row runs)")


def check_common(p: argparse.ArgumentParser, args) -> None:
  """The checks of add_common_args' flags that take more than one value: one-line errors
  (p.error: cli.UsageError) before anything compiles."""
  if args.kv_heads and args.heads % args.kv_heads:
    p.error(f"--heads={args.heads} must be divisible by --kv-heads={args.kv_heads}")
  why = None if args.json is None else rundir.why_unwritable(args.json, directory=False)
  if why:
    p.error(f"--json {args.json!r}: {why}; it takes a file path whose directory exists or can "
            "be created")


def write_rows(path: str | None, rows: list[dict]) -> bool:
  """Writes the rows to --json (atomically); a failure there (the disk filled, the directory
  went away since the start) is one stderr line and False."""
  if path is None:
    return True
  try:
    rundir.atomic_write(path, json.dumps(rows, indent=1))
  except OSError as e:
    print(f"moba-jax bench: --json {path!r}: could not write the rows ({e.strerror or e}); they "
          "are printed above", file=sys.stderr)
    return False
  return True


def report_errors(rows: list[dict]) -> bool:
  """Whether a row failed (its error recorded in it: an OOM, a kernel this platform cannot run);
  if so, one stderr line saying how many."""
  failed = [r for r in rows if "error" in r]
  if failed:
    print(f"moba-jax bench: {len(failed)} of {len(rows)} rows failed (their errors are in the "
          "rows above)", file=sys.stderr)
  return bool(failed)


def parse_args(argv):
  p = OneLineParser(prog="moba-jax bench", description=__doc__.split("\n\n")[0])
  p.add_argument("--seqs", default=None, type=_seqs,
                 help="comma-separated sequence lengths (default: all)")
  p.add_argument("--configs", default=None, type=_configs,
                 help="comma-separated block:topk (default: 512:3, and 2048:3, 4096:12 at 128K)")
  p.add_argument("--impls", default=None, type=_impls,
                 help="MoBA implementations and/or 'cudnn' (GPU), 'splash' (TPU), 'full_xla' "
                      f"for full attention (default: {DEFAULT_IMPLS}; with --breakdown: "
                      "pallas_gpu, the only one it takes)")
  p.add_argument("--docs", type=_positive, default=1,
                 help="documents packed in each row of the MoBA rows (lengths drawn once from "
                      "a fixed seed; 1: one document, segment_ids None); cuDNN's row stays one "
                      "causal document, the per-pair rate of the floor; at most the shortest "
                      "--seqs")
  p.add_argument("--batch", type=number_arg(int, 1), default=1)
  add_common_args(p)
  p.add_argument("--pipeline", type=number_arg(int, 1), default=1,
                 help="calls dispatched back to back per timed sample (1: each call synced)")
  p.add_argument("--no-bwd", action="store_true", help="time the forward only")
  p.add_argument("--tiles", "--gpu-block-sizes", dest="tiles", default=None, type=_tiles,
                 help=tiles_help())
  p.add_argument("--xla-option", dest="xla_options", action="append", default=[],
                 type=_xla_option, metavar="NAME=VALUE",
                 help="an XLA compiler option of every row's jitted functions (repeatable; "
                      "`jax.jit(compiler_options=...)`: this program's, not the process's as "
                      "XLA_FLAGS), e.g. xla_gpu_enable_command_buffer= (XLA's CUDA graphs off: "
                      "docs/benchmarks.md, run 36's host share)")
  p.add_argument("--breakdown", action="store_true",
                 help="time pallas_gpu's stages apart (routing, forward, backward; one document "
                      "per row), compiled: needs a GPU")
  args = p.parse_args(argv)
  check_args(p, args)
  return args


def check_args(p: argparse.ArgumentParser, args) -> None:
  """Every check of the flags together, before anything compiles: p.error (cli.UsageError, one
  line naming the flag, the value and what is accepted). Sets args.impls' default."""
  check_common(p, args)
  if args.breakdown:
    if args.impls not in (None, "pallas_gpu"):
      p.error(f"--breakdown times pallas_gpu's stages only, not --impls {args.impls!r}: drop "
              "--impls or give --impls pallas_gpu")
    if args.docs > 1:
      p.error(f"--breakdown times one document per row, not --docs {args.docs}: drop --docs")
    args.impls = "pallas_gpu"
  args.impls_given, args.impls = args.impls, args.impls or DEFAULT_IMPLS
  impls = args.impls.split(",")
  if any(i not in FULL_IMPLS for i in impls):  # the rows --docs packs
    short = sorted({seq for seq, _, _ in cases(args) if seq < args.docs})
    if short:
      p.error(f"--docs={args.docs} must be at most the shortest sequence length (--seqs), "
              f"{short[0]}")
  if args.tiles:
    tiled = [i for i in impls if i in TILED]
    if not tiled:
      p.error(f"--tiles {args.tiles!r} sets the tiles of the {' and '.join(TILED)} rows, and "
              f"--impls {args.impls!r} has none")
    for impl in tiled:
      why = tiles_error(impl, args.tiles, args.dtype)
      if why:
        p.error(f"--tiles {args.tiles!r}: {why}")
  if args.breakdown and jax.default_backend() != "gpu":
    p.error("--breakdown times pallas_gpu's compiled kernels and needs a GPU; this process runs "
            f"on {jax.default_backend()}")


def cases(args):
  seqs = None if args.seqs is None else [int(s) for s in args.seqs.split(",")]
  if args.configs is None:
    chosen = [c for c in DEFAULT_CASES if seqs is None or c[0] in seqs]
    return chosen or [(s, 512, 3) for s in seqs]
  configs = [tuple(int(x) for x in c.split(":")) for c in args.configs.split(",")]
  return [(s, b, k) for s in (seqs or sorted({c[0] for c in DEFAULT_CASES})) for b, k in configs]


TILED = ("pallas_gpu", "pallas_tpu")  # the implementations --tiles applies to


def tile_options(spec: str | None) -> attn.KernelOptions:
  """--tiles "64,64,64,64,4,3[,4]" -> the options that give a Pallas kernel those tiles."""
  return attn.KernelOptions(tiles=tuple(int(x) for x in spec.split(",")) if spec else ())


def gpu_block_sizes(spec: str | None, dim: int = 128, dtype=jnp.bfloat16):
  """The moba_gpu.BlockSizes of --tiles (the kernel's default without one)."""
  from moba_jax.kernels import moba_gpu
  return tile_options(spec).block_sizes(moba_gpu.BlockSizes,
                                        moba_gpu.BlockSizes.get_default(dim, dtype))


def xla_jit(xla_options=None):
  """jax.jit with --xla-option's (name, value) pairs as its compile options."""
  return functools.partial(jax.jit, compiler_options=dict(xla_options or {}) or None)


def make_fn(impl, block, topk, bwd, tiles=None, xla_options=None):
  """The jitted forward fn(q, k, v, segment_ids) or fwd+bwd step fn(q, k, v, cot, segment_ids)
  (segment_ids: an argument, as a training step's data; None: one document per row). tiles:
  --tiles, for pallas_gpu and pallas_tpu; xla_options: --xla-option's (name, value) pairs."""
  jit = xla_jit(xla_options)
  if impl in TILED and tiles:
    fwd = lambda q, k, v, seg: attn.moba_attention(q, k, v, block_size=block, topk=topk,
                                                   segment_ids=seg, implementation=impl,
                                                   options=tile_options(tiles))
  elif impl in FULL_IMPLS:
    name = "xla" if impl == "full_xla" else impl
    fwd = lambda q, k, v, seg: attn.full_attention(q, k, v, segment_ids=seg, implementation=name)
  else:
    fwd = lambda q, k, v, seg: attn.moba_attention(q, k, v, block_size=block, topk=topk,
                                                   segment_ids=seg, implementation=impl)
  if not bwd:
    return jit(fwd)

  def step(q, k, v, cot, seg):
    out, vjp = jax.vjp(lambda q, k, v: fwd(q, k, v, seg), q, k, v)
    return vjp(cot)

  return jit(step)


def doc_lengths(seq: int, docs: int) -> list[int]:
  """`docs` document lengths (each >= 1) summing to seq: cuts drawn once from a fixed seed, so
  every run and implementation packs the same documents."""
  if not 1 <= docs <= seq:
    raise ValueError(f"--docs={docs} must be in [1, seq={seq}]")
  rng = np.random.default_rng(docs)
  cuts = np.sort(rng.choice(np.arange(1, seq), docs - 1, replace=False))
  return np.diff(np.concatenate([[0], cuts, [seq]])).astype(int).tolist()


def inputs(seed, args, seq, dtype, lengths=None):
  """(q, k, v, cot, segment_ids): fresh normals; segment_ids [B, T] for packed documents of
  these lengths in every row, None for one document per row."""
  kv_heads = args.kv_heads or args.heads
  ks = jax.random.split(jax.random.key(seed), 4)
  shape_q = (args.batch, seq, args.heads, args.dim)
  shape_k = (args.batch, seq, kv_heads, args.dim)
  seg = None
  if lengths is not None and len(lengths) > 1:
    ids = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    seg = jnp.asarray(np.broadcast_to(ids, (args.batch, seq)))
  return (jax.random.normal(ks[0], shape_q, dtype), jax.random.normal(ks[1], shape_k, dtype),
          jax.random.normal(ks[2], shape_k, dtype), jax.random.normal(ks[3], shape_q, dtype), seg)


def peak_bytes(fn, arg_sets):
  try:
    m = fn.lower(*arg_sets).compile().memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)
  except Exception:  # noqa: BLE001 - not every backend reports it
    return None


def time_ms(fn, arg_sets, warmup, repeats, pipeline=1):
  """Median ms per call. pipeline=1: each call is dispatched and waited for alone (includes the
  host's dispatch and sync latency); pipeline=P: P calls are dispatched back to back, as a
  training loop does, and one wait closes the group; the sample is the group's time / P."""
  for i in range(warmup):
    jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
  times = []
  for i in range(repeats):
    t0 = time.perf_counter()
    outs = [fn(*arg_sets[(i * pipeline + j) % len(arg_sets)]) for j in range(pipeline)]
    jax.block_until_ready(outs)
    times.append((time.perf_counter() - t0) * 1e3 / pipeline)
  return statistics.median(times)


def bench_one(args, impl, seq, block, topk):
  dtype = jnp.dtype(args.dtype)
  moba = impl not in FULL_IMPLS
  # full attention stays one causal document: the per-pair rate the floor is measured at
  lengths = doc_lengths(seq, args.docs) if moba else [seq]
  sets = [inputs(s, args, seq, dtype, lengths) for s in (1, 2)]
  pairs = flops.attended_pairs(lengths, "moba" if moba else "full", block, topk)
  flop = 4 * pairs * args.dim * args.heads * args.batch
  row = dict(impl=impl, pairs=pairs, seq=seq, docs=len(lengths),
             sizes=args.tiles if impl in TILED else None,
             block=block if moba else None, topk=topk if moba else None, heads=args.heads,
             dim=args.dim, dtype=args.dtype, pipeline=args.pipeline)
  if args.xla_options:
    row["xla_options"] = dict(args.xla_options)
  if len(lengths) > 1:
    row["doc_lengths"] = lengths
  fwd = make_fn(impl, block, topk, bwd=False, tiles=args.tiles, xla_options=args.xla_options)
  row["fwd_ms"] = time_ms(fwd, [s[:3] + s[4:] for s in sets], args.warmup, args.repeats,
                          args.pipeline)
  row["fwd_tflops"] = flop / row["fwd_ms"] / 1e9
  if not args.no_bwd:
    step = make_fn(impl, block, topk, bwd=True, tiles=args.tiles, xla_options=args.xla_options)
    row["fwdbwd_ms"] = time_ms(step, sets, args.warmup, args.repeats, args.pipeline)
    row["fwdbwd_tflops"] = 3.5 * flop / row["fwdbwd_ms"] / 1e9
    row["peak_gib"] = (lambda b: None if b is None else b / 2**30)(peak_bytes(step, sets[0]))
  if args.xla_options:
    row.update(options_max_diff(impl, block, topk, args, sets,
                                step if not args.no_bwd else fwd))
  row["target_fwdbwd_ms"] = (TARGETS_MS.get((seq, block, topk))
                             if impl == "pallas_gpu" and len(lengths) == 1 else None)
  return row


def options_max_diff(impl, block, topk, args, sets, fn) -> dict:
  """The row's fields comparing fn (the row's program under --xla-option, run again after its
  timing: its buffers have moved between calls many times by then) with the same program
  compiled with XLA's defaults, on both input sets. An option about launching (command buffers,
  their update modes) changes no number: `xla_options_max_diff` other than 0.0 is reported as a
  failure. Where the two differ, the cause may be the program's own: on a GPU, XLA's
  scatter-adds (the xla path's backward) add with atomics in an order that varies between calls.
  Then both are compiled again with XLA's deterministic ops (train_step.DETERMINISTIC_GPU) and
  these twins, each run through both input sets first, give the verdict; the timed program's
  difference is kept beside it."""
  from moba_jax.train_step import DETERMINISTIC_GPU
  bwd = not args.no_bwd
  args_of = lambda s: s if bwd else s[:3] + s[4:]

  def max_diff(f, g):
    diff = 0.0
    for s in sets:
      for x, y in zip(jax.tree.leaves(f(*args_of(s))), jax.tree.leaves(g(*args_of(s)))):
        d = jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)))
        diff = max(diff, float(jnp.nan_to_num(d, nan=jnp.inf)))
    return diff

  timed = max_diff(fn, make_fn(impl, block, topk, bwd=bwd, tiles=args.tiles))
  if timed == 0.0:
    return dict(xla_options_max_diff=0.0, xla_options_compared="timed program")
  det = list(DETERMINISTIC_GPU.items())
  twins = [make_fn(impl, block, topk, bwd=bwd, tiles=args.tiles, xla_options=options)
           for options in (list(args.xla_options) + det, det)]
  for twin in twins:
    for s in sets:
      jax.block_until_ready(twin(*args_of(s)))
  return dict(xla_options_max_diff=max_diff(*twins), xla_options_compared="deterministic twins",
              xla_options_timed_diff=timed)


def fmt(x, spec):
  return "-".rjust(int(spec.split(".")[0].rstrip("dfs") or 1)) if x is None else format(x, spec)


def add_ratios(rows) -> list[dict]:
  """Adds to each MoBA row with a full-attention kernel's row of the same length (cuDNN's, else
  splash's: the platform's; `full_ref` names it): vs_cudnn (fwd+bwd time ratio), eff_vs_cudnn
  (effective TF/s ratio), mem_vs_cudnn (peak memory ratio), floor_ms (the row's attended pairs
  at that kernel's measured fwd+bwd time per pair) and x_floor (time / floor)."""
  ref = {}
  for name in reversed(FULL_IMPLS[:2]):  # cuDNN's row wins where both are there
    ref.update({r["seq"]: r for r in rows if r.get("impl") == name and r.get("fwdbwd_ms")})
  for r in rows:
    c = ref.get(r.get("seq"))
    if c is None or r.get("impl") in FULL_IMPLS or not r.get("fwdbwd_ms"):
      continue
    r["full_ref"] = c["impl"]
    r["vs_cudnn"] = r["fwdbwd_ms"] / c["fwdbwd_ms"]
    r["eff_vs_cudnn"] = r["fwdbwd_tflops"] / c["fwdbwd_tflops"]
    if r.get("peak_gib") and c.get("peak_gib"):
      r["mem_vs_cudnn"] = r["peak_gib"] / c["peak_gib"]
    r["floor_ms"] = c["fwdbwd_ms"] * r["pairs"] / c["pairs"]
    r["x_floor"] = r["fwdbwd_ms"] / r["floor_ms"]
  return rows


def print_table(rows):
  rows = add_ratios(rows)
  # the ratios' reference: cuDNN's rows on a GPU, splash's on a TPU (`add_ratios`)
  ref = "/splash" if any(r.get("full_ref") == "splash" for r in rows) else "/cuDNN"
  head = (f"{'impl':11s} {'seq':>7s} {'blk':>5s} {'topk':>4s} {'docs':>4s} {'fwd ms':>9s} "
          f"{'TF/s':>6s} "
          f"{'f+b ms':>9s} {'TF/s':>6s} {'peak GiB':>8s} {'target':>6s} {ref:>6s} "
          f"{'eff':>5s} {'mem':>5s} {'floor ms':>8s} {'x floor':>7s}")
  print(head)
  print("-" * len(head))
  for r in rows:
    if "error" in r:
      print(f"{r['impl']:11s} {r['seq']:7d} {fmt(r['block'], '5d')} {fmt(r['topk'], '4d')} "
            f"error: {r['error'][:60]}")
      continue
    print(f"{r['impl']:11s} {r['seq']:7d} {fmt(r['block'], '5d')} {fmt(r['topk'], '4d')} "
          f"{fmt(r.get('docs'), '4d')} {r['fwd_ms']:9.3f} {r['fwd_tflops']:6.1f} "
          f"{fmt(r.get('fwdbwd_ms'), '9.3f')} "
          f"{fmt(r.get('fwdbwd_tflops'), '6.1f')} {fmt(r.get('peak_gib'), '8.2f')} "
          f"{fmt(r['target_fwdbwd_ms'], '6.1f')} {fmt(r.get('vs_cudnn'), '6.2f')} "
          f"{fmt(r.get('eff_vs_cudnn'), '5.2f')} {fmt(r.get('mem_vs_cudnn'), '5.2f')} "
          f"{fmt(r.get('floor_ms'), '8.3f')} {fmt(r.get('x_floor'), '7.2f')}")
  sys.stdout.flush()


def breakdown(args, seq, block, topk):
  """pallas_gpu stages timed apart: routing, forward with routing given, backward; one document
  per row (segment_ids None), as the table's rows without --docs. Compiled (not interpreted):
  `check_args` has refused it off a GPU."""
  from moba_jax.kernels import _routing as rt
  from moba_jax.kernels import moba_gpu as mg
  dtype = jnp.dtype(args.dtype)
  sets = [inputs(s, args, seq, dtype)[:4] for s in (1, 2)]
  sizes = gpu_block_sizes(args.tiles, args.dim, dtype)
  scale = args.dim ** -0.5
  jit = xla_jit(args.xla_options)
  routing = functools.partial(rt.route, segment_ids=None, block_size=block, topk=topk,
                              block_q=sizes.block_q)
  route = jit(lambda q, k: routing(q, k)[0])
  dims = rt.make_dims(seq, args.heads // (args.kv_heads or args.heads), block, topk, sizes.block_q,
                      one_doc=True)  # what `route` sizes for segment_ids None
  routed = [(*s, route(s[0], s[1])) for s in sets]
  fwd = jit(lambda q, k, v, cot, r: mg.forward(q, k, v, r, dims, sizes, scale, False))
  res = [(q, k, v, cot, r, *fwd(q, k, v, cot, r)[1]) for q, k, v, cot, r in routed]
  bwd = jit(lambda q, k, v, cot, r, o, lse: mg.backward(q, k, v, r, o, lse, cot, dims,
                                                          sizes, scale, False))
  kbar = jit(lambda k: moba_lib.slot_means(k, block))  # the one-document routing's gate keys
  row = dict(impl="pallas_gpu/breakdown", seq=seq, block=block, topk=topk, sizes=str(sizes),
             kbar_ms=time_ms(kbar, [s[1:2] for s in sets], args.warmup, args.repeats),
             route_ms=time_ms(route, [s[:2] for s in sets], args.warmup, args.repeats),
             fwd_no_route_ms=time_ms(fwd, routed, args.warmup, args.repeats),
             bwd_ms=time_ms(bwd, res, args.warmup, args.repeats))
  row.update(triton_side_by_side(args, dims, sizes, scale, routed))
  print(json.dumps(row), flush=True)
  return row


def triton_side_by_side(args, dims, sizes, scale, routed):
  """The forward kernel alone, Pallas against the same program in Triton through jax-triton
  (`kernels/moba_triton.py`), on the same routing: with Pallas' tiles, and autotuned. The Pallas
  kernel timed is the Triton-lowered forward (`moba_gpu.forward_rows`), also where the default
  forward is the Mosaic one (Hopper; then on its 128-row tiles)."""
  from moba_jax.kernels import moba_gpu as mg
  from moba_jax.kernels import moba_triton as mt
  if not mt.available():
    return {"triton": "not run: needs jax-triton, Triton and a GPU"}
  dp = mg.padded_head_dim(args.dim)
  flat = jax.jit(lambda q, k, v: tuple(mg.flat_rows(x, dp) for x in (q, k, v)))
  pallas_sets = [(r, *flat(q, k, v)) for q, k, v, _, r in routed]
  sets = [(r, *jax.jit(mt.prep)(q, k, v)) for q, k, v, _, r in routed]
  pallas = jax.jit(lambda r, qf, kf, vf: mg.forward_rows(r, dims, qf, kf, vf, sizes, scale, False))
  out = {"fwd_kernel_pallas_ms": time_ms(pallas, pallas_sets, args.warmup, args.repeats)}
  o_p, l_p = pallas(*pallas_sets[0])
  same = dict(BK=sizes.block_k, num_warps=sizes.num_warps, num_stages=sizes.num_stages)
  for name, fixed in (("triton_same_tiles", same), ("triton_autotuned", {})):
    try:
      fn = jax.jit(functools.partial(
          lambda r, qr, kr, vr, fixed: mt.forward_rows(r, dims, qr, kr, vr, scale, **fixed),
          fixed=fixed))
      out[f"fwd_kernel_{name}_ms"] = time_ms(fn, sets, args.warmup, args.repeats)
      o_t, l_t = fn(*sets[0])
      # rows routed to a query (padding rows are never read; the Pallas kernel skips their mask)
      live = (pallas_sets[0][0].rq >= 0) & jnp.isfinite(l_p)
      out[f"{name}_max_abs_diff"] = float(jnp.maximum(
          jnp.where(live[..., None], jnp.abs(o_t - o_p), 0).max(),
          jnp.where(live, jnp.abs(l_t - l_p), 0).max()))
    except Exception as e:  # noqa: BLE001 - jax-triton/Triton version mismatches: report them
      out[f"fwd_kernel_{name}_error"] = repr(e)[-1500:]  # the cause is at the end
  return out


def keep_runnable_impls(args) -> str | None:
  """Why the --impls asked for cannot run on this process's platform (a kernel of another,
  named with those that run here), or None; the default's rows of other platforms are dropped
  with a note (pallas_gpu and cudnn on a CPU), and a CPU without --seqs is told the default
  shapes' cost."""
  here = jax.default_backend()
  impls = args.impls.split(",")
  elsewhere = {i: attn.KERNEL_PLATFORM[i] for i in impls
               if attn.KERNEL_PLATFORM.get(i, here) != here}
  runs_here = [i for i in impls if i not in elsewhere]
  if elsewhere and (args.impls_given or not runs_here):
    i, platform = next(iter(elsewhere.items()))
    return (f"--impls {args.impls!r}: {i!r} compiles for {platform} and this process runs on "
            f"{here}; name those that run here (e.g. xla, full_xla, reference)")
  if elsewhere:
    args.impls = ",".join(runs_here)
    print(f"moba-jax bench: note: on {here} the default --impls times {args.impls} "
          f"({', '.join(elsewhere)}: {'/'.join(sorted(set(elsewhere.values())))} only)",
          file=sys.stderr)
  if here == "cpu" and args.seqs is None:
    print("moba-jax bench: note: the default shapes (8K to 128K tokens, 16 heads) take minutes "
          "a row on a cpu; --seqs 1024 --heads 2 is a quick look", file=sys.stderr)
  return None


def _vjp(fn, q, k, v, cot):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(cot))


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if "--decode" in argv:  # per-token decode attention (moba_jax/bench_decode.py)
    from moba_jax import bench_decode
    return bench_decode.main([a for a in argv if a != "--decode"])
  args = parse_args(argv)
  refused = check_xla_options(dict(args.xla_options))
  if refused:
    print(f"moba-jax bench: --xla-option refused by XLA: {refused}", file=sys.stderr)
    return 2
  why = None if args.breakdown else keep_runnable_impls(args)  # --breakdown: its own check
  if why:
    print(f"moba-jax bench: {why}", file=sys.stderr)
    return 2
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, batch {args.batch}, "
        f"heads {args.heads}/{args.kv_heads or args.heads}, head_dim {args.dim}, {args.dtype}"
        + "".join(f", {k}={v!r}" for k, v in args.xla_options))
  rows = []
  if args.breakdown:
    for seq, block, topk in cases(args):
      try:
        rows.append(breakdown(args, seq, block, topk))
      except Exception as e:  # noqa: BLE001 - report and go on (OOM)
        rows.append(dict(impl="pallas_gpu/breakdown", seq=seq, block=block, topk=topk,
                         error=repr(e)))
        print(json.dumps(rows[-1]), flush=True)
    written = write_rows(args.json, rows)
    return 1 if report_errors(rows) or not written else 0
  for seq, block, topk in cases(args):
    for impl in args.impls.split(","):
      if impl in FULL_IMPLS and any(r["impl"] == impl and r["seq"] == seq
                                               for r in rows):
        continue  # full attention does not depend on block/topk
      try:
        rows.append(bench_one(args, impl, seq, block, topk))
      except Exception as e:  # noqa: BLE001 - report and go on (OOM, unsupported platform)
        rows.append(dict(impl=impl, seq=seq, block=block, topk=topk, error=repr(e)))
      print(json.dumps(rows[-1]), flush=True)
  print_table(rows)  # adds the ratios to the rows
  changed = [r for r in rows if r.get("xla_options_max_diff")]
  for r in changed:
    print(f"--xla-option changed the results of {r['impl']} at seq {r['seq']}: up to "
          f"{r['xla_options_max_diff']:.3g} from XLA's defaults"
          + (" (both with XLA's deterministic ops)"
             if r["xla_options_compared"] == "deterministic twins" else ""), file=sys.stderr)
  written = write_rows(args.json, rows)
  failed = report_errors(rows)
  return 1 if changed or failed or not written else 0
