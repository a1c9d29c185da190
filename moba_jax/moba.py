"""MoBA semantics: document/block layout, gating, and the reference and XLA implementations.

Shapes follow one naming scheme throughout:
  B batch, T sequence (queries and keys), H query heads, K kv heads, G = H // K heads per group,
  D head_dim, N doc-local block slots (= ceil(T / block_size)), S selected blocks (= min(topk, N)),
  L block length (= block_size), C query chunk.

Semantics (docs/semantics.md): blocks restart at every document start (a document is a maximal run
of equal segment ids); the gate key of a block is the mean of the keys it really has; scores are
float32 dot products of each query head with its group's gate keys; the query's own block is always
chosen and is causally masked; future blocks are never chosen; the other topk - 1 choices are the
highest-scoring past blocks of the same document, ties going to the lower block index.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

# float32 inputs get true float32 products on every backend (GPUs default to TF32, which changes
# which of two near-tied blocks is chosen); bfloat16 products are unaffected.
HIGHEST = jax.lax.Precision.HIGHEST


class Layout(NamedTuple):
  """Per-token document and block bookkeeping, all [B, T] int32."""

  doc_start: jax.Array  # first position of the token's document
  doc_end: jax.Array  # one past the last position of the token's document
  block_index: jax.Array  # doc-local index of the token's block
  block_start: jax.Array  # absolute position where the token's block starts
  block_end: jax.Array  # one past the absolute position where the token's block ends


def doc_layout(segment_ids: jax.Array, block_size: int) -> Layout:
  """Documents are maximal runs of equal segment ids; blocks restart at each document start."""
  batch, seq = segment_ids.shape
  t = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
  starts_doc = jnp.concatenate(
      [jnp.ones((batch, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  ends_doc = jnp.concatenate([starts_doc[:, 1:], jnp.ones((batch, 1), bool)], axis=1)
  doc_start = jax.lax.cummax(jnp.where(starts_doc, t, 0), axis=1)
  doc_end = jax.lax.cummin(jnp.where(ends_doc, t + 1, seq), axis=1, reverse=True)
  block_index = (t - doc_start) // block_size
  block_start = doc_start + block_index * block_size
  block_end = jnp.minimum(block_start + block_size, doc_end)
  return Layout(doc_start, doc_end, block_index, block_start, block_end)


def slot_means(k: jax.Array, block_size: int) -> jax.Array:
  """Gate keys of sequences that are one document each: the mean of block j's keys
  [j * L, min((j + 1) * L, T)), float32 [B, N, K, D]. A reshape, no scatter."""
  batch, seq, kv_heads, dim = k.shape
  n_slots = math.ceil(seq / block_size)
  k32 = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, n_slots * block_size - seq), (0, 0), (0, 0)))
  sums = k32.reshape(batch, n_slots, block_size, kv_heads, dim).sum(axis=2)
  counts = jnp.minimum(seq - jnp.arange(n_slots) * block_size, block_size).astype(jnp.float32)
  return sums / counts[:, None, None]


def one_document(layout: Layout) -> jax.Array:
  """Scalar bool: every sequence of the batch is a single document."""
  return jnp.all(layout.doc_start == 0)


def segments(segment_ids: jax.Array | None, x: jax.Array) -> jax.Array:
  """segment_ids [B, T] int32 for x [B, T, ...]; None (one document per row, known when
  tracing) -> zeros."""
  if segment_ids is None:
    return jnp.zeros(x.shape[:2], jnp.int32)
  return segment_ids.astype(jnp.int32)


def block_key_means(k: jax.Array, layout: Layout, *, block_size: int) -> jax.Array:
  """Gate keys, float32, stored at each block's start position: [B, T, K, D].

  Entry p holds the mean of the keys of the block that starts at p (over the tokens the block
  really has); entries at positions that start no block are zero and never read. Batches of
  single documents take `slot_means` (the same sums every path uses for them); packed ones a
  segment sum over block starts.
  """
  seq = k.shape[1]

  def per_row(k_row, block_start_row):  # [T, K, D], [T]
    sums = jax.ops.segment_sum(k_row.astype(jnp.float32), block_start_row, num_segments=seq)
    counts = jax.ops.segment_sum(jnp.ones((seq,), jnp.float32), block_start_row, num_segments=seq)
    return sums / jnp.maximum(counts, 1.0)[:, None, None]

  def aligned():
    return jnp.zeros(k.shape, jnp.float32).at[:, ::block_size].set(slot_means(k, block_size))

  return jax.lax.cond(one_document(layout), aligned,
                      lambda: jax.vmap(per_row)(k, layout.block_start))


def select_blocks(q: jax.Array, kbar: jax.Array, layout: Layout, *, block_size: int, topk: int,
                  slot_kbar: jax.Array | None = None):
  """Top-k block choice of every (query, head), without gradient.

  Args:
    q: [B, C, H, D] a chunk of queries (C may be all of T).
    kbar: [B, T, K, D] gate keys from `block_key_means` (whole sequence).
    layout: the chunk's Layout entries, each [B, C].
    slot_kbar: optional [B, C or 1, N, K, D], the gate key of each query's document slot j (what
      this function gathers from kbar otherwise); a caller whose documents all start at 0 passes
      its block means directly (decoding: no gather, no copy).
  Returns:
    starts [B, C, H, S] int32 absolute start positions of the chosen blocks (the current block
    first), and valid [B, C, H, S] bool (False where fewer than S blocks exist).
  """
  batch, chunk, heads, dim = q.shape
  seq, kv_heads = kbar.shape[1], kbar.shape[2]
  n_slots = math.ceil(seq / block_size)
  n_sel = min(topk, n_slots)
  j = jnp.arange(n_slots, dtype=jnp.int32)
  if slot_kbar is None:
    slot_start = layout.doc_start[..., None] + j * block_size  # [B, C, N]
    slot_kbar = jax.vmap(lambda kb, idx: kb[jnp.clip(idx, 0, seq - 1)])(kbar, slot_start)
  # slot_kbar: [B, C, N, K, D]
  q_f32 = jax.lax.stop_gradient(q).astype(jnp.float32)
  q_grouped = q_f32.reshape(batch, chunk, kv_heads, heads // kv_heads, dim)
  scores = jnp.einsum("bckgd,bcnkd->bckgn", q_grouped, jax.lax.stop_gradient(slot_kbar),
                      precision=HIGHEST)
  scores = nan_ranks_high(scores.reshape(batch, chunk, heads, n_slots))  # [B, C, H, N]
  current = layout.block_index[..., None, None]  # [B, C, 1, 1]
  scores = jnp.where(j < current, scores, -jnp.inf)
  scores = jnp.where(j == current, jnp.inf, scores)
  top_scores, top_slots = jax.lax.top_k(scores, n_sel)  # ties: lower index first
  valid = top_scores > -jnp.inf
  starts = layout.doc_start[..., None, None] + top_slots.astype(jnp.int32) * block_size
  return starts, valid


def nan_ranks_high(scores):
  """A NaN gate score (a block with a NaN key) ranks above every number and below the current
  block's +inf, so the block is chosen and its NaN reaches the output, as in full attention and
  in the official code (torch.topk ranks NaN highest): a corrupt key is never dropped silently."""
  return jnp.where(jnp.isnan(scores), jnp.finfo(scores.dtype).max, scores)


def _default_scale(softmax_scale, head_dim):
  return head_dim ** -0.5 if softmax_scale is None else softmax_scale


def _same_doc_causal(layout: Layout) -> jax.Array:
  """[B, T(query), T(key)] bool: key in the query's document and not after it."""
  seq = layout.doc_start.shape[1]
  t = jnp.arange(seq)
  same_doc = layout.doc_start[:, :, None] == layout.doc_start[:, None, :]
  return same_doc & (t[None, :, None] >= t[None, None, :])


def _dense_attention(q, k, v, mask, softmax_scale):
  """Softmax attention in float32 under a [B, H, T, T] boolean mask; output in q's dtype."""
  batch, seq, heads, dim = q.shape
  kv_heads = k.shape[2]
  groups = heads // kv_heads
  q32 = q.astype(jnp.float32).reshape(batch, seq, kv_heads, groups, dim)
  logits = jnp.einsum("btkgd,bskd->bkgts", q32, k.astype(jnp.float32),
                      precision=HIGHEST) * softmax_scale
  logits = logits.reshape(batch, heads, seq, seq)  # [B, H, T, S]
  logits = jnp.where(mask, logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1).reshape(batch, kv_heads, groups, seq, seq)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(jnp.float32), precision=HIGHEST)
  return out.reshape(batch, seq, heads, dim).astype(q.dtype)


def moba_mask(q, k, segment_ids, *, block_size, topk) -> jax.Array:
  """[B, H, T(query), T(key)] bool: the (query, key) pairs MoBA attends."""
  layout = doc_layout(segments(segment_ids, q), block_size)
  kbar = block_key_means(k, layout, block_size=block_size)
  starts, valid = select_blocks(q, kbar, layout, block_size=block_size, topk=topk)
  # chosen[b, h, t, s]: key s's block start is one of query t's valid chosen starts.
  key_start = layout.block_start[:, None, None, :, None]  # [B, 1, 1, S, 1]
  chosen_starts = jnp.transpose(jnp.where(valid, starts, -1), (0, 2, 1, 3))[:, :, :, None, :]
  chosen = jnp.any(key_start == chosen_starts, axis=-1)  # [B, H, T, S]
  return chosen & _same_doc_causal(layout)[:, None]


def moba_reference(q, k, v, segment_ids, *, block_size, topk, softmax_scale=None, options=None):
  """The oracle: dense [B, H, T, T] mask built from the block choice, float32 softmax."""
  mask = moba_mask(q, k, segment_ids, block_size=block_size, topk=topk)
  return _dense_attention(q, k, v, mask, _default_scale(softmax_scale, q.shape[-1]))


def full_reference(q, k, v, segment_ids, *, softmax_scale=None):
  """Causal full attention within documents, dense float32."""
  layout = doc_layout(segment_ids, 1)
  mask = _same_doc_causal(layout)[:, None]
  return _dense_attention(q, k, v, mask, _default_scale(softmax_scale, q.shape[-1]))


# ----------------------------------------------------------------------------------------------
# XLA path: per query chunk, gather the chosen blocks' keys and values; nothing is [T, T].
# ----------------------------------------------------------------------------------------------

DEFAULT_CHUNK_BUDGET_BYTES = 64 * 2**20


def xla_chunk_size(batch, seq, heads, dim, n_sel, block_size, budget_bytes):
  """Queries per chunk so that one chunk's gathered keys (float32) fit the budget."""
  per_query = batch * heads * n_sel * block_size * dim * 4
  chunk = max(1, budget_bytes // per_query)
  chunk = 1 << (chunk.bit_length() - 1)  # a power of two
  return int(min(chunk, 1 << max(seq - 1, 0).bit_length()))


def _chunk_attention(q_c, t_c, layout_c, k, v, kbar, block_end_at, *, block_size, topk, scale):
  """MoBA for one chunk of queries. q_c [B, C, H, D]; t_c [C]; layout_c entries [B, C]."""
  batch, chunk, heads, dim = q_c.shape
  seq, kv_heads = k.shape[1], k.shape[2]
  starts, valid = select_blocks(q_c, kbar, layout_c, block_size=block_size, topk=topk)
  # Key positions of each chosen block: [B, C, H, S, L].
  offsets = jnp.arange(block_size, dtype=jnp.int32)
  pos = starts[..., None] + offsets
  ends = jax.vmap(lambda be, s: be[jnp.clip(s, 0, seq - 1)])(block_end_at, starts)
  keep = valid[..., None] & (pos < ends[..., None]) & (pos <= t_c[None, :, None, None, None])
  pos = jnp.clip(pos, 0, seq - 1)
  kv_head = jnp.arange(heads) // (heads // kv_heads)  # [H]

  def gather(x):  # x [B, T, K, D] -> [B, C, H, S, L, D]
    return jax.vmap(lambda xr, pr: xr[pr, kv_head[None, :, None, None]])(x, pos)

  k_sel, v_sel = gather(k), gather(v)
  logits = jnp.einsum("bchd,bchsld->bchsl", q_c, k_sel, precision=HIGHEST,
                      preferred_element_type=jnp.float32) * scale
  logits = jnp.where(keep, logits, -jnp.inf).reshape(batch, chunk, heads, -1)
  probs = jax.nn.softmax(logits, axis=-1).reshape(keep.shape)
  out = jnp.einsum("bchsl,bchsld->bchd", probs, v_sel.astype(jnp.float32), precision=HIGHEST)
  return out.astype(q_c.dtype)


def moba_xla(q, k, v, segment_ids, *, block_size, topk, softmax_scale=None, options=None,
             chunk_budget_bytes=DEFAULT_CHUNK_BUDGET_BYTES):
  """Block-gathered MoBA: memory O(T * topk * block_size) per chunk, rematerialized backward."""
  layout = doc_layout(segments(segment_ids, q), block_size)
  positions = jnp.arange(q.shape[1], dtype=jnp.int32)
  return attend_queries(q, positions, layout, layout, k, v, block_size=block_size, topk=topk,
                        softmax_scale=softmax_scale, chunk_budget_bytes=chunk_budget_bytes)


def attend_queries(q, positions, layout_q, layout, k, v, *, block_size, topk, softmax_scale=None,
                   chunk_budget_bytes=DEFAULT_CHUNK_BUDGET_BYTES):
  """MoBA of the queries q [B, Tq, H, D] at absolute positions [Tq] (layout_q: their Layout
  entries, [B, Tq] each) over all keys k, v [B, T, K, D] (layout: every position's): the xla
  path's chunked loop, also what each shard of `moba_jax.context_parallel` runs for its queries."""
  batch, n_q, heads, dim = q.shape
  seq = k.shape[1]
  scale = _default_scale(softmax_scale, dim)
  kbar = block_key_means(k, layout, block_size=block_size)
  n_sel = min(topk, math.ceil(seq / block_size))
  chunk = xla_chunk_size(batch, n_q, heads, dim, n_sel, block_size, chunk_budget_bytes)
  n_chunks = math.ceil(n_q / chunk)
  pad = n_chunks * chunk - n_q

  def pad_t(x):  # pad the query axis (axis 1, or 0 for 1-D) by repeating the last query
    axis = 0 if x.ndim == 1 else 1
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, mode="edge")

  def to_chunks(x):  # [B, Tq', ...] -> [n, B, C, ...]
    x = x.reshape(x.shape[0], n_chunks, chunk, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)

  q_chunks = to_chunks(pad_t(q))
  layout_chunks = Layout(*(to_chunks(pad_t(a)) for a in layout_q))
  t_chunks = pad_t(positions.astype(jnp.int32)).reshape(n_chunks, chunk)

  @jax.checkpoint
  def body(q_c, t_c, layout_c, k, v):
    return _chunk_attention(q_c, t_c, layout_c, k, v, kbar, layout.block_end,
                            block_size=block_size, topk=topk, scale=scale)

  # Every chunk reads all of k and v, so their gradients are sums over chunks, accumulated by the
  # map's transpose in the dtype of what the map reads: float32 here, one rounding at the end
  # (bfloat16 keys summed chunk by chunk in bfloat16 gave dK 2% off).
  k32, v32 = k.astype(jnp.float32), v.astype(jnp.float32)
  out = jax.lax.map(lambda xs: body(*xs, k32, v32), (q_chunks, t_chunks, layout_chunks))
  out = jnp.moveaxis(out, 0, 1).reshape(batch, n_chunks * chunk, heads, dim)
  return out[:, :n_q].astype(q.dtype)
