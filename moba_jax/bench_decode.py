"""`moba-jax bench --decode`: per-token decode attention, MoBA against full, over a full KV cache.

One decode step's attention (moba_jax/decode.py) for a batch of rows whose caches hold `cache`
tokens each: MoBA scores the block means and reads its chosen blocks only; full attention reads the
whole cache. Per (batch, cache length, implementation): the median ms per step (each call synced,
fresh random queries alternated over two sets, the cache random normal, never zeros), the bytes the
step must read (MoBA: the float32 block sums plus, per query head, its chosen blocks' keys and
values; full: every key and value) and the floor = bytes / bandwidth (--bandwidth, default the
4.3 TB/s a device-to-device copy measured on an H200 here; the datasheet says 4.8). With
--model, whole-model decode tokens/s of a random-weight decoder (all MoBA vs all full).

  moba-jax bench --decode                                  # the default table (H200 sizes)
  moba-jax bench --decode --caches 4096 --batches 1 --heads 2 --dim 16 --repeats 3   # CPU smoke
"""

from __future__ import annotations

import json
import math
import sys

import jax
import jax.numpy as jnp

from moba_jax.cli import OneLineParser, number_arg
from moba_jax import decode
from moba_jax.bench import (add_common_args, check_common, int_list, report_errors, time_ms,
                             write_rows)

DEFAULT_CACHES = (8192, 32768, 131072, 524288, 1048576)
MAX_BATCH16_CACHE = 262144  # batch 16 x 512K of bf16 K/V (16 heads x 128) is 64 GiB a layer


def parse_args(argv):
  p = OneLineParser(prog="moba-jax bench --decode", description=__doc__.split("\n\n")[0])
  p.add_argument("--caches", type=int_list, default=list(DEFAULT_CACHES), help="cache lengths")
  p.add_argument("--batches", type=int_list, default=[1, 16])
  add_common_args(p)  # --heads --kv-heads --dim --dtype --repeats --warmup --json, as bench's
  p.add_argument("--block", type=number_arg(int, 1), default=512)
  p.add_argument("--topk", type=number_arg(int, 1), default=3)
  p.add_argument("--bandwidth", type=number_arg(float, 1), default=4.3e12,
                 help="bytes/s of the floor")
  p.add_argument("--max-bytes", type=number_arg(float, 1), default=80e9,
                 help="skip shapes whose K/V cache is larger (bytes)")
  p.add_argument("--model", action="store_true", help="also time whole-model decode steps")
  p.add_argument("--decode-impls", type=lambda x: x.split(","), default=["xla", "auto"],
                 help="MoBA decode implementations (decode.DECODE_IMPLS), comma-separated")
  p.add_argument("--inner", type=number_arg(int, 1), default=100,
                 help="decode steps per device loop (the loop_ms column)")
  args = p.parse_args(argv)
  bad = [i for i in args.decode_impls if i not in decode.DECODE_IMPLS]
  if bad:
    p.error(f"--decode-impls: {bad} not in {list(decode.DECODE_IMPLS)}")
  check_common(p, args)
  return args


def read_bytes(impl: str, batch: int, cache: int, args) -> int:
  """The bytes one step must read (queries and outputs are negligible)."""
  kv_heads, item = args.kv_heads or args.heads, jnp.dtype(args.dtype).itemsize
  if impl.startswith("full"):
    return 2 * batch * cache * kv_heads * args.dim * item
  n_blocks = math.ceil(cache / args.block)
  chosen = min(args.topk, n_blocks) * args.block
  return (batch * n_blocks * kv_heads * args.dim * 4
          + 2 * batch * args.heads * chosen * args.dim * item)


def random_cache(batch: int, cache: int, args) -> decode.LayerCache:
  kv_heads, dt = args.kv_heads or args.heads, jnp.dtype(args.dtype)
  kk, kv = jax.random.split(jax.random.key(7))
  shape = (batch, cache, kv_heads, args.dim)
  k, v = jax.random.normal(kk, shape, dt), jax.random.normal(kv, shape, dt)
  n = jnp.full((batch,), cache, jnp.int32)
  sums = jax.jit(decode.block_key_sums, static_argnums=2)(k, n, args.block)
  return decode.LayerCache(k, v, sums)


def looped(step, inner: int):
  """A jitted fn(qs [Q, B, H, D], layer, n) running `inner` steps in one device loop, step i on
  qs[i % Q] (so no step can be hoisted or reused); its time / inner is the per-step device time
  without the host's dispatch and sync, which dominate one synced call of a decode step."""
  def run(qs, layer, n):
    def body(i, acc):
      return acc + step(qs[i % qs.shape[0]], layer, n).astype(jnp.float32).sum()
    return jax.lax.fori_loop(0, inner, body, jnp.float32(0))
  return jax.jit(run)


def bench_attention(args, batch: int, cache: int) -> list[dict]:
  layer = random_cache(batch, cache, args)
  n = jnp.full((batch,), cache, jnp.int32)
  qs = [jax.random.normal(jax.random.key(s), (batch, args.heads, args.dim), jnp.dtype(args.dtype))
        for s in (1, 2, 3, 4)]
  moba = lambda impl: (lambda q, c, n: decode.moba_step_attention(
      q, c, n, block_size=args.block, topk=args.topk, implementation=impl))
  name = lambda impl: decode.resolve_decode(impl, args.dim, args.block, layer.k.dtype)
  fns = {f"moba:{name(impl)}": moba(impl) for impl in args.decode_impls}
  fns["full"] = decode.full_step_attention
  rows = []
  for impl, fn in fns.items():
    ms = time_ms(jax.jit(fn), [(q, layer, n) for q in qs[:2]], args.warmup, args.repeats)
    loop = time_ms(looped(fn, args.inner), [(jnp.stack(qs), layer, n)], 1,
                   max(3, args.repeats // 4)) / args.inner
    floor = read_bytes(impl, batch, cache, args) / args.bandwidth * 1e3
    rows.append(dict(kind="attention", impl=impl, batch=batch, cache=cache, block=args.block,
                     topk=args.topk, heads=args.heads, dim=args.dim, ms=ms, loop_ms=loop,
                     floor_ms=floor, x_floor=loop / floor, tokens_per_s=batch / loop * 1e3))
  for r in rows[:-1]:
    r["speedup_vs_full"] = rows[-1]["loop_ms"] / r["loop_ms"]
  return rows


MODEL_MAX_TOKENS = 2 ** 19  # batch x cache of the whole-model rows: 8 layers' caches must fit


def bench_model(args, batch: int, cache: int) -> list[dict]:
  """Whole-model decode steps of a random-weight 8-layer decoder, all MoBA and all full, as
  generation runs them: each step donates the cache and gets it back one token longer (timed
  per step, each synced; the cache starts full but for the steps timed)."""
  import statistics
  import time

  from flax import nnx

  from moba_jax.config import MobaConfig, ModelConfig
  from moba_jax.model import Decoder

  cfg = ModelConfig(vocab_size=32768, d_model=2048, n_layers=8, n_heads=args.heads,
                    n_kv_heads=args.kv_heads or args.heads, head_dim=args.dim, mlp_dim=5632,
                    dtype=args.dtype, param_dtype=args.dtype)
  steps = args.warmup + args.repeats
  rows = []
  for impl, hfl in (("moba", 0), ("full", "all")):
    moba = MobaConfig(block_size=args.block, topk=args.topk, hybrid_full_layers=hfl)
    model = Decoder(cfg, moba, rngs=nnx.Rngs(0))
    base = random_cache(batch, cache, args)
    layers = tuple(decode.LayerCache(base.k + 0, base.v + 0,  # one buffer per layer (donated)
                                     base.block_sums + 0 if kind == "moba" else None)
                   for kind in model.layer_kinds)
    state = decode.Cache(jnp.full((batch,), cache - steps, jnp.int32), layers)
    del base, layers
    graphdef, params = nnx.split(model)
    step = jax.jit(lambda p, c, t: decode.decode_step(nnx.merge(graphdef, p), c, t),
                   donate_argnums=1)
    times, tokens = [], jnp.full((batch,), 5, jnp.int32)
    for i in range(steps):
      t0 = time.perf_counter()
      logits, state = step(params, state, tokens)
      jax.block_until_ready(logits)
      times.append((time.perf_counter() - t0) * 1e3)
    ms = statistics.median(times[args.warmup:])
    rows.append(dict(kind="model", impl=impl, batch=batch, cache=cache, layers=cfg.n_layers,
                     d_model=cfg.d_model, ms=ms, tokens_per_s=batch / ms * 1e3))
    del model, state
  rows[0]["speedup_vs_full"] = rows[1]["ms"] / rows[0]["ms"]
  return rows


def print_table(rows) -> None:
  """ms/call: one step dispatched and synced alone; loop ms: per step inside a device loop (what
  the floor and the speed-up compare)."""
  head = (f"{'kind':9s} {'impl':15s} {'batch':>5s} {'cache':>8s} {'ms/call':>9s} {'loop ms':>9s} "
          f"{'floor ms':>9s} {'x floor':>7s} {'tok/s':>10s} {'vs full':>7s}")
  print(head)
  print("-" * len(head))
  dash = lambda w: f"{'-':>{w}s}"
  for r in rows:
    if "error" in r:
      print(f"{r['kind']:9s} {r['impl']:15s} {r['batch']:5d} {r['cache']:8d} error: "
            f"{r['error'][:60]}")
      continue
    loop = f"{r['loop_ms']:9.4f}" if "loop_ms" in r else dash(9)
    floor = (f"{r['floor_ms']:9.4f} {r['x_floor']:7.2f}" if "floor_ms" in r
             else f"{dash(9)} {dash(7)}")
    speed = f"{r['speedup_vs_full']:7.1f}" if "speedup_vs_full" in r else dash(7)
    print(f"{r['kind']:9s} {r['impl']:15s} {r['batch']:5d} {r['cache']:8d} {r['ms']:9.4f} {loop} "
          f"{floor} {r['tokens_per_s']:10.1f} {speed}")
  sys.stdout.flush()


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, heads "
        f"{args.heads}/{args.kv_heads or args.heads}, head_dim {args.dim}, {args.dtype}, MoBA "
        f"block {args.block} top-{args.topk}", flush=True)
  rows = []
  for batch in args.batches:
    for cache in args.caches:
      if batch > 1 and cache > MAX_BATCH16_CACHE or \
          read_bytes("full", batch, cache, args) > args.max_bytes:
        continue
      model = args.model and batch * cache <= MODEL_MAX_TOKENS
      benches = [bench_attention] + ([bench_model] if model else [])
      for bench in benches:
        try:
          new = bench(args, batch, cache)
        except Exception as e:  # noqa: BLE001 - report and go on (OOM, unsupported platform)
          kind = "attention" if bench is bench_attention else "model"
          new = [dict(kind=kind, impl="both", batch=batch, cache=cache, error=repr(e)[-300:])]
        for r in new:
          print(json.dumps(r), flush=True)
        rows += new
  print_table(rows)
  written = write_rows(args.json, rows)
  return 1 if report_errors(rows) or not written else 0


if __name__ == "__main__":  # through the CLI: a command-line mistake is one line, not a traceback
  from moba_jax import cli as _cli
  sys.exit(_cli.main(["bench", "--decode", *sys.argv[1:]]))
