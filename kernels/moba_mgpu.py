"""MoBA's forward row tiles on Hopper: Pallas Mosaic GPU (TMA, wgmma, a producer warpgroup).

The same work as `moba_gpu._fwd_kernel` (docs/kernel_notes.md: one row tile of the routing layout
streams the one key range its rows share, online softmax, float32 partial rows and their
log-sum-exp), written for the H100/H200's tensor cores the way FlashAttention-3 is:

* one CTA per 128-row tile, three warpgroups: two compute warpgroups (64 rows each) and a
  producer that streams the tile's keys and values into a ring of SMEM slots by TMA, refilling a
  slot when both compute warpgroups have released it (mbarriers: no `__syncthreads` anywhere);
* S = Q K^T and O += P V on wgmma from SMEM (P from registers), softmax in the exp2 domain;
* the query rows are contiguous: the caller gathers them into the routing's row order first
  (`gather_rows`; TMA on Hopper cannot gather rows), K and V are read in place from
  [B, T, K, D] by strided TMA boxes at any key offset (keys past T are zero-filled by TMA and
  masked);
* key chunks that every row of the tile sees whole (`free_chunks`: all of a sparse tile's block,
  a dense tile's chunks before the diagonal) skip the mask; the rest are masked per row by
  [lo, hi).

Limits (`refusal` says which, one line): 16-bit q/k/v, head_dim 64 or 128, a 128-row routing tile.
Interpret mode (`InterpretGPUParams`) needs JAX's Mosaic GPU interpreter with TMA and barriers
(jax >= 0.11); `plgpu.ACC` accumulation through `pl.run_state` has no interpreter rule yet, so
interpreted runs form each P V product with a dot of the same operands (`_mma_add`).
"""

from __future__ import annotations

import functools
import inspect
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

ROWS = 128  # the routing tile: two compute warpgroups of 64 rows
WG_ROWS = 64
NEG = -1e30  # finite: a row that has seen no visible key yet keeps alpha = exp2(0) = 1 and p = 0
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
SMEM_BYTES = 227 * 1024  # the H100/H200's dynamic shared memory per CTA


def interpreter_available() -> bool:
  """Whether this JAX can interpret a Mosaic GPU kernel with TMA and barriers (jax >= 0.11; the
  interpreter of 0.10 stops at `copy_gmem_to_smem` + `barrier_wait`)."""
  return hasattr(plgpu, "InterpretGPUParams")


def refusal(dtype, head_dim, block_q, interpret=False) -> str | None:
  """Why this kernel cannot run a case (None: it can)."""
  if interpret and not interpreter_available():
    return (f"the Mosaic GPU forward cannot be interpreted by jax {jax.__version__} (its "
            "interpreter has no TMA and barriers; jax >= 0.11 has)")
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return f"the Mosaic GPU forward takes bfloat16 or float16 (wgmma), got {jnp.dtype(dtype).name}"
  if head_dim not in (64, 128):
    return f"the Mosaic GPU forward takes head_dim 64 or 128, got {head_dim}"
  if block_q != ROWS:
    return f"the Mosaic GPU forward needs block_q={ROWS} (two warpgroups of 64 rows), got {block_q}"
  return None


def stages_for(block_kv: int, head_dim: int, itemsize: int = 2) -> int:
  """Slots of the K/V ring that fit beside two Q buffers (128 rows each), lse and [lo, hi)."""
  fixed = 2 * ROWS * head_dim * itemsize + 5 * ROWS * 4
  per_slot = 2 * block_kv * head_dim * itemsize
  return max(2, min(4, (SMEM_BYTES - fixed - 4096) // per_slot))


def _transpose(ref):
  return ref.transpose((1, 0)) if hasattr(ref, "transpose") else plgpu.transpose_ref(ref, (1, 0))


_LOAD_TAKES_IDX = "idx" in inspect.signature(plgpu.load).parameters and (
    inspect.signature(plgpu.load).parameters["idx"].default is inspect.Parameter.empty)


def _load(ref, layout):
  if _LOAD_TAKES_IDX:  # jax 0.10: load(ref, idx, layout=...)
    return plgpu.load(ref, (), layout=layout)
  return plgpu.load(ref, layout=layout)


def _mma_add(acc, a, b, interpret):
  """acc + a @ b on the tensor cores (a: registers or SMEM, b: SMEM)."""
  if interpret:  # no interpreter rule for pl.run_state, nor for wgmma with a in registers
    return acc + jnp.dot(a, b[...], preferred_element_type=jnp.float32)
  return pl.run_state(lambda r: plgpu.wgmma(r, a, b))(plgpu.ACC.init(acc))


def _tiled(shape, dtype):
  itemsize = jnp.dtype(dtype).itemsize
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 128 // itemsize)),
                                              plgpu.SwizzleTransform(128)))


def gather_rows(x, rq, kv_heads, groups):
  """The routing's rows of x [B, T, H, D] for every (batch, kv head): [B * K, R, D] in x's dtype
  (row r is query row rq[bk, r] = t * G + g of kv head k; padding rows (-1) read row 0)."""
  batch, seq, heads, dim = x.shape
  xs = x.reshape(batch, seq, kv_heads, groups, dim)
  r = jnp.maximum(rq, 0).reshape(batch, kv_heads, -1)
  t, g = r // groups, r % groups
  bi = jnp.arange(batch)[:, None, None]
  ki = jnp.arange(kv_heads)[None, :, None]
  return xs[bi, t, ki, g].reshape(batch * kv_heads, -1, dim)


def free_chunks(ks, ke, lo, hi, rq, block_kv):
  """[BK, NT] leading key chunks of each tile that every live row sees whole (no mask); the
  chunks start at the tile's first key rounded down to a multiple of 8, as the kernel's do."""
  bk_n, n_tiles = ks.shape
  ks = ks // 8 * 8
  shape = (bk_n, n_tiles, -1)
  live = (rq >= 0).reshape(shape)
  lo_max = jnp.max(jnp.where(live, lo.reshape(shape), 0), axis=-1)
  hi_min = jnp.min(jnp.where(live, hi.reshape(shape), 2 ** 30), axis=-1)
  n_all = -(-(ke - ks) // block_kv)
  n = jnp.where(lo_max <= ks, jnp.maximum(hi_min - ks, 0) // block_kv, 0)
  return jnp.minimum(n, n_all).astype(jnp.int32)


def num_ctas(interpret: bool) -> int:
  """CTAs of the persistent grid: one per SM of the GPU (3 when interpreted: several tiles per
  CTA, as on the GPU)."""
  if interpret:
    return 3
  return int(getattr(jax.devices()[0], "core_count", 0) or 132)


def forward_rows(ks, ke, nfree, lo, hi, q_rows, k, v, *, scale, block_kv, interpret=False,
                 ctas=None):
  """Partial rows of every routing tile: o [BK, R, D] float32 and lse [BK, R] float32.

  ks, ke, nfree [BK, NT] int32 (tile key ranges and their unmasked leading chunks); lo, hi
  [BK, R] int32 (each row's visible keys); q_rows [BK, R, D] (`gather_rows`); k, v [B, T, K, D]
  in q_rows' dtype.

  Persistent: `ctas` CTAs (default `num_ctas`) take the BK * NT tiles round-robin (consecutive
  CTAs, consecutive tiles of one kv head: neighbours share key blocks in L2). The producer's ring
  of K/V slots runs on across tiles, and it loads the next tile's query rows into the second of
  two Q buffers, so a tile's loads overlap the previous tile's compute."""
  bk_n, rows, dim = q_rows.shape
  batch, seq, kv_heads, _ = k.shape
  n_tiles = rows // ROWS
  items = bk_n * n_tiles
  n_ctas = min(items, ctas or num_ctas(interpret))
  dtype = q_rows.dtype
  bkv = block_kv
  stages = stages_for(bkv, dim, jnp.dtype(dtype).itemsize)
  qk_scale = scale * LOG2E
  row_layout = plgpu.Layout.WGMMA.reduce(1)

  def kernel(ks_ref, ke_ref, nf_ref, lo_ref, hi_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, scoped):
    (q_smem, k_smem, v_smem, lse_smem, lo_smem, hi_smem), bars, frees = scoped
    q_bars, lo_bars, hi_bars, k_bars, v_bars = bars
    q_free, k_free, v_free = frees
    cta, wg = lax.axis_index("cta"), lax.axis_index("wg")
    my_items = lax.div(jnp.int32(items - 1) - cta, jnp.int32(n_ctas)) + 1

    def item(i):  # the i-th tile of this CTA: (bk, tile, first key (a multiple of 8), chunks)
      w = cta + i * n_ctas
      bk, tile = lax.div(w, jnp.int32(n_tiles)), lax.rem(w, jnp.int32(n_tiles))
      # TMA boxes into the (8, x)-tiled SMEM start on a multiple of 8 rows: keys before the
      # tile's first one are masked like any other invisible key.
      ks = lax.div(ks_ref[bk, tile], jnp.int32(8)) * 8
      n = jnp.maximum(lax.div(ke_ref[bk, tile] - ks + (bkv - 1), jnp.int32(bkv)), 0)
      return bk, tile, ks, n

    @pl.when(wg < 2)
    def _compute():
      plgpu.set_max_registers(232, action="increase")
      col = lambda x: lax.broadcast_in_dim(x, (WG_ROWS, bkv), [0])

      def tile_rows(i, g):
        bk, tile, ks, n = item(i)
        buf = lax.rem(i, 2)
        mine = buf * 2 + wg
        for bar in (q_bars, lo_bars, hi_bars):
          plgpu.barrier_wait(bar.at[mine])
        q_w = q_smem.at[mine]
        lo = _load(lo_smem.at[mine], row_layout)
        hi = _load(hi_smem.at[mine], row_layout)

        def step(s, carry, masked):
          acc, m, l = carry
          slot = lax.rem(g + s, jnp.int32(stages))
          plgpu.barrier_wait(k_bars.at[slot])

          def qk_fn(acc_ref):
            plgpu.wgmma(acc_ref, q_w, _transpose(k_smem.at[slot]))
            return acc_ref[...]

          qk = pl.run_scoped(qk_fn, plgpu.ACC((WG_ROWS, bkv), jnp.float32))
          plgpu.barrier_arrive(k_free.at[slot])
          x = qk * qk_scale
          if masked:
            kpos = plgpu.broadcasted_iota(jnp.int32, (WG_ROWS, bkv), 1,
                                          layout=plgpu.Layout.WGMMA)
            kpos = kpos + (ks + s * bkv)
            vis = (kpos >= col(lo)) & (kpos < col(hi))
            x = jnp.where(vis, x, NEG)
          m_new = jnp.maximum(m, x.max(axis=1))
          alpha = jnp.exp2(m - m_new)
          p = jnp.exp2(x - col(m_new))
          if masked:
            p = jnp.where(vis, p, 0.0)
          l = l * alpha + p.sum(axis=1)
          acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
          p16 = p.astype(dtype)
          plgpu.barrier_wait(v_bars.at[slot])
          acc = _mma_add(acc, p16, v_smem.at[slot], interpret)
          plgpu.barrier_arrive(v_free.at[slot])
          return acc, m_new, l

        acc = plgpu.layout_cast(jnp.zeros((WG_ROWS, dim), jnp.float32), plgpu.Layout.WGMMA)
        m = plgpu.layout_cast(jnp.full((WG_ROWS,), NEG, jnp.float32), row_layout)
        l = plgpu.layout_cast(jnp.zeros((WG_ROWS,), jnp.float32), row_layout)
        nf = jnp.minimum(nf_ref[bk, tile], n)
        carry = lax.fori_loop(0, nf, functools.partial(step, masked=False), (acc, m, l))
        acc, m, l = lax.fori_loop(nf, n, functools.partial(step, masked=True), carry)
        plgpu.barrier_arrive(q_free.at[buf])  # this buffer's rows are read: the producer may refill

        ok = l > 0
        l_safe = jnp.where(ok, l, 1.0)
        r0 = tile * ROWS + wg * WG_ROWS
        o_ref.at[bk, pl.ds(r0, WG_ROWS)][...] = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's lse left lse_smem
        lse_smem.at[wg][...] = jnp.where(ok, m * LN2 + jnp.log(l_safe), -jnp.inf)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[bk, pl.ds(r0, WG_ROWS)])
        return g + n

      lax.fori_loop(0, my_items, tile_rows, jnp.int32(0))
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")

      def tile_loads(i, g):
        bk, tile, ks, n = item(i)
        b, kvh = lax.div(bk, jnp.int32(kv_heads)), lax.rem(bk, jnp.int32(kv_heads))
        buf = lax.rem(i, 2)

        @pl.when(i >= 2)
        def _():
          plgpu.barrier_wait(q_free.at[buf])  # both warpgroups are done with tile i - 2

        for w in range(2):
          rows_w = pl.ds(tile * ROWS + w * WG_ROWS, WG_ROWS)
          at = buf * 2 + w
          plgpu.copy_gmem_to_smem(q_ref.at[bk, rows_w], q_smem.at[at], q_bars.at[at])
          plgpu.copy_gmem_to_smem(lo_ref.at[bk, rows_w], lo_smem.at[at], lo_bars.at[at])
          plgpu.copy_gmem_to_smem(hi_ref.at[bk, rows_w], hi_smem.at[at], hi_bars.at[at])

        def load(s, _):
          slot = lax.rem(g + s, jnp.int32(stages))

          @pl.when(g + s >= stages)
          def _():  # the slot's previous keys are consumed by both warpgroups
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])

          at = (b, pl.ds(ks + s * bkv, bkv), kvh)
          plgpu.copy_gmem_to_smem(k_ref.at[at], k_smem.at[slot], k_bars.at[slot])
          plgpu.copy_gmem_to_smem(v_ref.at[at], v_smem.at[slot], v_bars.at[slot])

        lax.fori_loop(0, n, load, None)
        return g + n

      g_end = lax.fori_loop(0, my_items, tile_loads, jnp.int32(0))
      # Drain: observe the releases of the last keys and query rows (no phase left unseen when
      # the barriers go; the CTA ends after every SMEM read).
      for j in range(stages):
        gs = g_end - stages + j

        @pl.when(gs >= 0)
        def _():
          slot = lax.rem(gs, jnp.int32(stages))
          plgpu.barrier_wait(k_free.at[slot])
          plgpu.barrier_wait(v_free.at[slot])

      for j in (2, 1):
        @pl.when(my_items >= j)
        def _():
          plgpu.barrier_wait(q_free.at[lax.rem(my_items - j, 2)])

  def moba_mgpu_fwd(*refs):  # the kernel's name in profiles
    scratch = (
        _tiled((4, WG_ROWS, dim), dtype),  # Q: (buffer, warpgroup) -> 64 rows
        _tiled((stages, bkv, dim), dtype),
        _tiled((stages, bkv, dim), dtype),
        plgpu.SMEM((2, WG_ROWS), jnp.float32),
        plgpu.SMEM((4, WG_ROWS), jnp.int32),
        plgpu.SMEM((4, WG_ROWS), jnp.int32),
    )
    bars = (plgpu.Barrier(num_barriers=4),) * 3 + (plgpu.Barrier(num_barriers=stages),) * 2
    frees = (plgpu.Barrier(num_arrivals=2, num_barriers=2),
             plgpu.Barrier(num_arrivals=2, num_barriers=stages),
             plgpu.Barrier(num_arrivals=2, num_barriers=stages))
    pl.run_scoped(lambda *s: kernel(*refs, s), scratch, bars, frees, collective_axes="wg")

  kwargs = {"interpret": plgpu.InterpretGPUParams()} if interpret else {
      "compiler_params": plgpu.CompilerParams(approx_math=True)}
  out_type = (jax.ShapeDtypeStruct((bk_n, rows, dim), jnp.float32),
              jax.ShapeDtypeStruct((bk_n, rows), jnp.float32))
  return plgpu.kernel(moba_mgpu_fwd, out_type=out_type, grid=(n_ctas,), grid_names=("cta",),
                      num_threads=3, thread_name="wg", **kwargs)(
                          ks, ke, nfree, lo, hi, q_rows, k, v)
