"""Compiled temporary memory of MoBA implementations versus sequence length (no execution).

  python -m moba_jax.memory [--seqs 2048 8192 32768] [--impls reference xla] [--backward]

Reads `jax.jit(...).lower(...).compile().memory_analysis().temp_size_in_bytes` on the current
backend, so the figures are XLA's own plan for the buffers each implementation needs.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from moba_jax.attention import moba_attention
from moba_jax.moba import moba_xla


def temp_bytes(impl: str, seq: int, *, heads=16, kv_heads=16, head_dim=128, block_size=512,
               topk=3, dtype=jnp.bfloat16, backward=False, chunk_budget_bytes=None) -> int:
  """Temporary bytes XLA plans for one call (forward, or forward + backward).
  chunk_budget_bytes: the xla path's per-chunk budget (`moba.moba_xla`; None: its default)."""
  q = jax.ShapeDtypeStruct((1, seq, heads, head_dim), dtype)
  kv = jax.ShapeDtypeStruct((1, seq, kv_heads, head_dim), dtype)

  def fwd(q, k, v):
    if chunk_budget_bytes is not None:
      if impl != "xla":
        raise ValueError(f"chunk_budget_bytes is the xla path's, not {impl!r}'s")
      return moba_xla(q, k, v, None, block_size=block_size, topk=topk,
                      chunk_budget_bytes=chunk_budget_bytes)
    return moba_attention(q, k, v, block_size=block_size, topk=topk, implementation=impl)

  fn = jax.grad(lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32)),
                argnums=(0, 1, 2)) if backward else fwd
  analysis = jax.jit(fn).lower(q, kv, kv).compile().memory_analysis()
  return int(analysis.temp_size_in_bytes)


def main(argv=None) -> int:
  """A mistake (a flag, an implementation name, a shape the kernels refuse) prints one line and
  returns 2, as the moba-jax subcommands do."""
  from moba_jax.cli import OneLineParser, number_arg
  prog = "python -m moba_jax.memory"
  parser = OneLineParser(prog=prog, description=__doc__.splitlines()[0])
  parser.add_argument("--seqs", type=number_arg(int, 1), nargs="+", default=[2048, 8192, 32768])
  parser.add_argument("--impls", nargs="+", default=["reference", "xla"])
  parser.add_argument("--heads", type=number_arg(int, 1), default=16)
  parser.add_argument("--block-size", type=number_arg(int, 1), default=512)
  parser.add_argument("--topk", type=number_arg(int, 1), default=3)
  parser.add_argument("--backward", action="store_true", help="forward + backward")
  try:
    return _table(parser.parse_args(argv))
  except ValueError as e:  # UsageError included
    print(f"{prog}: {e}", file=sys.stderr)
    return 2


def _table(args) -> int:
  rows = {impl: [temp_bytes(impl, s, heads=args.heads, kv_heads=args.heads,
                            block_size=args.block_size, topk=args.topk, backward=args.backward)
                 for s in args.seqs] for impl in args.impls}  # a bad name fails before any output
  print(f"backend={jax.default_backend()} heads={args.heads} head_dim=128 bf16 "
        f"block={args.block_size} topk={args.topk} {'fwd+bwd' if args.backward else 'fwd'}")
  print("| impl | " + " | ".join(f"T={s}" for s in args.seqs) + " | growth per 4x T |")
  print("|---|" + "---|" * (len(args.seqs) + 1))
  for impl, sizes in rows.items():
    growth = (sizes[-1] / sizes[-2]) if len(sizes) > 1 and sizes[-2] else float("nan")
    print(f"| {impl} | " + " | ".join(f"{b / 2**20:.1f} MiB" for b in sizes)
          + f" | {growth:.1f}x |")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
