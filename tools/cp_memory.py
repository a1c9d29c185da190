"""Per-device compiled memory and communication of context parallelism on n fake CPU devices
(moba_jax/context_parallel.py, all-gather of K/V) against one device: XLA's memory analysis
(arguments + outputs + temporaries - aliases) of one device's program.

  python tools/cp_memory.py [--seq 8192] [--block 256] [--topk 3] [--model] [--layers 4]
  python tools/cp_memory.py --estimate CONFIG.toml [--hbm-gib 95] [--link-gbs 200] [--tflops 459]
      [key=value ...]

Attention (MoBA fwd+bwd of one layer, float32, 8/8 heads x 64): MiB per device, the collective
bytes of the compiled program per layer (the arrays' whole sizes: each device sends or receives
(n-1)/n of them), and what exchanging only the chosen blocks would move (the remote blocks that
a shard's queries choose, counted on random q, k). --model: a whole decoder's loss and gradients
(data 1, context n), the sequence split through the mesh (mesh.context) and the dispatcher.
--estimate: arithmetic, no compiling: per-chip memory, bytes exchanged and step time of a run
config (its model, moba, train and mesh sections) under this implementation (docs/training.md),
for the MoBA path its moba.implementation names: the xla loop ("xla"), or a Pallas kernel with a
query offset ("pallas_tpu", "pallas_gpu"; "auto" counts as the kernel: what it resolves to on a
TPU or GPU).
"""

import argparse
import math
import os
import re

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from moba_jax import moba as M  # noqa: E402
from moba_jax.context_parallel import moba_context_parallel  # noqa: E402

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")
_OP = re.compile(r"= \(?([^=]*?)\)? (" + "|".join(COLLECTIVES) + r")(?:-start)?\(")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
_BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "s64": 8, "s32": 4, "u32": 4, "s8": 1, "u8": 1,
          "pred": 1}


def memory_mib(compiled):
  m = compiled.memory_analysis()
  total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
           - m.alias_size_in_bytes)
  return total / 2**20, m.temp_size_in_bytes / 2**20


def collective_bytes(hlo: str, n: int) -> dict:
  """Bytes per collective kind in an optimized HLO module: the gathered (or pre-scatter) size."""
  out = {}
  for shapes, op in _OP.findall(hlo):
    size = sum(_BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
               for dt, dims in _SHAPE.findall(shapes))
    out[op] = out.get(op, 0) + size * (n if op == "reduce-scatter" else 1)
  return out


def chosen_block_bytes(q, k, n, block, topk):
  """Bytes of K and V (float32) in blocks of other shards that some query of a shard chooses,
  summed over shards and kv heads (random q, k: a proxy, not a trained model's gate)."""
  seg = jnp.zeros(q.shape[:2], jnp.int32)
  layout = M.doc_layout(seg, block)
  starts, valid = M.select_blocks(q, M.block_key_means(k, layout, block_size=block), layout,
                                  block_size=block, topk=topk)
  starts, valid = np.asarray(starts[0]), np.asarray(valid[0])  # [T, H, S]
  seq, heads, kv_heads, dim = q.shape[1], q.shape[2], k.shape[2], k.shape[3]
  per = seq // n
  blocks = 0
  for i in range(n):
    for g in range(kv_heads):
      hs = slice(g * heads // kv_heads, (g + 1) * heads // kv_heads)
      s = starts[i * per:(i + 1) * per, hs][valid[i * per:(i + 1) * per, hs]]
      blocks += len({int(b) for b in s if not i * per <= b < (i + 1) * per})
  return blocks * block * dim * 2 * 4 / n  # per device


def grads_step(attn):
  def f(q, k, v, ct):
    out, vjp = jax.vjp(attn, q, k, v)
    return vjp(ct)
  return f


def attention_table(args):
  shape = (1, args.seq, 8, 64)
  q, k = jax.random.normal(jax.random.key(0), shape), jax.random.normal(jax.random.key(1), shape)
  v = ct = q
  kw = dict(block_size=args.block, topk=args.topk)
  print(f"attention: seq {args.seq}, 8/8 heads x 64, float32, block {args.block} "
        f"top-{args.topk}, fwd+bwd of one layer")
  print(f"{'devices':>7s} {'MiB/device':>10s} {'temp MiB':>9s} {'all-gather MiB':>14s} "
        f"{'reduce-scatter MiB':>18s} {'chosen-block MiB/device':>23s}")
  one = grads_step(lambda q, k, v: M.moba_xla(q, k, v, jnp.zeros((1, args.seq), jnp.int32), **kw))
  total, temp = memory_mib(jax.jit(one).lower(q, k, v, ct).compile())
  print(f"{1:7d} {total:10.1f} {temp:9.1f}")
  for n in (2, 4, 8):
    mesh = jax.make_mesh((n,), ("context",), devices=jax.devices()[:n])
    cp = grads_step(lambda q, k, v, mesh=mesh: moba_context_parallel(
        q, k, v, None, mesh=mesh, axis="context", **kw))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "context"))
    compiled = jax.jit(cp).lower(*(jax.device_put(x, spec) for x in (q, k, v, ct))).compile()
    total, temp = memory_mib(compiled)
    comm = collective_bytes(compiled.as_text(), n)
    chosen = chosen_block_bytes(q, k, n, args.block, args.topk)
    print(f"{n:7d} {total:10.1f} {temp:9.1f} {comm.get('all-gather', 0) / 2**20:14.1f} "
          f"{comm.get('reduce-scatter', 0) / 2**20:18.1f} {chosen / 2**20:23.1f}")


def model_table(args):
  from flax import nnx

  from moba_jax import config as C
  from moba_jax import sharding as S
  from moba_jax import train_step as ts
  from moba_jax.model import Decoder

  cfg = C.load_config(None, [f"model.n_layers={args.layers}", "model.d_model=512",
                             "model.mlp_dim=1536", "model.n_heads=8", "model.n_kv_heads=8",
                             "model.head_dim=64", f"moba.block_size={args.block}",
                             f"moba.topk={args.topk}", f"train.seq_len={args.seq}",
                             "train.batch_size=1", "moba.implementation=xla"])
  graph, params = nnx.split(nnx.eval_shape(lambda: Decoder(cfg.model, cfg.moba,
                                                             rngs=nnx.Rngs(0))))
  batch = {key: jax.ShapeDtypeStruct((1, args.seq), jnp.int32)
           for key in ("inputs", "targets", "segment_ids", "positions")}
  batch["mask"] = jax.ShapeDtypeStruct((1, args.seq), jnp.float32)

  def loss_grads(params, batch):
    return nnx.grad(lambda m: ts.loss_fn(m, batch)[0])(nnx.merge(graph, params))

  print(f"model: {args.layers} layers (all MoBA, xla), d_model 512, 8/8 heads x 64, mlp 1536, "
        f"seq {args.seq}, float32, loss + grads")
  print(f"{'context':>7s} {'MiB/device':>10s} {'temp MiB':>9s}")
  for n in (1, 2, 4, 8):
    mesh_cfg = C.MeshConfig(data=1, context=n)
    mesh = S.make_mesh(mesh_cfg, jax.devices()[:n])
    rules = S.rules_from_config(mesh_cfg)
    with S.activate(mesh, rules):
      p_sh = S.state_shardings(params, mesh, rules)
      b_sh = S.batch_sharding(mesh, rules)
      compiled = jax.jit(loss_grads, in_shardings=(p_sh, b_sh)).lower(params, batch).compile()
    total, temp = memory_mib(compiled)
    print(f"{n:7d} {total:10.1f} {temp:9.1f}")


def _moba_path(cfg) -> str:
  impl = cfg.moba.implementation
  return "xla" if impl in ("xla", "reference") else "pallas_tpu" if impl == "auto" else impl


def _attention_buffers(cfg, b_local, t_local, kv) -> dict:
  """Bytes of one MoBA layer's attention buffers per chip (fwd+bwd peak, arithmetic) by path."""
  from moba_jax.kernels import _routing as rt

  m, path = cfg.model, _moba_path(cfg)
  if path == "xla":
    return {"float32 copies of the gathered K, V and dK, dV (float32)": 4 * kv * 4,
            "block means (float32, [T, K, D] as the xla path stores them)": kv * 4}
  shape = (b_local, t_local, m.n_heads, m.head_dim)
  n_sel = min(cfg.moba.topk, math.ceil(cfg.train.seq_len / cfg.moba.block_size))
  chunks = rt.kv_head_chunks(shape, m.n_kv_heads, cfg.moba.block_size, cfg.moba.topk,
                             cfg.train.seq_len)
  out = {"dK, dV of all T keys (float32, before the reduce-scatter)": 2 * kv * 4,
         "block means (float32, [T, K, D]; packed batches)": kv * 4,
         "partial rows (float32, one kv-head chunk of the kernel)":
             4 * math.prod(shape) * n_sel // chunks}
  # TPU: past-block dK/dV come out per group and are scattered onto keys; GPU: so do the groups
  # not aligned to its 64-key tiles (packed documents starting off that grid)
  out["past-block dK, dV before they are added (float32)"] = 2 * kv * 4
  return out


def estimate(path, hbm_gib, link_gbs, tflops, mfu, overrides=()):
  """Per-chip memory (GiB), attention bytes exchanged and time of one step of config `path`."""
  from moba_jax.config import load_config

  cfg = load_config(path, overrides)
  m, mesh, t = cfg.model, cfg.mesh, cfg.train.seq_len
  n, tp, shards = mesh.context, mesh.tensor, mesh.data * mesh.fsdp
  chips = shards * n * tp
  b_local, t_local, cb = cfg.train.batch_size // shards, t // n, jnp.dtype(m.dtype).itemsize
  attn_p = m.d_model * (m.n_heads + 2 * m.n_kv_heads) * m.head_dim + m.n_heads * m.head_dim * \
      m.d_model
  layer_p = attn_p + 3 * m.d_model * m.mlp_dim
  params = m.n_layers * layer_p + m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2)
  kv = b_local * t * m.n_kv_heads * m.head_dim  # elements of one gathered K (or V)
  gib = {
      "params f32 + AdamW + grads f32 (sharded over every chip)": 16 * params / chips,
      "stored layer inputs (remat)": m.n_layers * b_local * t_local * m.d_model * cb,
      "gathered K, V (compute dtype)": 2 * kv * cb,
      **_attention_buffers(cfg, b_local, t_local, kv),
      "one layer's local activations and MLP (x 3 for the backward)":
          3 * b_local * t_local * (4 * m.d_model + 3 * m.mlp_dim // tp) * cb,
      "logits and their gradient (float32)": 2 * b_local * t_local * m.vocab_size // tp * 4,
  }
  print(f"{path} {' '.join(overrides)}: {chips} chips (data x fsdp x context x tensor = "
        f"{mesh.data} x {mesh.fsdp} x {n} x {tp}), {params / 1e9:.2f}B parameters, "
        f"{cfg.train.batch_size} x {t:,} tokens, MoBA {_moba_path(cfg)}")
  for key, value in gib.items():
    print(f"  {value / 2**30:9.2f} GiB  {key}")
  total = sum(gib.values()) / 2**30
  print(f"  {total:9.2f} GiB  per chip (HBM {hbm_gib} GiB)")
  gather = (n - 1) / n * 2 * kv * cb  # K and V in, per layer, forward
  scatter = (n - 1) / n * 2 * kv * 4  # dK, dV out, float32, backward
  sparse = min(t, cfg.moba.topk * cfg.moba.block_size)
  moba_layers = m.n_layers - (m.n_layers if cfg.moba.hybrid_full_layers == "all"
                              else cfg.moba.hybrid_full_layers)
  pairs = moba_layers * t * sparse + (m.n_layers - moba_layers) * t * t / 2  # per sequence
  flops = cfg.train.batch_size * (6 * t * (params - m.vocab_size * m.d_model)
                                  + 12 * pairs * m.n_heads * m.head_dim) / chips
  comm = m.n_layers * (gather + scatter)
  print(f"  per layer and chip: all-gather {gather / 2**30:.2f} GiB (forward), reduce-scatter "
        f"{scatter / 2**30:.2f} GiB (backward); {comm / 2**30:.1f} GiB a step = "
        f"{comm / (link_gbs * 1e9):.1f} s at {link_gbs} GB/s")
  print(f"  compute: {flops / 1e15:.1f} PFLOP a chip = {flops / (tflops * 1e12 * mfu):.1f} s at "
        f"{mfu:.0%} of {tflops} TFLOP/s")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--seq", type=int, default=8192)
  p.add_argument("--block", type=int, default=256)
  p.add_argument("--topk", type=int, default=3)
  p.add_argument("--model", action="store_true", help="a whole decoder instead of one layer")
  p.add_argument("--layers", type=int, default=4)
  p.add_argument("--estimate", metavar="CONFIG", help="estimate a run config instead")
  p.add_argument("--hbm-gib", type=float, default=95.0)  # TPU v5p
  p.add_argument("--link-gbs", type=float, default=200.0)  # an assumption: docs/training.md
  p.add_argument("--tflops", type=float, default=459.0)
  p.add_argument("--mfu", type=float, default=0.4)
  p.add_argument("overrides", nargs="*", help="key=value overrides of the --estimate config")
  args = p.parse_args()
  if args.estimate:
    estimate(args.estimate, args.hbm_gib, args.link_gbs, args.tflops, args.mfu, args.overrides)
  else:
    model_table(args) if args.model else attention_table(args)


if __name__ == "__main__":
  main()
