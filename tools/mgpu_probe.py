"""What Mosaic GPU reaches on this card: JAX's own Hopper flash attention (Pallas `plgpu`: TMA,
wgmma, warp-specialised; jax.experimental.pallas.ops.gpu.attention_mgpu) against cuDNN, causal,
fwd and fwd+bwd, at the benchmark shapes (batch 1, 16 heads, head_dim 128, float16: its
bfloat16 path failed on jax 0.11.2, "src had type bfloat16 and dst had type float16").

A planning measurement for issue 14 (kernel_notes.md): if JAX's dense Mosaic GPU kernel runs near
cuDNN's rate here, MoBA's dense per-block tiles built the same way can too; the Triton-lowered
kernel reaches 0.3 of cuDNN's per-FLOP rate. Times: bench.time_ms (median, each call synced).

  python tools/mgpu_probe.py [--seqs 8192,32768]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from moba_jax.bench import int_list, time_ms


def attn_flops(seq, heads, dim, causal):
  return 4 * seq * seq / (2 if causal else 1) * dim * heads


def main():
  from jax.experimental.pallas.ops.gpu import attention_mgpu as mg

  p = argparse.ArgumentParser()
  p.add_argument("--seqs", type=int_list, default=[8192, 32768])
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--causal", type=int, default=1, help="0: non-causal (MoBA's past blocks)")
  p.add_argument("--dtype", default="float16", help="attention_mgpu (jax 0.11.2) fails on bfloat16")
  args = p.parse_args()
  heads, dim = 16, 128
  rows = []
  for seq in args.seqs:
    sets = []
    for s in (1, 2):
      ks = jax.random.split(jax.random.key(s), 4)
      sets.append([jax.random.normal(k, (1, seq, heads, dim), jnp.dtype(args.dtype)) for k in ks])
    impls = {"cudnn": lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=bool(args.causal), implementation="cudnn")}
    for bq, bkv in ((64, 64), (64, 128), (128, 128)):
      cfg = mg.TuningConfig(block_q=bq, block_kv=bkv, max_concurrent_steps=2,
                            causal=bool(args.causal), block_q_dkv=64, block_kv_dkv=64,
                            block_q_dq=64, block_kv_dq=64)
      # attention_mgpu applies no softmax scale: scale q so both compute the same function
      impls[f"mgpu q{bq} kv{bkv}"] = lambda q, k, v, cfg=cfg: mg.attention(
          q * jnp.asarray(dim ** -0.5, q.dtype), k, v, cfg)
    want = None
    for name, fn in impls.items():
      fwd = jax.jit(fn)
      step = jax.jit(lambda q, k, v, do, fn=fn: jax.vjp(fn, q, k, v)[1](do))
      row = dict(impl=name, seq=seq)
      try:
        out = np.asarray(fwd(*sets[0][:3]), np.float32)
        want = out if want is None else want
        row["rel_err_vs_cudnn"] = float(np.abs(out - want).max() / np.abs(want).max())
        row["fwd_ms"] = time_ms(fwd, [s[:3] for s in sets], 2, args.repeats)
        row["fwd_tflops"] = attn_flops(seq, heads, dim, args.causal) / row["fwd_ms"] / 1e9
        row["fwdbwd_ms"] = time_ms(step, sets, 2, args.repeats)
        row["fwdbwd_tflops"] = 3.5 * attn_flops(seq, heads, dim, args.causal) / row["fwdbwd_ms"] / 1e9
      except Exception as e:  # noqa: BLE001 - a config this card or JAX refuses: say so
        row["error"] = repr(e)[:300]
      rows.append(row)
      print(json.dumps(row), flush=True)
  print(f"{'impl':18s} {'seq':>6s} {'fwd ms':>8s} {'TF/s':>6s} {'f+b ms':>8s} {'TF/s':>6s}")
  for r in rows:
    if "error" in r:
      fwd = f"fwd {r['fwd_ms']:.3f} ms {r['fwd_tflops']:.0f} TF/s, " if "fwd_ms" in r else ""
      print(f"{r['impl']:18s} {r['seq']:6d} {fwd}error: {r['error'][:80]}")
      continue
    print(f"{r['impl']:18s} {r['seq']:6d} {r['fwd_ms']:8.3f} {r['fwd_tflops']:6.0f} "
          f"{r['fwdbwd_ms']:8.3f} {r['fwdbwd_tflops']:6.0f}  rel err {r['rel_err_vs_cudnn']:.1e}")


if __name__ == "__main__":
  main()
