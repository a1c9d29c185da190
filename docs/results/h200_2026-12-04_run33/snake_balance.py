"""Per-CTA work of the row tiles, index order against snake rounds (run 33, kernel_notes.md).

A tile's work from run 33's trace (forward): an unmasked chunk 1, a masked one 1.5, the tile's
epilogue 0.45. The benchmark routings (batch 1, 16 heads, head_dim 128, random bf16 q and k) on
the CPU; 132 CTAs. Run from the repository root with the snake patch applied.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, ".")
from moba_jax.kernels import moba_mgpu as mm  # noqa: E402
from tests import helpers  # noqa: E402

C = 132
for seq, block, topk in [(8192, 512, 3), (32768, 512, 3), (131072, 512, 3), (16384, 128, 8),
                         (131072, 4096, 12)]:
  keys = jax.random.split(jax.random.key(1), 2)
  q = jax.random.normal(keys[0], (1, seq, 16, 128), jnp.bfloat16)
  k = jax.random.normal(keys[1], (1, seq, 16, 128), jnp.bfloat16)
  r, _ = helpers.route(q, k, None, block_size=block, topk=topk, block_q=128)
  nf = np.asarray(mm.free_chunks(r.tile_ks, r.tile_ke, r.lo, r.hi, r.rq, 128))
  ks, ke = np.asarray(r.tile_ks) // 8 * 8, np.asarray(r.tile_ke)
  n = np.maximum(-(-(ke - ks) // 128), 0)
  nf = np.minimum(nf, n)
  work = (nf + 1.5 * (n - nf) + 0.45).reshape(-1)
  items = work.size
  i, c = np.arange(-(-items // C))[None, :], np.arange(C)[:, None]

  def load(t, mine):
    return np.where(mine, work[np.minimum(t, items - 1)], 0).sum(1)

  index = load(i * C + c, i < (items - 1 - c) // C + 1)
  snake = load(np.asarray(mm.snake_tile(jnp.asarray(i), jnp.asarray(c), C)),
               i < np.asarray(mm.snake_count(jnp.asarray(c), C, items)))
  print(f"{seq} b{block} k{topk}: {items} tiles ({items / C:.1f} a CTA): busiest CTA / mean, "
        f"index order {index.max() / index.mean():.3f}, snake {snake.max() / snake.mean():.3f}")
