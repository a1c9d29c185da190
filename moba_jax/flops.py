"""FLOPs a training step computes, counted per layer: MoBA's attended pairs, causal pairs for full.

  step_flops(cfg, matmul_params, segment_ids) -> FLOPs of one fwd+bwd step on that batch

Matrix products: 6 FLOPs per parameter per token (2 forward, 4 backward) over the parameters used
in products (the embedding table is a lookup; the head, or the tied embedding used as head, counts).
Attention: per layer and head, 4 * pairs * head_dim forward (q.k and p.v), times 3 for fwd+bwd,
where pairs counts the (query, key) pairs a query attends within its document: all earlier keys for
full attention; for MoBA its own block's earlier keys plus min(topk - 1, past blocks) whole blocks
(past blocks are always whole; only a document's last block is ragged). The MoBA gate (scores against
block means) is left out: under 1% of the step at the shapes in docs/. MFU = these FLOPs / time / peak.
"""

from __future__ import annotations

import numpy as np

from moba_jax.config import Config, layer_kinds


def doc_lengths(segment_ids: np.ndarray) -> list[np.ndarray]:
  """Lengths of the documents (maximal runs of equal ids) of each row of [B, T] segment ids."""
  out = []
  for row in np.asarray(segment_ids):
    starts = np.flatnonzero(np.diff(row, prepend=row[0] - 1))
    out.append(np.diff(np.append(starts, len(row))))
  return out


def attended_pairs(lengths, kind: str, block_size: int = 1, topk: int = 1) -> int:
  """(query, key) pairs one head attends over documents of these lengths (causal)."""
  total = 0
  for n in np.asarray(lengths, np.int64).ravel():
    t = np.arange(n, dtype=np.int64)
    if kind == "full":
      total += int(n * (n + 1) // 2)
    else:
      total += int((np.minimum(t // block_size, topk - 1) * block_size + t % block_size + 1).sum())
  return total


def step_flops(cfg: Config, matmul_params: int, segment_ids: np.ndarray) -> float:
  """Training FLOPs of one step over a [B, T] batch with these segment ids."""
  m, moba = cfg.model, cfg.moba
  lengths = np.concatenate(doc_lengths(segment_ids))
  per_kind = {kind: attended_pairs(lengths, kind, moba.block_size, moba.topk)
              for kind in set(layer_kinds(m.n_layers, moba.hybrid_full_layers))}
  pairs = sum(per_kind[k] for k in layer_kinds(m.n_layers, moba.hybrid_full_layers))
  tokens = int(np.asarray(segment_ids).size)
  return 6.0 * matmul_params * tokens + 12.0 * pairs * m.n_heads * m.head_dim


def matmul_params(cfg: Config, n_params: int) -> int:
  """Parameters used in matrix products: all but an untied embedding table."""
  m = cfg.model
  return n_params - (0 if m.tie_embeddings else m.vocab_size * m.d_model)
