"""Key-block-major routing for the Pallas MoBA kernels (shared by the GPU and TPU kernels).

Every (query, head) gets S = min(topk, ceil(T / block_size)) *partial rows*: one for its current
block (the *dense* section, rows in (t, g) order, attended block-diagonal-causally) and one per
chosen past block (the *sparse* section, rows sorted by key block and padded per block to a
multiple of the row tile, as in megablox). Each row tile reads one contiguous key range; partial
outputs are merged afterwards by log-sum-exp. All metadata is linear in T.

Names: BK = batch * kv_heads, TG = T * G (query rows of one kv head), R rows in all,
Mq row tile, NT = R // Mq tiles, S slots per query (slot 0 = current block).
Row metadata: rq (query row in [0, TG) or -1 for padding), [lo, hi) the key range the row may see.

A query offset (`q_start`, context parallelism): the queries q [B, Tq, H, D] are positions
[q_start, q_start + Tq) of the sequence of the keys k [B, T, K, D] and segment_ids [B, T]. Key
positions, block starts, [lo, hi) and the tiles' key ranges stay absolute (positions in T); query
rows are local (rq in [0, Tq * G)), so TG above is Tq * G. The gate is the oracle's over the whole
sequence (block means of all T keys). q_start may be traced (lax.axis_index * Tq inside shard_map):
it is data, not a shape, so one compiled kernel serves every shard; Tq need not be a multiple of
the block size, and q_start need not be on a block boundary. Without an offset (q_start None) the
routing is what it was (Tq = T).
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from moba_jax import moba as _moba

ROUTING_BYTES = 64 << 20  # budget for one chunk of gate scores [B, C, H, N] float32
CAUSAL_GROUPS = 8  # query chunks of a single-document batch score in up to 8 triangular steps
_TRACING_FOR = [None]  # the platform `tracing_for` names, while its block runs


@contextlib.contextmanager
def tracing_for(platform: str):
  """The routing's choices by platform (the gate kernel, the pairs' sort, the key counts'
  search: `platform()`) made for `platform` instead of this process's backend while the block
  traces: `moba-jax plan` lowering a TPU's train step on a CPU. JAX's caches are cleared on entry
  and exit: a cached trace (the kernels' jitted entries) keeps the choices it was traced with."""
  jax.clear_caches()
  _TRACING_FOR[0] = platform
  try:
    yield
  finally:
    _TRACING_FOR[0] = None
    jax.clear_caches()


def platform() -> str:
  """The platform the routing traces for: `tracing_for`'s, else this process's backend."""
  return _TRACING_FOR[0] or jax.default_backend()


class Dims(NamedTuple):
  """Static sizes of the routing layout."""

  seq: int
  groups: int
  n_sel: int  # S
  block_size: int
  block_q: int  # Mq
  dense_rows: int  # DR = roundup(TG, Mq)
  sparse_rows: int  # PR
  max_groups: int  # full blocks that can be chosen as past blocks (T // block_size)
  queries: int  # Tq, query positions (T without a query offset); `seq` counts the keys
  one_doc: bool = False  # every row one document, known when tracing (segment_ids None)

  @property
  def rows(self):
    return self.dense_rows + self.sparse_rows

  @property
  def tiles(self):
    return self.rows // self.block_q


class Routing(NamedTuple):
  rq: jax.Array  # [BK, R] int32
  lo: jax.Array  # [BK, R] int32
  hi: jax.Array  # [BK, R] int32
  tile_ks: jax.Array  # [BK, NT] int32 first key of the tile's range
  tile_ke: jax.Array  # [BK, NT] int32 one past its last key
  pos: jax.Array  # [BK, TG, S] int32 partial rows of each query row (-1: none)
  group_p: jax.Array  # [BK, Gm] int32 key block start of each non-empty sparse group (T: none)
  group_r0: jax.Array  # [BK, Gm] int32 its first row
  group_r1: jax.Array  # [BK, Gm] int32 one past its last (padded) row
  tile_group: jax.Array  # [BK, NT] int32 group rank of a sparse tile (Gm: none / dense tile)
  block_end: jax.Array  # [BK, T] int32 one past the end of each key's block
  # With a query offset only (None without): the block start of each key [BK, T] int32 (the dense
  # rows' lo gives it when the queries are all T positions) and q_start, [] int32.
  block_start: jax.Array | None = None
  q_start: jax.Array | None = None


class SparseSection(NamedTuple):
  """The past-block rows of one (batch, kv head): fields as in Routing (without the batch axis)."""
  rq: jax.Array
  lo: jax.Array
  hi: jax.Array
  tile_ks: jax.Array
  tile_ke: jax.Array
  pos: jax.Array
  group_p: jax.Array
  group_r0: jax.Array
  group_r1: jax.Array
  tile_group: jax.Array


def _round_up(x, m):
  return -(-x // m) * m


def make_dims(seq, groups, block_size, topk, block_q, queries=None, one_doc=False) -> Dims:
  """Sizes for `seq` keys and `queries` query positions (default: seq, no query offset).

  one_doc (one document per row, known when tracing) with all seq queries: a query of block i
  has min(S - 1, i) past blocks to choose, so the sparse section is sized to that count (at 8K,
  block 512, top-3: 14,848 rows a kv head instead of 16,384; at 128K, block 4096, top-12: 18%
  fewer), not to S - 1 for every query."""
  queries = seq if queries is None else queries
  n_sel = min(topk, math.ceil(seq / block_size))
  dense = _round_up(queries * groups, block_q)
  max_groups = seq // block_size if n_sel > 1 else 0
  if one_doc and queries == seq:  # no offset (q_start + Tq <= T): the queries are positions 0..T-1
    pairs = groups * sum(min(block_size, seq - i * block_size) * min(n_sel - 1, i)
                         for i in range(math.ceil(seq / block_size)))
  else:
    pairs = queries * groups * (n_sel - 1)
  sparse = _round_up(pairs, block_q) + max_groups * block_q if n_sel > 1 else 0
  return Dims(seq, groups, n_sel, block_size, block_q, dense, sparse, max_groups, queries,
              one_doc)


def free_chunks(ks, ke, lo, hi, rq, chunk, align=1):
  """[BK, NT]: the leading key chunks of each row tile that every live row sees whole, so a
  kernel may skip their mask (all of a sparse tile's block; a dense tile's chunks before the
  diagonal). The tile's chunks of `chunk` keys start at its first key ks rounded down to a
  multiple of `align` (the Mosaic GPU kernels' TMA boxes: 8; the TPU kernel: 1). Padding rows
  (rq < 0) are not looked at: a kernel's outputs for them are never read."""
  bk_n, n_tiles = ks.shape
  ks = ks // align * align
  shape = (bk_n, n_tiles, -1)
  live = (rq >= 0).reshape(shape)
  lo_max = jnp.max(jnp.where(live, lo.reshape(shape), 0), axis=-1)
  hi_min = jnp.min(jnp.where(live, hi.reshape(shape), 2 ** 30), axis=-1)
  n_all = -(-(ke - ks) // chunk)
  n = jnp.where(lo_max <= ks, jnp.maximum(hi_min - ks, 0) // chunk, 0)
  return jnp.minimum(n, n_all).astype(jnp.int32)


def _bf16_pieces(x, n):
  """n bfloat16 pieces of float32 x whose float32 sum is x: exact for n = 3 and |x| >= 2^-100
  (below, the last remainder is subnormal or flushed), for n = 2 on float16 values; NaN stays NaN
  (an infinite x gives NaN lower pieces, a NaN score, as the convert split did).

  Each piece keeps the top 16 bits of what is left (a mask, not a rounding convert): XLA's GPU
  pipeline, with excess precision allowed (its default), deletes a float32 -> bfloat16 -> float32
  round trip, which made `rest - piece` zero and the gate bfloat16-exact only (a choice of blocks
  off the oracle's on an H200, run 16; docs/kernel_notes.md). A bit mask has no such rewrite.
  """
  pieces, rest = [], x
  for _ in range(n):
    top = jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(rest, jnp.uint32) & jnp.uint32(0xFFFF0000), jnp.float32)
    pieces.append(top.astype(jnp.bfloat16))  # exact: top is a bfloat16 value
    rest = rest - top  # exact: the bits below the top 16
  return pieces


def _gate_scores(q_grouped, slot_kbar):
  """Float32 scores [B, C, K, G, N] of queries [B, C, K, G, D] against gate keys [B, N, K, D].

  bfloat16 queries are one bfloat16 piece, float16 queries two (11 significant bits); the
  float32 gate keys are three. Each pair of pieces takes a matrix-unit product with float32
  accumulation: float32 scores up to summation order, at bfloat16 matmul speed (a float32
  HIGHEST product runs on the GPU's CUDA cores, 10x slower at 128K).
  """
  spec = "bckgd,bnkd->bckgn"
  if q_grouped.dtype not in (jnp.bfloat16, jnp.float16):
    return jnp.einsum(spec, q_grouped.astype(jnp.float32), slot_kbar,
                      precision=jax.lax.Precision.HIGHEST)
  n_q = 1 if q_grouped.dtype == jnp.bfloat16 else 2
  q_pieces, k_pieces = _bf16_pieces(q_grouped.astype(jnp.float32), n_q), _bf16_pieces(slot_kbar, 3)
  scores = 0.0
  for qp in q_pieces:
    for kp in k_pieces:
      scores = scores + jnp.einsum(spec, qp, kp, preferred_element_type=jnp.float32,
                                   precision=jax.lax.Precision.DEFAULT)  # bf16 x bf16 is exact
  return scores


def _select_shared(q, slot_kbar, layout, *, block_size, topk):
  """`moba.select_blocks` for a chunk whose queries all share one document start (per batch row).

  The gate keys are then the same for every query of the chunk: slot_kbar [B, N, K, D], the
  means of blocks doc_start + j * block_size. The scores are one matmul [C * G, D] x [D, N] per
  kv head instead of a gather of [C, N, K, D]; masking and top-k are the oracle's.
  """
  batch, chunk, heads, dim = q.shape
  n_slots, kv_heads = slot_kbar.shape[1], slot_kbar.shape[2]
  n_sel = min(topk, n_slots)
  j = jnp.arange(n_slots, dtype=jnp.int32)
  q_grouped = q.reshape(batch, chunk, kv_heads, heads // kv_heads, dim)
  scores = _moba.nan_ranks_high(_gate_scores(q_grouped, slot_kbar).reshape(batch, chunk, heads,
                                                                          n_slots))
  current = layout.block_index[..., None, None]  # [B, C, 1, 1]
  scores = jnp.where(j < current, scores, -jnp.inf)  # the current block is chosen first (+inf)
  first = jnp.broadcast_to(current[..., 0], scores.shape[:-1])
  top_scores, top_slots = _top_k(scores, n_sel, first=first)
  starts = layout.doc_start[..., None, None] + top_slots.astype(jnp.int32) * block_size
  return starts, top_scores > -jnp.inf


def _slot_kbar(kbar, layout, block_size):
  """Gate keys of the chunk's (shared) document's block slots from per-position kbar."""
  seq = kbar.shape[1]
  slot_start = layout.doc_start[:, :1] + jnp.arange(math.ceil(seq / block_size)) * block_size
  return jax.vmap(lambda kb, idx: kb[jnp.clip(idx, 0, seq - 1)])(kbar, slot_start)


def full_block_table(k, layout, block_size, one_doc=False):
  """The gate keys of each row's full blocks in order, float32 [B, NF, K, D] (NF = T //
  block_size, the most full blocks a row can hold; a row's unused slots are zero and never
  read), and each position's document's first slot in it, [B, T] int32. Only full blocks are
  past blocks (a document's ragged last block is always its queries' current one), so a query
  of block index i chooses among slots [first, first + i). Single documents (one_doc, known
  when tracing): `moba.slot_means`' first NF slots, first = 0. Packed rows: each full block's
  keys gathered and summed in block order (no scatter: the sums are deterministic)."""
  batch, seq, kv_heads, dim = k.shape
  n_full = seq // block_size
  if one_doc:
    table = _moba.slot_means(k, block_size)[:, :n_full]
    return table, jnp.zeros((batch, seq), jnp.int32)
  t = jnp.arange(seq, dtype=jnp.int32)
  is_full = (t == layout.block_start) & (layout.block_end - t == block_size)  # [B, T]
  count = jnp.cumsum(is_full, axis=1, dtype=jnp.int32)
  rows = jnp.arange(batch)[:, None]
  slot = jnp.where(is_full, count - 1, n_full)
  start = jnp.zeros((batch, n_full), jnp.int32).at[rows, slot].set(
      jnp.broadcast_to(t, (batch, seq)), mode="drop")  # [B, NF] each full block's first key
  keys = jax.vmap(lambda kr, idx: kr[idx])(
      k, start[:, :, None] + jnp.arange(block_size, dtype=jnp.int32))  # [B, NF, L, K, D]
  table = keys.astype(jnp.float32).sum(axis=2) / block_size
  before = count - is_full  # full blocks before each position
  first = jnp.take_along_axis(before, layout.doc_start, axis=1)
  return table, first


def _top_k(scores, k, first=None):
  """`lax.top_k` over the last axis by argmax passes (ties: lower index first, as top_k).

  For the small k of MoBA this is k reads of the scores instead of a sort. `first` (indices,
  scores.shape[:-1]) is an entry known to rank first with value +inf (the query's own block): it
  costs no pass, and its own entry in `scores` is ignored.
  """
  idx = jax.lax.broadcasted_iota(jnp.int32, scores.shape, scores.ndim - 1)
  if k > 16:
    if first is not None:
      scores = jnp.where(idx == first[..., None], jnp.inf, scores)
    return jax.lax.top_k(scores, k)
  values, slots = [], []
  if first is not None:
    values.append(jnp.full(first.shape, jnp.inf, scores.dtype))
    slots.append(first.astype(jnp.int32))
  for i in range(len(slots), k):
    masked = scores
    for prev in slots:
      masked = jnp.where(idx == prev[..., None], -jnp.inf, masked)
    best = jnp.argmax(masked, axis=-1).astype(jnp.int32)
    value = jnp.take_along_axis(masked, best[..., None], axis=-1)[..., 0]
    if slots:  # only -inf left: top_k takes the lowest index not taken yet
      free = jnp.zeros_like(best)
      for _ in range(i):
        free = free + functools.reduce(jnp.logical_or, [p == free for p in slots])
      best = jnp.where(value == -jnp.inf, free, best)
    values.append(value)
    slots.append(best)
  return jnp.stack(values, -1), jnp.stack(slots, -1)


def _split(x, n, chunk):  # [B, T, ...] -> [n, B, C, ...] (padding by repeating the last entry)
  batch, seq = x.shape[:2]
  widths = [(0, 0), (0, n * chunk - seq)] + [(0, 0)] * (x.ndim - 2)
  x = jnp.pad(x, widths, mode="edge")
  return jnp.moveaxis(x.reshape(batch, n, chunk, *x.shape[2:]), 1, 0)


def map_steps(f, xs):
  """`jax.lax.map(f, xs)`, but a map of one step is the call itself: no loop in the program
  (on a GPU a `while` is host-driven and splits XLA's command buffers; the routing's causal
  groups are one chunk each at 8K-32K)."""
  if jax.tree.leaves(xs)[0].shape[0] == 1:
    return jax.tree.map(lambda y: y[None], f(jax.tree.map(lambda x: x[0], xs)))
  return jax.lax.map(f, xs)


def _merge(x, seq):  # [n, B, C, ...] -> [B, T, ...]
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :seq]


def _pow2_chunk(budget, per_query, seq):
  chunk = max(1, budget // per_query)
  return min(1 << max(seq - 1, 0).bit_length(), 1 << (chunk.bit_length() - 1))


def _select_mixed(q_c, kbar, lay, *, block_size, topk):
  """A chunk spanning documents: the oracle's gather path, over sub-chunks within budget."""
  batch, chunk, heads, dim = q_c.shape
  n_slots = math.ceil(kbar.shape[1] / block_size)
  sub = _pow2_chunk(ROUTING_BYTES, 4 * batch * n_slots * (kbar.shape[2] * dim + heads), chunk)
  if sub >= chunk:
    return _moba.select_blocks(q_c, kbar, lay, block_size=block_size, topk=topk)
  n = -(-chunk // sub)
  body = lambda xs: _moba.select_blocks(xs[0], kbar, _moba.Layout(*xs[1]),
                                        block_size=block_size, topk=topk)
  out = map_steps(body, (_split(q_c, n, sub), tuple(_split(a, n, sub) for a in lay)))
  return tuple(_merge(x, chunk) for x in out)


def select_chunked(q, k, layout, *, block_size, topk, q_start=None, one_doc=False):
  """The oracle's block choice over query chunks: memory O(chunk * T / block_size), not T^2.

  On a GPU or TPU with 16-bit queries the gate kernel chooses for any documents, without
  chunks or branches (`_gate_kernel`, `full_block_table`). Otherwise (XLA's gate) batches of
  single documents score every chunk against one set of gate keys (`moba.slot_means`); packed
  rows' chunks inside one document (the common case) take the shared path with their
  document's gate keys and chunks that span documents the oracle's own `select_blocks`.
  layout: every key position's Layout ([B, T] each). q_start: q [B, Tq, H, D] are positions
  [q_start, q_start + Tq) (a query offset, may be traced); their positions are then data, so
  every chunk scores all slots (no causal groups). one_doc: single documents known when
  tracing: the single-document path without a `lax.cond`.
  """
  layout_q = None if q_start is None else query_layout(layout, q_start, q.shape[1])
  batch, n_q, heads, _ = q.shape
  seq = k.shape[1]
  n_slots = math.ceil(seq / block_size)
  lay_q = layout if layout_q is None else layout_q
  kernel = _gate_kernel(q.dtype, q.shape[-1], topk, max(seq // block_size, 1))
  if kernel is not None:  # any documents, the scores never in memory (kernels/moba_gate.py)
    table, first = full_block_table(k, layout, block_size, one_doc)
    if layout_q is not None:
      first = jax.lax.dynamic_slice_in_dim(first, q_start, n_q, axis=1)
    blocks, valid = kernel(q, jnp.stack(_bf16_pieces(table, 3)), first, lay_q.block_index,
                           n_sel=min(topk, n_slots))
    return lay_q.doc_start[..., None, None] + blocks * block_size, valid

  chunk = _pow2_chunk(ROUTING_BYTES, 4 * batch * heads * n_slots, n_q)
  n = -(-n_q // chunk)
  kw = dict(block_size=block_size, topk=topk)
  chunks = (_split(q, n, chunk), tuple(_split(a, n, chunk) for a in lay_q))
  shared = lambda kb: lambda xs: _select_shared(xs[0], kb, _moba.Layout(*xs[1]), **kw)

  def one_doc_path():  # causal: chunks of early queries score only the slots they can reach
    slot_kbar = _moba.slot_means(k, block_size)
    if layout_q is not None:
      return merged(map_steps(shared(slot_kbar), chunks))
    n_sel = min(topk, n_slots)
    bounds = sorted({round(i * n / min(n, CAUSAL_GROUPS)) for i in range(CAUSAL_GROUPS + 1)})
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):  # chunks [a, b) see slots < their last query's
      slots = max(n_sel, min(n_slots, (min(b * chunk, seq) - 1) // block_size + 1))
      part = jax.tree.map(lambda x, a=a, b=b: x[a:b], chunks)
      outs.append(map_steps(shared(slot_kbar[:, :slots]), part))
    return merged(tuple(jnp.concatenate(x, axis=0) for x in zip(*outs)))

  def packed():
    kbar = _moba.block_key_means(k, layout, block_size=block_size)  # [B, T, K, D] float32

    def body(xs):
      q_c, lay = xs[0], _moba.Layout(*xs[1])
      shared = jnp.all(lay.doc_start == lay.doc_start[:, :1])
      return jax.lax.cond(
          shared, lambda: _select_shared(q_c, _slot_kbar(kbar, lay, block_size), lay, **kw),
          lambda: _select_mixed(q_c, kbar, lay, **kw))

    return merged(map_steps(body, chunks))

  merged = lambda out: tuple(_merge(x, n_q) for x in out)
  with jax.default_matmul_precision("highest"):  # float32 scores (no TF32) on every backend
    return one_doc_path() if one_doc else jax.lax.cond(_moba.one_document(layout), one_doc_path,
                                                        packed)


def _gate_kernel(q_dtype, head_dim, topk, n_slots):
  """The gate kernel of the backend the program runs on where it takes the case: on a GPU
  `moba_gate.gate_topk` (`moba_gate.supports`), on a TPU `moba_gate.gate_topk_tpu`
  (`supports_tpu`); else None (XLA's gate, the CPU's). Chosen when tracing, for `platform()`,
  as `_pair_order` is."""
  backend = platform()
  if backend not in ("gpu", "tpu"):
    return None
  from moba_jax.kernels import moba_gate
  if backend == "gpu":
    return moba_gate.gate_topk if moba_gate.supports(q_dtype, head_dim, topk) else None
  ok = moba_gate.supports_tpu(q_dtype, head_dim, topk, n_slots)
  return moba_gate.gate_topk_tpu if ok else None


def _pair_keys(starts, valid, seq):
  """The sparse pairs' sort keys: [..., Tq, G, S-1] -> [..., Tq * G * (S-1)], the chosen past
  block's start, or seq for a slot left empty."""
  key = jnp.where(valid, starts, seq)
  return key.reshape(*key.shape[:-3], -1)


def _row_order(key, seq):  # seq: `_flat_order`'s signature
  """Each row's stable argsort of key [BK, N]: a batched sort."""
  return jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32)


def _flat_order(key, seq):
  """`_row_order` as one sort of BK * N entries (row b's keys, in [0, seq], offset by
  b * (seq + 1)): on a GPU XLA gives one long sort of 32-bit keys to CUB's radix sort (its
  Hopper heuristic: a batch of 1 above 22000 keys), where [BK, N] rows (batch 16) run its own
  multi-pass sort, 0.27 ms of the step at 16K block 128 top-8 (run 25)."""
  bk, n = key.shape
  if bk * (seq + 1) >= 2 ** 31:  # the offsets would not fit in int32
    return _row_order(key, seq)
  rows = jnp.arange(bk, dtype=jnp.int32)[:, None]
  order = jnp.argsort((key + rows * (seq + 1)).reshape(-1), stable=True).astype(jnp.int32)
  return order.reshape(bk, n) - rows * n


# On a GPU, the fewest pairs (all rows') that `_pair_order` sorts flat. CUB's sort is a thunk
# outside XLA's command buffers: the GPU idles 0.18-0.37 ms after it while the host launches the
# rest of the step. Synced fwd+bwd on the H200 (run 26, flat / batched): 8K b512 k3 (2^18 pairs)
# 1.686 / 1.616 ms; 8K b128 k8 (917504) 2.263 / 2.756; 32K b512 k3 (2^20) 5.386 / 5.671; 16K
# b128 k8 4.050 / 4.571.
FLAT_SORT_MIN_KEYS = 1 << 19


def _pair_order(key, seq):
  """The sparse pairs' order in each row of key [BK, N]: the flat sort where the program runs on
  a GPU (CUB's) with at least `FLAT_SORT_MIN_KEYS` pairs, the batched one elsewhere (TPU and CPU
  sorts have no such switch; the flat one is unmeasured there). Chosen when tracing, as the
  kernels' default is (`moba_mgpu.on_hopper`; `lax.platform_dependent` would leave a `case` on a
  constant in the step for XLA to fold)."""
  flat = platform() == "gpu" and key.size >= FLAT_SORT_MIN_KEYS
  return (_flat_order if flat else _row_order)(key, seq)


def keys_below(skey, seq, search=None):
  """below[p] = #(skey < p) for p in [0, seq], int32 [seq + 1], of sorted keys skey [N] in
  [0, seq]. search (None: off the CPU): a binary search per position, unrolled (no while loop),
  instead of a scatter-add of ones whose few bins (the selected blocks' starts) every key
  contends for: 1.23 ms of the 128K block 4096 top-12 step on the H200, gone with the search
  (run 32). The CPU keeps the scatter-add: XLA compiles it in 0.08 s where the unrolled search
  takes 0.58 s (a routing of 1K keys; the test suite compiles hundreds of routings)."""
  if search is None:
    search = platform() != "cpu"
  if search:
    return jnp.searchsorted(skey, jnp.arange(seq + 1, dtype=skey.dtype), side="left",
                            method="scan_unrolled").astype(jnp.int32)
  counts = jax.ops.segment_sum(jnp.ones_like(skey), skey, num_segments=seq + 1)[:seq]
  return jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts).astype(jnp.int32)])


def _sparse_section(starts, valid, order, dims: Dims) -> SparseSection:
  """Sparse rows of one kv head. starts/valid [Tq, G, S-1] (absolute key positions); order: the
  stable argsort of their `_pair_keys`."""
  seq, g, mq, blk = dims.seq, dims.groups, dims.block_q, dims.block_size
  n_q = dims.queries
  n_pairs = n_q * g * (dims.n_sel - 1)
  qrow = jnp.broadcast_to(jnp.arange(n_q * g, dtype=jnp.int32).reshape(n_q, g, 1), starts.shape)
  key = _pair_keys(starts, valid, seq)
  skey, sq = key[order], qrow.reshape(n_pairs)[order]
  below = keys_below(skey, seq)  # [seq + 1]: the pairs before each key position
  ustart = below[:seq]
  counts = below[1:] - ustart
  pcounts = _round_up(counts, mq)
  pstart = jnp.cumsum(pcounts) - pcounts
  kc = jnp.minimum(skey, seq - 1)
  ok = skey < seq
  dest = jnp.where(ok, pstart[kc] + jnp.arange(n_pairs, dtype=jnp.int32) - ustart[kc],
                   dims.sparse_rows)
  put = lambda fill, x: jnp.full((dims.sparse_rows,), fill, jnp.int32).at[dest].set(x, mode="drop")
  rq, lo, hi = put(-1, sq), put(0, skey), put(0, skey + blk)
  n_tiles = dims.sparse_rows // mq
  tput = lambda fill, x: jnp.full((n_tiles,), fill, jnp.int32).at[dest // mq].set(x, mode="drop")
  tile_ks, tile_ke = tput(0, skey), tput(0, skey + blk)
  pos = jnp.zeros((n_pairs,), jnp.int32).at[order].set(
      jnp.where(ok, dest + dims.dense_rows, -1)).reshape(n_q * g, dims.n_sel - 1)
  nonempty = counts > 0
  rank = jnp.cumsum(nonempty) - 1
  # the nonempty groups' block starts in order (`jnp.nonzero`'s result, whose bincount is a
  # scatter-add of all seq positions into max_groups bins: 0.08 ms at 32K, 0.22 at 128K, run 26)
  group_p = jnp.full((dims.max_groups,), seq, jnp.int32).at[
      jnp.where(nonempty, rank, dims.max_groups)].set(jnp.arange(seq, dtype=jnp.int32), mode="drop")
  gpc = jnp.minimum(group_p, seq - 1)
  has = group_p < seq
  group_r0 = jnp.where(has, pstart[gpc] + dims.dense_rows, 0)
  group_r1 = jnp.where(has, group_r0 + pcounts[gpc], 0)
  tile_group = tput(dims.max_groups, rank[kc])
  return SparseSection(rq, lo, hi, tile_ks, tile_ke, pos, group_p.astype(jnp.int32), group_r0,
                       group_r1, tile_group)


def _dense_section(block_start, dims: Dims, q_start=None):
  """Dense (current block) rows of one kv head: rows t * G + g; block_start [Tq] (absolute) of
  the queries t at positions q_start + t (q_start None: t)."""
  n_q, g, mq = dims.queries, dims.groups, dims.block_q
  r = jnp.arange(dims.dense_rows, dtype=jnp.int32)
  ok = r < n_q * g
  t = jnp.minimum(r // g, n_q - 1)
  first = jnp.arange(0, dims.dense_rows, mq, dtype=jnp.int32)
  last = jnp.minimum(first + mq, n_q * g) - 1
  end = t + 1 if q_start is None else q_start + t + 1  # one past the query's own position
  tile_ke = last // g + 1 if q_start is None else q_start + last // g + 1
  rq = jnp.where(ok, r, -1)
  lo = jnp.where(ok, block_start[t], 0)
  hi = jnp.where(ok, end, 0)
  tile_ks = block_start[first // g]
  return rq, lo, hi, tile_ks, tile_ke


def _route_one(starts, valid, order, block_start, block_end, dims: Dims, q_start=None):
  """Routing of one (batch, kv head). starts/valid [Tq, G, S]; order: `_pair_order`'s row of
  this (batch, kv head) (None where S = 1); block_start [Tq] (the queries'); block_end [T] (the
  keys')."""
  d_rq, d_lo, d_hi, d_ks, d_ke = _dense_section(block_start, dims, q_start)
  dense_pos = jnp.arange(dims.queries * dims.groups, dtype=jnp.int32)[:, None]
  n_dense_tiles = dims.dense_rows // dims.block_q
  if dims.n_sel == 1:
    gm = jnp.zeros((0,), jnp.int32)
    return Routing(d_rq, d_lo, d_hi, d_ks, d_ke, dense_pos, gm, gm, gm,
                   jnp.zeros((n_dense_tiles,), jnp.int32), block_end)
  s = _sparse_section(starts[:, :, 1:], valid[:, :, 1:], order, dims)
  cat = jnp.concatenate
  tile_group = cat([jnp.full((n_dense_tiles,), dims.max_groups, jnp.int32), s.tile_group])
  return Routing(cat([d_rq, s.rq]), cat([d_lo, s.lo]), cat([d_hi, s.hi]),
                 cat([d_ks, s.tile_ks]), cat([d_ke, s.tile_ke]), cat([dense_pos, s.pos], axis=1),
                 s.group_p, s.group_r0, s.group_r1, tile_group, block_end)


def query_layout(layout, q_start, n_q):
  """The Layout entries [B, n_q] of positions [q_start, q_start + n_q) (q_start may be traced)."""
  return _moba.Layout(*(jax.lax.dynamic_slice_in_dim(a, q_start, n_q, axis=1) for a in layout))


def route(q, k, segment_ids, *, block_size, topk, block_q, q_start=None) -> tuple[Routing, Dims]:
  """Block choice (bit-identical to the oracle's) and the key-block-major row layout.

  q [B, Tq, H, D], k [B, T, K, D], segment_ids [B, T] or None (one document per row, known when
  tracing: `dims.one_doc`, no data-dependent branch); q_start (an int32 scalar, may be traced):
  the position of q's first query in the sequence (module docstring). Without it Tq = T."""
  batch, n_q, heads, _ = q.shape
  seq, kv_heads = k.shape[1], k.shape[2]
  groups = heads // kv_heads
  dims = make_dims(seq, groups, block_size, topk, block_q, n_q, one_doc=segment_ids is None)
  layout = _moba.doc_layout(_moba.segments(segment_ids, k), block_size)
  if q_start is not None:
    q_start = jnp.asarray(q_start, jnp.int32)
  layout_q = None if q_start is None else query_layout(layout, q_start, n_q)
  starts, valid = select_chunked(q, k, layout, block_size=block_size, topk=topk,
                                 q_start=q_start, one_doc=dims.one_doc)  # [B, Tq, H, S]

  def per_bk(x):  # [B, Tq, H, S] -> [B * K, Tq, G, S]
    x = x.reshape(batch, n_q, kv_heads, groups, dims.n_sel)
    return jnp.moveaxis(x, 2, 1).reshape(batch * kv_heads, n_q, groups, dims.n_sel)

  rep = lambda x: jnp.repeat(x, kv_heads, axis=0)  # [B, T] -> [B * K, T]
  fn = lambda s, v, o, bs, be: _route_one(s, v, o, bs, be, dims, q_start)
  block_start_q = (layout if layout_q is None else layout_q).block_start
  starts, valid = per_bk(starts), per_bk(valid)
  order = None if dims.n_sel == 1 else _pair_order(
      _pair_keys(starts[..., 1:], valid[..., 1:], seq), seq)
  routing = jax.vmap(fn)(starts, valid, order, rep(block_start_q), rep(layout.block_end))
  if q_start is not None:
    routing = routing._replace(block_start=rep(layout.block_start), q_start=q_start)
  return jax.tree.map(jax.lax.stop_gradient, routing), dims


def heads_major(x, kv_heads):
  """[B, T, H, D] -> [B * K, T * G, D] (query rows of each kv head in (t, g) order)."""
  batch, seq, heads, dim = x.shape
  x = x.reshape(batch, seq, kv_heads, heads // kv_heads, dim)
  return jnp.moveaxis(x, 2, 1).reshape(batch * kv_heads, seq * (heads // kv_heads), dim)


def heads_minor(x, batch, seq):
  """Inverse of `heads_major`: [B * K, T * G, D] -> [B, T, H, D]."""
  bk, tg, dim = x.shape
  kv_heads, groups = bk // batch, tg // seq
  x = jnp.moveaxis(x.reshape(batch, kv_heads, seq, groups, dim), 1, 2)
  return x.reshape(batch, seq, kv_heads * groups, dim)


def merge_rows(o_rows, lse_rows, pos):
  """Log-sum-exp merge of partial rows. o_rows [BK, R, D], lse_rows [BK, R], pos [BK, TG, S].

  Returns o [BK, TG, D] float32 and lse [BK, TG] float32.
  """
  ok = pos >= 0
  pc = jnp.maximum(pos, 0)
  lse_sel = jnp.where(ok, jnp.take_along_axis(lse_rows[:, :, None], pc.reshape(pc.shape[0], -1, 1),
                                              axis=1).reshape(pos.shape), -jnp.inf)
  lse = jax.nn.logsumexp(lse_sel, axis=-1)  # [BK, TG]
  w = jnp.where(ok, jnp.exp(lse_sel - lse[..., None]), 0.0)  # [BK, TG, S]
  o = jnp.zeros(o_rows.shape[:1] + pos.shape[1:2] + o_rows.shape[2:], jnp.float32)
  for s in range(pos.shape[-1]):
    rows = jnp.take_along_axis(o_rows, pc[:, :, s, None], axis=1)  # [BK, TG, D]
    o = o + w[:, :, s, None] * rows.astype(jnp.float32)
  return o, lse


def gather_rows_sum(x_rows, pos):
  """Sum of each query's partial rows: x_rows [BK, R, D], pos [BK, TG, S] -> [BK, TG, D] f32."""
  out = 0.0
  for s in range(pos.shape[-1]):
    rows = jnp.take_along_axis(x_rows, jnp.maximum(pos[:, :, s, None], 0), axis=1)
    out = out + jnp.where(pos[:, :, s, None] >= 0, rows.astype(jnp.float32), 0.0)
  return out


PARTIAL_BYTES = 4 << 30  # largest partial-row buffer ([BK, R, D], counted in float32) per call


def kv_head_chunks(q_shape, kv_heads, block_size, topk, keys=None, max_selected=None) -> int:
  """How many sequential kv-head chunks keep the [BK, R, D] partial rows in budget, counted at
  4 bytes an element (the rows are in q's dtype: half that for 16-bit inputs, so the split is
  conservative; keys: the key sequence length when it is not q's, a query offset). max_selected:
  also at most that many selected blocks (rows) per query in a chunk, i.e. a chunk's rows at
  most about max_selected times its share of q (a budget relative to the inputs)."""
  batch, seq, heads, dim = q_shape
  n_sel = min(topk, math.ceil((seq if keys is None else keys) / block_size))
  total = 4 * batch * seq * heads * dim * n_sel
  for n in range(1, kv_heads + 1):
    if (kv_heads % n == 0 and total // n <= PARTIAL_BYTES
        and (max_selected is None or n_sel <= max_selected * n)):
      return n
  return kv_heads


def over_kv_head_chunks(core, q, k, v, n):
  """core(q_c, k_c, v_c) on n chunks of kv heads (with their query-head groups), one after another
  (lax.map), so temporaries exist for one chunk at a time. Routing is per head: unchanged."""
  if n == 1:
    return core(q, k, v)
  split = lambda x: jnp.moveaxis(x.reshape(*x.shape[:2], n, x.shape[2] // n, x.shape[3]), 2, 0)
  out = jax.lax.map(lambda xs: core(*xs), (split(q), split(k), split(v)))  # [n, B, T, H/n, D]
  return jnp.moveaxis(out, 0, 2).reshape(q.shape)


def custom_vjp_attention(forward, backward):
  """A kernel family's MoBA as one `jax.custom_vjp` function.

  forward(q, k, v, routing, dims, sizes, scale, interpret) -> (out, (o, lse));
  backward(q, k, v, routing, o, lse, do, dims, sizes, scale, interpret) -> (dq, dk, dv).
  The routing (integer metadata) gets no gradient.
  """

  @functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
  def moba(q, k, v, routing, dims, sizes, scale, interpret):
    return forward(q, k, v, routing, dims, sizes, scale, interpret)[0]

  def moba_fwd(q, k, v, routing, dims, sizes, scale, interpret):
    out, (o, lse) = forward(q, k, v, routing, dims, sizes, scale, interpret)
    return out, (q, k, v, routing, o, lse)

  def moba_bwd(dims, sizes, scale, interpret, res, do):
    q, k, v, routing, o, lse = res
    dq, dk, dv = backward(q, k, v, routing, o, lse, do, dims, sizes, scale, interpret)
    zero = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), routing)
    return dq, dk, dv, zero

  moba.defvjp(moba_fwd, moba_bwd)
  return moba


def over_mesh_shards(fn, q, k, v, segment_ids):
  """fn(q, k, v, segment_ids) -> [B, T, H, D] on each device's shard of batch and heads when a
  mesh is active (`jax.set_mesh`, as the train step sets it): a Pallas kernel is a custom call
  that XLA's SPMD partitioner cannot split (Mosaic: "cannot be automatically partitioned").
  Batch and heads are split as the logical rules split q and k (heads only where `kv_heads`
  splits alike: a GQA group stays with its kv head); other mesh axes hold replicas. MoBA is
  independent per (batch row, kv head), so this is exact. No mesh: fn(q, k, v, segment_ids).
  segment_ids None stays None (a static fact, not an array to shard)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or mesh.manual_axes:
    return fn(q, k, v, segment_ids)
  if segment_ids is None:
    return over_mesh_shards(lambda q, k, v, _: fn(q, k, v, None), q, k, v,
                            jnp.zeros(q.shape[:2], jnp.int32))
  from flax.core import spmd
  from jax.sharding import PartitionSpec as P

  from moba_jax import sharding as shd

  rules = spmd.get_logical_axis_rules() or shd.LOGICAL_AXIS_RULES
  spec_q = shd.logical_to_spec(("batch", None, "heads", None), rules, q.shape, mesh)
  spec_k = shd.logical_to_spec(("batch", None, "kv_heads", None), rules, k.shape, mesh)
  heads = spec_q[2] if spec_q[2] == spec_k[2] else None
  qkv, seg = P(spec_q[0], None, heads, None), P(spec_q[0], None)
  return jax.shard_map(fn, mesh=mesh, in_specs=(qkv,) * 3 + (seg,), out_specs=qkv,
                       check_vma=False)(q, k, v, segment_ids)


def check_query_offset(q, k, v, segment_ids, q_start) -> None:
  """Raises ValueError (one line, naming the values) for a kernel call with a query offset that
  does not fit: segment_ids must cover the keys, q's positions [q_start, q_start + Tq) must lie in
  the T keys (checked for a concrete q_start; a traced one, as inside shard_map, is the caller's
  to keep in range), and k, v must be in q's dtype or float32. Without an offset nothing is
  checked here (the dispatcher validates equal shapes and dtypes)."""
  if q_start is None:
    return
  n_q, seq = q.shape[1], k.shape[1]
  if segment_ids is not None and tuple(segment_ids.shape) != (k.shape[0], seq):
    raise ValueError(f"segment_ids.shape={tuple(segment_ids.shape)} must be (batch, keys) = "
                     f"{(k.shape[0], seq)} with a query offset (the whole sequence's ids)")
  if n_q > seq:
    raise ValueError(f"q has {n_q} positions, more than the {seq} keys; with q_start, q is a "
                     "slice [q_start, q_start + Tq) of the key sequence")
  try:
    start = int(q_start)
  except jax.errors.JAXTypeError:  # traced: its value is not known here
    start = None
  if start is not None and not 0 <= start <= seq - n_q:
    raise ValueError(f"q_start={start} must be in [0, {seq - n_q}] (keys T={seq} - queries "
                     f"Tq={n_q})")
  accepted = " or ".join(dict.fromkeys((jnp.dtype(q.dtype).name, "float32")))
  for name, x in (("k", k), ("v", v)):
    if x.dtype not in (q.dtype, jnp.dtype(jnp.float32)):
      raise ValueError(f"{name}.dtype={x.dtype} must be {accepted} (q's dtype, or float32 as the "
                       "context-parallel path gathers K/V)")


def run_kernel(moba, q, k, v, segment_ids, *, block_size, topk, softmax_scale, interpret, sizes,
               q_start=None, head_chunks=None):
  """Routes and runs a kernel family's `custom_vjp_attention` function over kv-head chunks.
  q_start: q's first position in the sequence of k, v and segment_ids (module docstring).
  head_chunks: the chunks `over_kv_head_chunks` runs (None: `kv_head_chunks`' count; 1 where the
  kernels split the heads themselves)."""
  scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
  segment_ids = None if segment_ids is None else segment_ids.astype(jnp.int32)

  def core(q, k, v):
    # Routing reads k in q's dtype (exact for the float32 K/V of the context-parallel path, and
    # then the kernels' own cast: XLA drops the float32 round trip of gathered K/V).
    routing, dims = route(q, k.astype(q.dtype), segment_ids, block_size=block_size, topk=topk,
                          block_q=sizes.block_q, q_start=q_start)
    return moba(q, k, v, routing, dims, sizes, scale, interpret)

  n = kv_head_chunks(q.shape, k.shape[2], block_size, topk, k.shape[1]) if head_chunks is None \
      else head_chunks
  return over_kv_head_chunks(core, q, k, v, n)
