"""Share of the forward and dQ key chunks (128 keys) that `_routing.free_chunks` counts whole,
by the CPU routing of the benchmark shapes (2 heads, head_dim 64, random normal q and k).
Run 37: `python docs/results/cpu_2026-12-05_run37/free_chunk_share.py` (free_chunk_share.txt)."""
import jax
import jax.numpy as jnp

from moba_jax.kernels import _routing as rt

for seq, block, topk in [(8192, 512, 3), (32768, 512, 3), (16384, 128, 8), (32768, 4096, 12)]:
  kq, kk = jax.random.split(jax.random.key(0), 2)
  q = jax.random.normal(kq, (1, seq, 2, 64), jnp.bfloat16)
  k = jax.random.normal(kk, (1, seq, 2, 64), jnp.bfloat16)
  r, _ = rt.route(q, k, None, block_size=block, topk=topk, block_q=128)
  nf = rt.free_chunks(r.tile_ks, r.tile_ke, r.lo, r.hi, r.rq, 128)
  n_all = jnp.maximum(-(-(r.tile_ke - r.tile_ks) // 128), 0)
  print(seq, block, topk, "free chunk share", float(nf.sum() / n_all.sum()))
