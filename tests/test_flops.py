"""FLOP counts: attended pairs against the dense masks the attention really applies; step FLOPs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moba_jax import config as C
from moba_jax import flops
from moba_jax import moba

moba_mask = jax.jit(moba.moba_mask, static_argnames=("block_size", "topk"))  # eager: seconds


def random_segments(rng, batch, seq, max_docs):
  """[B, T] segment ids: each row cut into 1..max_docs documents at random points."""
  rows = []
  for _ in range(batch):
    n_cuts = int(rng.integers(0, max_docs))
    cuts = np.sort(rng.choice(np.arange(1, seq), size=n_cuts, replace=False))
    rows.append(np.searchsorted(cuts, np.arange(seq), side="right") + 1)
  return np.stack(rows).astype(np.int32)


def test_doc_lengths():
  seg = np.array([[1, 1, 2, 2, 2, 1], [3, 3, 3, 3, 3, 3]])
  got = flops.doc_lengths(seg)
  assert [list(x) for x in got] == [[2, 3, 1], [6]]
  assert flops.attended_pairs([6], "full") == 21 == flops.attended_pairs([6], "moba", 6, 1)
  # Blocks of 2, top 2 over a 5-token document: own block's earlier keys + 1 whole past block.
  assert flops.attended_pairs([5], "moba", 2, 2) == 1 + 2 + (2 + 1) + (2 + 2) + (2 + 1)


def causal_same_doc(seg):
  """[B, T, T] bool: key in the query's document (maximal run of equal ids), not after it."""
  doc = np.cumsum(np.diff(seg, axis=1, prepend=seg[:, :1] - 1) != 0, axis=1)
  t = np.arange(seg.shape[1])
  return (doc[:, :, None] == doc[:, None, :]) & (t[:, None] >= t[None, :])


CASES = [  # (seq, block_size, topk, max_docs)
    (32, 4, 2, 1), (37, 4, 3, 1), (37, 5, 2, 3), (40, 8, 100, 2), (29, 3, 1, 4), (33, 16, 2, 3),
    (31, 1, 4, 2), (24, 32, 2, 1), (45, 6, 4, 5),
]


@pytest.mark.parametrize("seq, block_size, topk, max_docs", CASES)
def test_attended_pairs_count_the_attention_masks(seq, block_size, topk, max_docs):
  rng = np.random.default_rng([seq, block_size, topk, max_docs])
  batch, heads, kv_heads, dim = 2, 4, 2, 8
  q = jnp.asarray(rng.standard_normal((batch, seq, heads, dim)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((batch, seq, kv_heads, dim)), jnp.float32)
  seg = random_segments(rng, batch, seq, max_docs)
  lengths = np.concatenate(flops.doc_lengths(seg))
  assert lengths.sum() == batch * seq
  mask = np.asarray(moba_mask(q, k, jnp.asarray(seg), block_size=block_size, topk=topk))
  moba_pairs = flops.attended_pairs(lengths, "moba", block_size, topk)
  assert [int(mask[:, h].sum()) for h in range(heads)] == [moba_pairs] * heads
  full = causal_same_doc(seg)
  assert flops.attended_pairs(lengths, "full") == int(full.sum())
  assert np.all(mask <= full[:, None])  # MoBA attends a subset of the causal pairs
  n_blocks = -(-lengths // block_size)
  if np.all(n_blocks <= topk):
    assert moba_pairs == int(full.sum())
  elif np.any(n_blocks > topk):
    assert moba_pairs < int(full.sum())


def cfg_with(hfl, *extra):
  return C.load_config(None, ["model.n_layers=4", "model.n_heads=2", "model.n_kv_heads=1",
                              "model.head_dim=8", "model.d_model=16", "moba.block_size=16",
                              "moba.topk=2", "train.seq_len=128", "eval.trailing_tokens=16",
                              f"moba.hybrid_full_layers={hfl}", *extra])


def test_step_flops_per_layer_kind():
  params = 1000
  short = np.ones((2, 32), np.int32)  # 2 blocks <= topk: MoBA attends everything
  assert flops.step_flops(cfg_with(0), params, short) == flops.step_flops(cfg_with("all"), params,
                                                                          short)
  long = np.ones((2, 128), np.int32)  # 8 blocks > topk
  f = {h: flops.step_flops(cfg_with(h), params, long) for h in (0, 1, 2, 3, "all")}
  assert f[0] < f[1] < f[2] < f[3] < f["all"]
  # Each full layer adds the same amount: the attention term is per layer.
  steps = [f[1] - f[0], f[2] - f[1], f[3] - f[2], f["all"] - f[3]]
  assert np.allclose(steps, steps[0], rtol=1e-12)
  pairs_full = 2 * flops.attended_pairs([128], "full")
  pairs_moba = 2 * flops.attended_pairs([128], "moba", 16, 2)
  assert steps[0] == pytest.approx(12.0 * (pairs_full - pairs_moba) * 2 * 8)
  # Matrix products: 6 FLOPs per parameter per token.
  assert f[0] - flops.step_flops(cfg_with(0), 0, long) == pytest.approx(6.0 * params * 2 * 128)
  # Packed documents attend less than one document of the same length.
  packed = np.repeat(np.arange(4), 32)[None].repeat(2, 0)
  assert flops.step_flops(cfg_with("all"), params, packed) < f["all"]
  assert flops.step_flops(cfg_with(0), params, packed) == flops.step_flops(cfg_with("all"),
                                                                           params, packed)


def test_matmul_params_drop_an_untied_embedding():
  tied = C.load_config(None, ["model.tie_embeddings=true"])
  untied = C.load_config(None, ["model.tie_embeddings=false"])
  m = untied.model
  assert flops.matmul_params(tied, 10 ** 6) == 10 ** 6
  assert flops.matmul_params(untied, 10 ** 6) == 10 ** 6 - m.vocab_size * m.d_model
