"""MoBA attention for TPUs: Pallas Mosaic TPU, key-block-major, forward and backward, no atomics.

Same routing as the GPU kernel (`_routing.route`): partial rows, one per (query, head, chosen
block), in a dense section (current blocks) and a sparse section (rows sorted by key block and
padded per block to the row tile, like megablox groups). TPU specifics (docs/tpu_roofline.md):
  * rows are gathered by XLA into tile order ([BK, R, Dp]); a kernel never gathers;
  * per-tile key ranges are scalar-prefetched (PrefetchScalarGridSpec) and drive the k/v
    BlockSpec index maps with element offsets (blocks restart at document starts, so key ranges
    are not tile-aligned); a forward or dQ grid step brings a window of keys (`kv_window`: the
    tile's whole range up to a block of 2048 keys, so one step a tile) and walks it in 128-key
    chunks; windows past a tile's range repeat the last index (no new DMA) and compute nothing;
  * tiles are (8, 128)-aligned: row tile 128, key chunk 128, head_dim padded to 128 lanes;
  * no atomics: dQ is written per partial row and summed by XLA; dK/dV of the current blocks is
    a banded pass per key window (`dkdv_window`: a block's keys, up to 1024); dK/dV of past
    blocks accumulates in the resident output block over consecutive row tiles of one group
    (the row-tile axis is "arbitrary"), a window of the block's keys a grid step.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moba_jax.attention import KernelOptions
from moba_jax.kernels import _routing as rt

NEG = -1e30
_PREC = jax.lax.Precision.HIGHEST


# Mosaic's tiling rule for a VMEM block on the TPUs this kernel targets (v5e, v5p, v6e): the last
# dim a multiple of 128 lanes, the second-to-last a multiple of 8 sublanes for 32-bit dtypes (16
# for 16-bit, 32 for 8-bit: packed rows), each or else the array's full extent. The one statement
# of the rule: BlockSizes.validate (before tracing) and check_tiles (on traced kernels) use it.
TPU_GENERATIONS = ("v5e", "v5p", "v6e")
LANES, SUBLANES = 128, 8


def sublane_tile(dtype) -> int:
  """Rows of `dtype` per (8, 128) 32-bit tile: 8 for 32-bit, 16 for 16-bit, 32 for 8-bit."""
  return SUBLANES * max(1, 4 // jnp.dtype(dtype).itemsize)


def tile_error(block, array, dtype) -> str | None:
  """Why Mosaic refuses a block (dims, squeezed = 1) of an array (shape; None = unknown, no
  full-extent exemption) in `dtype`, or None when it tiles."""
  block = tuple(block)
  if len(block) < 2:
    return None
  known = array is not None
  array = tuple(array) if known else (None,) * len(block)
  rows, lanes, sub = block[-2], block[-1], sublane_tile(dtype)
  bad = [f"{name} dim {size} is not a multiple of {tile}"
         + (f" nor the array's full extent {full}" if known else "")
         for name, size, tile, full in (("lanes", lanes, LANES, array[-1]),
                                        ("sublanes", rows, sub, array[-2]))
         if size % tile and size != full]
  if not bad:
    return None
  of = f" of array {list(array)}" if known else ""
  return (f"{jnp.dtype(dtype).name} block {list(block)}{of}: {'; '.join(bad)} (Mosaic on TPU "
          f"{'/'.join(TPU_GENERATIONS)} tiles 32-bit blocks ({SUBLANES}, {LANES}), 16-bit "
          f"({sublane_tile(jnp.bfloat16)}, {LANES}))")


# Bytes of one K (or V) window a grid step of the forward and dQ brings into VMEM (`kv_window`):
# with both double-buffered, 4x this (2 MiB) of the v5p's default scoped VMEM; 2048 keys at
# head_dim 128 in 16 bits, so a block of up to 2048 keys is one grid step.
WINDOW_BYTES = 512 * 1024


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (each a multiple of Mosaic's tile: `validate`).

  block_q: the routing's row tile (each sparse group padded to it); any multiple of the tile:
  a dense dK/dV window's row tiles may start before its first query (masked, causal).

  block_k: the key chunk of one S = Q K^T product in the forward and dQ; block_kv_window: the
  keys one of their grid steps brings into VMEM, a multiple of block_k that the step walks in
  block_k chunks (0: `kv_window` sizes it to the routing block's keys, up to WINDOW_BYTES);
  block_k_dkv and block_kv_window_dkv: the same for the dK/dV's key tiles (`dkdv_window`)."""

  block_q: int = 128
  block_k: int = 128
  block_k_dkv: int = 128
  block_kv_window: int = 0
  block_kv_window_dkv: int = 0

  @classmethod
  def get_default(cls) -> "BlockSizes":
    return cls()

  def validate(self, dtype) -> "BlockSizes":
    """Raises ValueError (one line, naming the tile) for tiles Mosaic refuses: each tile is the
    row dim of [tile, head_dim padded to 128] blocks in `dtype` (q, k, v, dO) and in float32."""
    for field in dataclasses.fields(self):
      size = getattr(self, field.name)
      if field.name.startswith("block_kv_window") and size == 0:
        continue
      if size < 1:
        raise ValueError(f"moba_tpu {field.name}={size} must be at least 1 (0 only for the "
                         "windows: sized by the kernel)")
      for dt in dict.fromkeys((jnp.dtype(dtype), jnp.dtype(jnp.float32))):
        err = tile_error((size, LANES), None, dt)
        if err:
          raise ValueError(f"moba_tpu {field.name}={size}: {err}")
    for name, chunk in (("block_kv_window", "block_k"), ("block_kv_window_dkv", "block_k_dkv")):
      if getattr(self, name) % getattr(self, chunk):
        raise ValueError(f"moba_tpu {name}={getattr(self, name)} must be a multiple of {chunk}="
                         f"{getattr(self, chunk)} (a grid step walks its window in key chunks)")
    return self


def _dot(a, b, trans_b=False):
  dims = (((1,), (1 if trans_b else 0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, precision=_PREC, preferred_element_type=jnp.float32)


def _n_chunks(ks, ke, bk):
  """Key chunks of [ks, ke) (0 if empty). Truncating division of a non-negative count: floor
  division (`//`) lowers through `sign`, whose Mosaic rule asks the chip generation."""
  return jax.lax.div(jnp.maximum(ke - ks, 0) + bk - 1, bk)


def row_key_span(dims, block_q, offset=False) -> int:
  """The widest key range [tile_ks, tile_ke) of a forward or dQ row tile. A sparse tile's is one
  block; a dense tile's runs from its first query's block start to its last query: within one
  block for one document without a query offset (computed here from the tiles' queries), else at
  most block_size + block_q - 1 keys (a tile across a block start: documents, an offset)."""
  blk, g, n = dims.block_size, dims.groups, dims.queries * dims.groups
  if not dims.one_doc or offset or dims.queries != dims.seq:
    return blk + block_q
  first_row = np.arange(0, n, block_q)
  first, last = first_row // g, (np.minimum(first_row + block_q, n) - 1) // g
  return max(blk, int(np.max(last + 1 - first // blk * blk)))


def _even_window(span, chunk, cap):
  """The window of the fewest windows of at most `cap` keys (a multiple of `chunk`, at least
  one chunk) that cover `span` keys, evened out: 1536 keys at a cap of 1024 are two windows of
  768, not 1024 and a half-empty 1024."""
  cap = max(chunk, cap // chunk * chunk)
  n = -(-span // cap)
  return -(-(-(-span // n)) // chunk) * chunk


def kv_window(sizes, dims, dp, itemsize, offset=False) -> tuple[int, int]:
  """(W, steps): the keys each grid step of the forward and dQ brings into VMEM (a window at the
  tile's key range, walked in block_k chunks inside the step) and the grid steps a row tile
  takes. W covers the widest tile range (`row_key_span`) in even windows of up to WINDOW_BYTES, so at
  blocks of up to 2048 keys (16-bit, head_dim 128) a tile is one grid step: the grid's fixed cost
  a step is paid once a tile, not once a 128-key chunk (docs/tpu_roofline.md)."""
  span, bk = row_key_span(dims, sizes.block_q, offset), sizes.block_k
  w = sizes.block_kv_window or _even_window(span, bk, WINDOW_BYTES // (dp * itemsize))
  return w, -(-span // w)


def _kv_spec(w, dp, nt):
  """k/v window of w keys at the tile's key range, element-offset along T; clamped past it."""
  def index(b, i, c, ks_ref, ke_ref, *_):
    t = b * nt + i
    ks, ke = ks_ref[t], ke_ref[t]
    c = jnp.minimum(c, jnp.maximum(_n_chunks(ks, ke, w) - 1, 0))
    return b, ks + c * w, 0
  return pl.BlockSpec(_element_block(w, dp), index)


def _window_chunks(start, ke, bk, w):
  """Key chunks of the window at `start` that hold keys of the tile's range [., ke)."""
  return jnp.minimum(_n_chunks(start, ke, bk), w // bk)


def _element_block(bk, dp):
  """A [bk, dp] window at an element offset along T. Mosaic takes element offsets in every dim
  or none: dp is an Element too (its offset is 0, the whole padded head dim)."""
  return (pl.squeezed, pl.Element(bk), pl.Element(dp))


def _row_spec(bq, width, tile_offset=0):
  return pl.BlockSpec((pl.squeezed, bq, width), lambda b, i, c, *_: (b, i + tile_offset, 0))


def _softmax_step(s, m_sc, l_sc, acc_sc, v):
  """One chunk's online softmax on S (s, masked keys -inf): m starts at NEG, finite, so a masked
  key's exp(-inf - m) is 0 and P needs no mask of its own (as the GPU kernels, run 34)."""
  m = m_sc[...]
  m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))  # [Mq, 1]
  p = jnp.exp(s - m_new)
  alpha = jnp.exp(m - m_new)
  l_sc[...] = l_sc[...] * alpha + p.sum(axis=1, keepdims=True)
  acc_sc[...] = acc_sc[...] * alpha + _dot(p.astype(v.dtype), v)
  m_sc[...] = m_new


def _window_loops(chunk, start, ke, nfree, c, bk, w):
  """Runs chunk(j, masked) over window c's key chunks (from key `start`): first those of the
  tile's `nfree` leading chunks that every live row sees whole (`_routing.free_chunks`: no mask),
  then the rest, masked per row."""
  n = _window_chunks(start, ke, bk, w)
  free = jnp.clip(nfree - c * (w // bk), 0, n)
  jax.lax.fori_loop(0, free, lambda j, _: chunk(j, False), None)
  jax.lax.fori_loop(free, n, lambda j, _: chunk(j, True), None)


def _fwd_kernel(ks_ref, ke_ref, nf_ref, q_ref, k_ref, v_ref, lo_ref, hi_ref, o_ref, lse_ref,
                m_sc, l_sc, acc_sc, *, bk, nt, scale):
  b, i, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  t = b * nt + i
  w = k_ref.shape[0]

  @pl.when(c == 0)
  def _():
    m_sc[...] = jnp.full(m_sc.shape, NEG, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  start = ks_ref[t] + c * w

  def chunk(j, masked):  # keys [start + j * bk, + bk) of the window
    at = pl.multiple_of(j * bk, bk)
    s = _dot(q_ref[...], k_ref[pl.ds(at, bk), :], trans_b=True) * scale
    if masked:
      kpos = start + at + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
      s = jnp.where((kpos >= lo_ref[...]) & (kpos < hi_ref[...]), s, -jnp.inf)  # [Mq, Bk]
    _softmax_step(s, m_sc, l_sc, acc_sc, v_ref[pl.ds(at, bk), :])

  _window_loops(chunk, start, ke_ref[t], nf_ref[t], c, bk, w)

  @pl.when(c == pl.num_programs(2) - 1)
  def _():
    l = l_sc[...]
    ok = l > 0
    l_safe = jnp.where(ok, l, 1.0)
    o_ref[...] = (acc_sc[...] * (1.0 / l_safe)).astype(o_ref.dtype)  # one division a row
    lse_ref[...] = jnp.where(ok, m_sc[...] + jnp.log(l_safe), -jnp.inf)


def _dq_kernel(ks_ref, ke_ref, nf_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, lo_ref,
               hi_ref, dq_ref, acc_sc, *, bk, nt, scale):
  b, i, c = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  t = b * nt + i
  w = k_ref.shape[0]

  @pl.when(c == 0)
  def _():
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  start = ks_ref[t] + c * w

  def chunk(j, masked):  # keys [start + j * bk, + bk) of the window
    at = pl.multiple_of(j * bk, bk)
    k, v = k_ref[pl.ds(at, bk), :], v_ref[pl.ds(at, bk), :]
    s = _dot(q_ref[...], k, trans_b=True) * scale  # [Mq, Bk]
    p = jnp.exp(s - lse_ref[...])
    if masked:
      kpos = start + at + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
      p = jnp.where((kpos >= lo_ref[...]) & (kpos < hi_ref[...]), p, 0.0)
    ds = p * (_dot(do_ref[...], v, trans_b=True) - dl_ref[...])
    acc_sc[...] += _dot(ds.astype(k.dtype), k)

  _window_loops(chunk, start, ke_ref[t], nf_ref[t], c, bk, w)

  @pl.when(c == pl.num_programs(2) - 1)
  def _():
    dq_ref[...] = (acc_sc[...] * scale).astype(dq_ref.dtype)


def _dkdv_step(kpos, k, v, q, do, lse, delta, lo, hi, dk, dv, scale, masked=True):
  """One (key chunk, row tile) product; lo/hi/lse/delta are [Mq, 1] columns. Unmasked: every row
  sees every key of the chunk, or is a padding row, whose q, dO and delta are zeros (`_rows`:
  it adds nothing)."""
  s = _dot(q, k, trans_b=True) * scale  # [Mq, Bk]
  p = jnp.exp(s - lse)
  if masked:
    p = jnp.where((kpos >= lo) & (kpos < hi), p, 0.0)  # [Mq, Bk]
  dv += jax.lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())), precision=_PREC,
                            preferred_element_type=jnp.float32)  # [Bk, D]
  ds = p * (_dot(do, v, trans_b=True) - delta)
  dk += jax.lax.dot_general(ds.astype(q.dtype), q, (((0,), (0,)), ((), ())), precision=_PREC,
                            preferred_element_type=jnp.float32) * scale
  return dk, dv


def _dkdv_window(k_ref, v_ref, q_ref, do_ref, lse_ref, dl_ref, lo_ref, hi_ref, dk_ref, dv_ref,
                 first_key, n, bk, scale, free=0):
  """A row tile's products with the first n key chunks of bk keys of a window (keys from
  first_key), each added into its rows of the window's dK/dV block; the first `free` of them
  without a mask (every live row sees them whole)."""
  def chunk(j, masked):
    at = pl.multiple_of(j * bk, bk)
    kpos = first_key + at + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1)
    dk, dv = _dkdv_step(kpos, k_ref[pl.ds(at, bk), :], v_ref[pl.ds(at, bk), :], q_ref[...],
                        do_ref[...], lse_ref[...], dl_ref[...], lo_ref[...], hi_ref[...],
                        dk_ref[pl.ds(at, bk), :], dv_ref[pl.ds(at, bk), :], scale, masked)
    dk_ref[pl.ds(at, bk), :], dv_ref[pl.ds(at, bk), :] = dk, dv

  free = jnp.clip(free, 0, n)
  jax.lax.fori_loop(0, free, lambda j, _: chunk(j, False), None)
  jax.lax.fori_loop(free, n, lambda j, _: chunk(j, True), None)


def _dkdv_dense_kernel(kt_ref, rt0_ref, nrt_ref, q0_ref, k_ref, v_ref, q_ref, do_ref, lse_ref,
                       dl_ref, lo_ref, hi_ref, dk_ref, dv_ref, *, bk, bq, groups, nkt, scale):
  b, c, m = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  t, w = b * nkt + c, k_ref.shape[0]

  @pl.when(m == 0)
  def _():
    dk_ref[...] = jnp.zeros(dk_ref.shape, jnp.float32)
    dv_ref[...] = jnp.zeros(dv_ref.shape, jnp.float32)

  # the window's key chunks up to the row tile's last query (dense rows t * G + g of the local
  # queries, which start at position q0): causal, the later chunks are masked for every row
  first_key = kt_ref[t] * w
  last_q = q0_ref[0] + jax.lax.div((rt0_ref[t] + m + 1) * bq - 1, jnp.int32(groups))
  n = jnp.minimum(_n_chunks(first_key, last_q + 1, bk), w // bk)
  n = jnp.where(m < nrt_ref[t], n, 0)
  _dkdv_window(k_ref, v_ref, q_ref, do_ref, lse_ref, dl_ref, lo_ref, hi_ref, dk_ref, dv_ref,
               first_key, n, bk, scale)


def _dkdv_sparse_kernel(ks_ref, grp_ref, k_ref, v_ref, q_ref, do_ref, lse_ref, dl_ref, lo_ref,
                        hi_ref, dk_ref, dv_ref, *, bk, nt, dt, block, scale):
  b, c, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  t, w = b * nt + dt + i, k_ref.shape[0]
  first = (i == 0) | (grp_ref[jnp.maximum(t - 1, 0)] != grp_ref[t])

  @pl.when(first)  # a new group: its output block is fresh
  def _():
    dk_ref[...] = jnp.zeros(dk_ref.shape, jnp.float32)
    dv_ref[...] = jnp.zeros(dv_ref.shape, jnp.float32)

  # window c of the group's block [ks, ks + block): its chunks that hold keys of the block;
  # every row of the group chose the whole block (a past block is full), so the chunks inside
  # it need no mask, only one that runs past the block's end (block not a multiple of bk)
  n = jnp.minimum(_n_chunks(c * w, jnp.int32(block), bk), w // bk)
  _dkdv_window(k_ref, v_ref, q_ref, do_ref, lse_ref, dl_ref, lo_ref, hi_ref, dk_ref, dv_ref,
               ks_ref[t] + c * w, n, bk, scale, free=jax.lax.div(block - c * w, bk))


def _call(kernel, grid, n_prefetch, in_specs, out_specs, out_shape, scratch, interpret,
          semantics, aliases=None):
  """aliases: {operand index (scalar prefetch operands counted): output index}; an output written
  over an operand (same block index map: a block is read before it is written back)."""
  spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=n_prefetch, grid=grid,
                                      in_specs=in_specs, out_specs=out_specs,
                                      scratch_shapes=scratch)
  if interpret:
    interpret = pltpu.InterpretParams() if hasattr(pltpu, "InterpretParams") else True
  return pl.pallas_call(kernel, grid_spec=spec, out_shape=out_shape, interpret=interpret,
                        compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
                        input_output_aliases=aliases or {}, name=_kernel_name(kernel))


def _kernel_name(kernel) -> str:
  """"moba_tpu_fwd" for _fwd_kernel: what profiles and HLO dumps show."""
  return "moba_tpu_" + kernel.func.__name__.strip("_").removesuffix("_kernel")


def _prep(q, k, v, pad_k):
  """Row layouts: q [BK, TqG, Dp], k/v [BK, T + pad_k, Dp] in q's dtype (k, v wider than q, the
  context-parallel path's float32, are rounded to it); Dp a multiple of 128 lanes. pad_k: the
  widest window a kernel reads at a key position (windows start at keys < T)."""
  kv_heads, dim = k.shape[2], q.shape[-1]
  dp = rt._round_up(dim, 128)
  padd = lambda x, t=0: jnp.pad(x, ((0, 0), (0, t), (0, dp - dim)))
  kv = lambda x: padd(rt.heads_major(x.astype(q.dtype), kv_heads), pad_k)
  return padd(rt.heads_major(q, kv_heads)), kv(k), kv(v)


def _tile_ranges(routing, bk):
  """The forward's and dQ's scalar-prefetch operands, flat [BK * NT] int32: each row tile's key
  range [ks, ke) and its leading key chunks of bk keys that need no mask (`free_chunks`)."""
  nfree = rt.free_chunks(routing.tile_ks, routing.tile_ke, routing.lo, routing.hi, routing.rq, bk)
  return routing.tile_ks.reshape(-1), routing.tile_ke.reshape(-1), nfree.reshape(-1)


def _rows(x, routing):
  """Gathers per-query data into routed row order: [BK, TG, W] -> [BK, R, W], zeros in the
  padding rows (rq < 0): where a kernel skips the mask (the sparse dK/dV) they add nothing, where
  a copy of a real query's rows would add to the dK/dV of every block it is padded into."""
  live = routing.rq[..., None] >= 0
  return jnp.where(live, jnp.take_along_axis(x, jnp.maximum(routing.rq, 0)[..., None], axis=1),
                   jnp.zeros((), x.dtype))


def _window(q, routing, dims, sizes):
  """`kv_window` of this call: (W, grid steps a row tile)."""
  dp = rt._round_up(q.shape[-1], 128)
  return kv_window(sizes, dims, dp, q.dtype.itemsize, routing.q_start is not None)


def _forward(q, k, v, routing, dims, sizes, scale, interpret):
  batch, seq = q.shape[:2]
  w, nw = _window(q, routing, dims, sizes)
  qr, kr, vr = _prep(q, k, v, w)
  batch_kv, dp = qr.shape[0], qr.shape[-1]
  bq, bk, nt = sizes.block_q, sizes.block_k, dims.tiles
  kernel = functools.partial(_fwd_kernel, bk=bk, nt=nt, scale=scale)
  f32 = jnp.float32
  call = _call(kernel, (batch_kv, nt, nw), 3,
               [_row_spec(bq, dp), _kv_spec(w, dp, nt), _kv_spec(w, dp, nt), _row_spec(bq, 1),
                _row_spec(bq, 1)],
               [_row_spec(bq, dp), _row_spec(bq, 1)],
               # partial outputs in q's dtype (rounded once, as on the GPU); merged in float32
               [jax.ShapeDtypeStruct((batch_kv, dims.rows, dp), q.dtype),
                jax.ShapeDtypeStruct((batch_kv, dims.rows, 1), f32)],
               [pltpu.VMEM((bq, 1), f32), pltpu.VMEM((bq, 1), f32), pltpu.VMEM((bq, dp), f32)],
               interpret, ("parallel", "parallel", "arbitrary"),
               aliases={3: 0})  # o written over the gathered q rows (no buffer of its own)
  o_rows, lse_rows = call(*_tile_ranges(routing, bk), _rows(qr, routing), kr, vr,
                          routing.lo[..., None], routing.hi[..., None])
  o, lse = rt.merge_rows(o_rows, lse_rows[..., 0], routing.pos)
  o = o.astype(q.dtype)
  return rt.heads_minor(o[..., :q.shape[-1]], batch, seq), (o, lse)


def _dense_key_tiles(routing, dims, bkd, seq):
  """Key tiles of the dense dK/dV pass [BK, n] and their first row tile and row-tile count:
  key tile kt sees the row tiles of the (local) queries [kt * Bk, block end). Without a query
  offset every key tile; with one, the n tiles from the one holding the first local query's
  block start (the only keys the local queries' own blocks reach: n covers Tq + block_size)."""
  bq, g = dims.block_q, dims.groups
  batch_kv, nkt = routing.rq.shape[0], -(-seq // bkd)
  if routing.q_start is None:
    kt = jnp.broadcast_to(jnp.arange(nkt, dtype=jnp.int32), (batch_kv, nkt))
    rows = lambda t: t * g  # first dense row of query position t
  else:
    n = min(nkt, -(-(dims.queries + dims.block_size) // bkd) + 1)
    c0 = jnp.minimum(routing.lo[:, :1] // bkd, nkt - n)  # dense row 0: the first local query
    kt = c0 + jnp.arange(n, dtype=jnp.int32)
    rows = lambda t: jnp.clip(t - routing.q_start, 0, dims.queries) * g
  first = kt * bkd
  rt0 = rows(first) // bq
  r1 = rows(jnp.take_along_axis(routing.block_end, jnp.minimum(first + bkd, seq) - 1, axis=1))
  nrt = jnp.maximum(-(-r1 // bq) - rt0, 0)
  # a key tile without local rows (nrt 0) still names a row tile: the last dense one
  return kt, jnp.minimum(rt0, dims.dense_rows // bq - 1), nrt


def dkdv_window(sizes, dims, dp) -> int:
  """Keys of a dK/dV grid step's window (walked in block_k_dkv chunks, each added into its rows
  of the window's float32 dK and dV blocks): the routing block rounded up to block_k_dkv, in
  even windows of up to WINDOW_BYTES of each float32 block (1024 keys at head_dim 128), or
  block_kv_window_dkv."""
  return sizes.block_kv_window_dkv or _even_window(dims.block_size, sizes.block_k_dkv,
                                                    WINDOW_BYTES // (dp * 4))


def _dense_row_tiles(dims, w, offset) -> int:
  """Grid steps of a dense dK/dV window: the most row tiles a window of w keys sees (`_dense_key_
  tiles`' count), computed for one document without an offset, else its bound."""
  bq, g, blk, seq = dims.block_q, dims.groups, dims.block_size, dims.seq
  if not dims.one_doc or offset or dims.queries != seq:
    return -(-(blk + w) * g // bq) + 1
  first = np.arange(0, seq, w)
  last = np.minimum(first + w, seq) - 1
  r1 = np.minimum((last // blk + 1) * blk, seq) * g
  return int(np.max(-(-r1 // bq) - first * g // bq))


def _dkdv_dense(args, routing, dims, sizes, scale, interpret, seq):
  """dK/dV of the current blocks: key window c sees the row tiles of queries [c * W, block end)
  (`dkdv_window`'s W keys)."""
  bq, bkd, g = sizes.block_q, sizes.block_k_dkv, dims.groups
  kr, vr, q_rows, do_rows, lse_rows, dl_rows, lo, hi = args
  batch_kv, dp = kr.shape[0], kr.shape[-1]
  w = dkdv_window(sizes, dims, dp)
  kt, rt0, nrt = _dense_key_tiles(routing, dims, w, seq)
  nkt = kt.shape[1]
  nrd = _dense_row_tiles(dims, w, routing.q_start is not None)
  q0 = jnp.zeros((1,), jnp.int32) if routing.q_start is None else routing.q_start.reshape(1)

  def row_index(b, c, m, kt_ref, rt0_ref, nrt_ref, *_):
    t = b * nkt + c
    return b, rt0_ref[t] + jnp.minimum(m, jnp.maximum(nrt_ref[t] - 1, 0)), 0

  row = lambda width: pl.BlockSpec((pl.squeezed, bq, width), row_index)
  key = pl.BlockSpec((pl.squeezed, w, dp), lambda b, c, m, kt_ref, *_: (b, kt_ref[b * nkt + c],
                                                                         0))
  out = pl.BlockSpec((pl.squeezed, w, dp), lambda b, c, m, *_: (b, c, 0))
  kernel = functools.partial(_dkdv_dense_kernel, bk=bkd, bq=bq, groups=g, nkt=nkt, scale=scale)
  shape = jax.ShapeDtypeStruct((batch_kv, nkt * w, dp), jnp.float32)
  call = _call(kernel, (batch_kv, nkt, nrd), 4,
               [key, key, row(dp), row(dp), row(1), row(1), row(1), row(1)], [out, out],
               [shape, shape], [], interpret, ("parallel", "parallel", "arbitrary"))
  dk, dv = call(kt.reshape(-1), rt0.reshape(-1), nrt.reshape(-1), q0, *args)
  return dk, dv, kt[:, :1] * w  # rows in key order from the first window's first key


def _dkdv_sparse(args, routing, dims, sizes, scale, interpret):
  """dK/dV of chosen past blocks: consecutive row tiles of one group share an output block, a
  window of `dkdv_window`'s W keys of the group's block a grid step."""
  bq, bkd, nt = sizes.block_q, sizes.block_k_dkv, dims.tiles
  kr = args[0]
  batch_kv, dp = kr.shape[0], kr.shape[-1]
  dt, nts = dims.dense_rows // bq, dims.sparse_rows // bq
  w = dkdv_window(sizes, dims, dp)
  nck = -(-dims.block_size // w)
  key = pl.BlockSpec(_element_block(w, dp),
                     lambda b, c, i, ks_ref, grp_ref: (b, ks_ref[b * nt + dt + i] + c * w, 0))
  row = lambda width: pl.BlockSpec((pl.squeezed, bq, width), lambda b, c, i, *_: (b, dt + i, 0))
  out = pl.BlockSpec((pl.squeezed, w, dp),
                     lambda b, c, i, ks_ref, grp_ref: (b, grp_ref[b * nt + dt + i] * nck + c, 0))
  kernel = functools.partial(_dkdv_sparse_kernel, bk=bkd, nt=nt, dt=dt, block=dims.block_size,
                             scale=scale)
  n_out = (dims.max_groups + 1) * nck * w
  shape = jax.ShapeDtypeStruct((batch_kv, n_out, dp), jnp.float32)
  call = _call(kernel, (batch_kv, nck, nts), 2,
               [key, key, row(dp), row(dp), row(1), row(1), row(1), row(1)], [out, out],
               [shape, shape], [], interpret, ("parallel", "arbitrary", "arbitrary"))
  return call(routing.tile_ks.reshape(-1), routing.tile_group.reshape(-1), *args)


def in_key_order(outs, first_key, routing, dims, seq):
  """dK (or dV) [BK, seq, Dp] float32 from the dK/dV passes' outputs, by gathers (each key has
  one row in each pass or none; this replaces scatter-adds of the rows, which TPUs are reported
  to run far slower than gathers: docs/tpu_roofline.md). outs = [dense rows, sparse rows (when
  there are past blocks)]: the dense pass's rows are keys first_key [BK, 1] onwards, in order
  (`_dkdv_dense`); the sparse pass's rows are, group by group, a run of `span` rows over the
  keys from the group's block start, the first block_size of them its block's keys
  (`_dkdv_sparse`: a window past the block's end sees no row of its group; the groups' blocks
  are disjoint, ascending in `routing.group_p`)."""
  batch_kv = first_key.shape[0]
  keys = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch_kv, seq))

  def take(x, row, ok):  # x's rows at row [BK, seq] where ok, else zeros
    got = jnp.take_along_axis(x, jnp.clip(row, 0, x.shape[1] - 1)[..., None], axis=1)
    return jnp.where(ok[..., None], got, jnp.zeros((), x.dtype))

  row = keys - first_key
  out = take(outs[0], row, (row >= 0) & (row < outs[0].shape[1]))
  if len(outs) == 1:
    return out
  gp = routing.group_p  # [BK, Gm]: seq where no group
  span = outs[1].shape[1] // (gp.shape[1] + 1)  # rows a group (the last group: padding tiles')
  n_g = gp.shape[1]
  at_start = jnp.full((batch_kv, seq), -1, jnp.int32).at[
      jnp.arange(batch_kv)[:, None], gp].set(jnp.arange(n_g, dtype=jnp.int32), mode="drop")
  group = jax.lax.cummax(at_start, axis=1)  # the last group starting at or before each key
  offset = keys - jnp.take_along_axis(gp, jnp.maximum(group, 0), axis=1)
  ok = (group >= 0) & (offset < dims.block_size)
  return out + take(outs[1], group * span + offset, ok)


def _backward(q, k, v, routing, o, lse, do, dims, sizes, scale, interpret):
  batch, seq, _, dim = k.shape  # T keys (Tq = q.shape[1] queries with a query offset)
  # After the forward's residuals: else XLA merges the gather of q rows below with the forward's
  # (the same computation) and keeps the rows from the forward on (moba_gpu.backward's note)
  q, do, o, lse = jax.lax.optimization_barrier((q, do, o, lse))
  w, nw = _window(q, routing, dims, sizes)
  qr, kr, vr = _prep(q, k, v, max(w, dkdv_window(sizes, dims, rt._round_up(dim, 128))))
  batch_kv, dp = qr.shape[0], qr.shape[-1]
  bq, bk, nt = sizes.block_q, sizes.block_k, dims.tiles
  dor = jnp.pad(rt.heads_major(do, k.shape[2]), ((0, 0), (0, 0), (0, dp - dim)))
  delta = jnp.sum(o.astype(jnp.float32) * dor.astype(jnp.float32), axis=-1)  # [BK, TG]
  q_rows, do_rows = _rows(qr, routing), _rows(dor, routing)
  lse_rows, dl_rows = _rows(lse[..., None], routing), _rows(delta[..., None], routing)
  lo, hi = routing.lo[..., None], routing.hi[..., None]
  args = (kr, vr, q_rows, do_rows, lse_rows, dl_rows, lo, hi)
  *dense, first_key = _dkdv_dense(args, routing, dims, sizes, scale, interpret, seq)
  parts = [dense]  # (dK, dV) rows of each pass
  if dims.max_groups:
    parts.append(_dkdv_sparse(args, routing, dims, sizes, scale, interpret))
  # dK/dV first: the dQ kernel then writes its rows over the gathered q rows, their last use (the
  # barrier orders it after the dK/dV; else XLA would copy them first)
  q_rows, parts = jax.lax.optimization_barrier((q_rows, parts))

  kernel = functools.partial(_dq_kernel, bk=bk, nt=nt, scale=scale)
  kv = _kv_spec(w, dp, nt)
  call = _call(kernel, (batch_kv, nt, nw), 3,
               [_row_spec(bq, dp), kv, kv, _row_spec(bq, dp)] + [_row_spec(bq, 1)] * 4,
               _row_spec(bq, dp), jax.ShapeDtypeStruct((batch_kv, dims.rows, dp), q.dtype),
               [pltpu.VMEM((bq, dp), jnp.float32)], interpret,
               ("parallel", "parallel", "arbitrary"), aliases={3: 0})
  dq_rows = call(*_tile_ranges(routing, bk), q_rows, kr, vr, do_rows, lse_rows, dl_rows, lo, hi)
  dq = rt.gather_rows_sum(dq_rows, routing.pos)  # [BK, TG, Dp]
  dk, dv = (in_key_order([p[i] for p in parts], first_key, routing, dims, seq) for i in (0, 1))
  back = lambda x, like: rt.heads_minor(x[..., :dim], batch, like.shape[1]).astype(like.dtype)
  return back(dq, q), back(dk, k), back(dv, v)


_moba_vjp = rt.custom_vjp_attention(_forward, _backward)


def pallas_calls(jaxpr) -> list:
  """The pallas_call equations of a (closed) jaxpr, nested ones included (scan, cond, remat)."""
  found = []
  for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
    if eqn.primitive.name == "pallas_call":
      found.append(eqn)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if hasattr(getattr(sub, "jaxpr", sub), "eqns"):
          found += pallas_calls(sub)
  return found


def grid_steps(jaxpr) -> dict[str, int]:
  """Grid steps of each Pallas kernel in a traced program, by kernel name (summed over calls):
  what the per-step fixed cost of a TPU grid is paid for (tools/tpu_steps.py)."""
  steps = {}
  for eqn in pallas_calls(jaxpr):
    name = str(eqn.params.get("name") or eqn.params.get("name_and_src_info")).split()[0]
    steps[name] = steps.get(name, 0) + math.prod(eqn.params["grid_mapping"].grid)
  return steps


def _block_dims(block_shape) -> tuple[int, ...]:
  return tuple(getattr(d, "block_size", 1 if d is None or d is pl.squeezed else d)
               for d in block_shape)


def check_tiles(jaxpr) -> list[str]:
  """Checks every VMEM block of every Pallas kernel in a traced program (`jax.jit(f).trace(...)
  .jaxpr`) against Mosaic's tiling rule (`tile_error`). Raises ValueError naming the kernel, the
  operand and the block; returns the names of the kernels checked."""
  names = []
  for eqn in pallas_calls(jaxpr):
    name = str(eqn.params.get("name") or eqn.params.get("name_and_src_info")).split()[0]
    for bm in eqn.params["grid_mapping"].block_mappings:
      space = str(getattr(getattr(bm, "block_aval", None), "memory_space", "")).lower()
      if any(s in space for s in ("smem", "any", "hbm", "semaphore")):
        continue
      err = tile_error(_block_dims(bm.block_shape), bm.array_aval.shape, bm.array_aval.dtype)
      if err:
        raise ValueError(f"{name} {bm.origin}: {err}")
    names.append(name)
  return names


def moba_attention_tpu(q, k, v, segment_ids, *, block_size, topk, softmax_scale=None,
                       options: KernelOptions | None = None, q_start=None):
  """Causal MoBA attention. q [B, T, H, D]; k, v [B, T, K, D]; segment_ids [B, T] int or None
  (one document per row: no data-dependent branch in the routing).
  options: interpret mode and tiles (BlockSizes fields in order; default get_default).
  q_start: q [B, Tq, H, D] are positions [q_start, q_start + Tq) of the sequence of k, v and
  segment_ids (context parallelism), as in moba_gpu.moba_attention_gpu."""
  rt.check_query_offset(q, k, v, segment_ids, q_start)
  return _moba_attention_tpu(q, k, v, segment_ids, q_start, block_size=block_size, topk=topk,
                             softmax_scale=softmax_scale, options=options)


@functools.partial(jax.jit, static_argnames=("block_size", "topk", "softmax_scale", "options"))
def _moba_attention_tpu(q, k, v, segment_ids, q_start, *, block_size, topk, softmax_scale,
                        options):
  options = options or KernelOptions()
  sizes = options.block_sizes(BlockSizes, BlockSizes.get_default())
  sizes.validate(q.dtype)
  run = functools.partial(rt.run_kernel, _moba_vjp, block_size=block_size, topk=topk,
                          softmax_scale=softmax_scale, interpret=options.interpret, sizes=sizes,
                          q_start=q_start)
  return rt.over_mesh_shards(run, q, k, v, segment_ids)
