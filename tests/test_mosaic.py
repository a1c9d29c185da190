"""The Mosaic GPU kernels (kernels/moba_mgpu.py) against the float32 oracle and the Triton kernels.

Interpreted where JAX's Mosaic GPU interpreter runs TMA and barriers (jax >= 0.11), compiled on a
Hopper GPU with `pytest --compiled`; lowered for CUDA everywhere (no GPU needed).
"""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import pytest

from moba_jax import moba as moba_lib
from moba_jax.kernels import _routing as rt
from moba_jax.kernels import moba_gpu as mg
from moba_jax.kernels import moba_mgpu as mm
from tests import helpers
from tests.helpers import packed_segments, random_qkv, rel_err, run

RUNNABLE = mm.interpreter_available() if not helpers.COMPILED else mm.on_hopper()
needs_runner = pytest.mark.skipif(
    not RUNNABLE, reason=f"jax {jax.__version__} cannot interpret a Mosaic GPU kernel with TMA "
    "and barriers (jax >= 0.11 can); compiled runs need a Hopper GPU")


def tiles(block_kv, dq=1, dkdv=0, head_chunks=1, *, overlap_block=1024, split=0):
  """pallas_gpu's BlockSizes fields in order: the Mosaic forward with key chunks of block_kv (0:
  the Triton forward), the Mosaic dQ when dq, the Mosaic dK/dV when dkdv, head_chunks (1: the
  kernels' choice), the forward's and dQ's overlap from overlap_block keys a block (0: always),
  the dK/dV's longest key tiles split into pieces when split."""
  return (128, 64, 64, 64, 4, 2, 4, block_kv, dq, dkdv, head_chunks, overlap_block, split)


# name: (lengths (of one batch row, or a tuple per row), heads, kv_heads, dim, block, topk,
#        block_kv, mosaic dQ, mosaic dK/dV)
CASES = {
    "one_doc_d64": ((512,), 2, 2, 64, 64, 3, 64, 1, 0),
    "gqa_docs_d128_block_off_8": ((250, 7, 343), 4, 2, 128, 36, 3, 64, 1, 0),
    "gqa4_docs_d64_kv128": ((300, 212), 4, 1, 64, 96, 4, 128, 1, 0),
    "dq_only_docs_d128": ((200, 184), 2, 1, 128, 40, 3, 0, 1, 0),
    # all three Mosaic kernels: groups aligned to the 128-key tiles (ragged end; documents)
    "all_ragged_gqa_d128": ((600,), 4, 2, 128, 128, 3, 128, 1, 1),  # a gate near tie (run 16)
    "ragged_gqa_d128_fwd128_alone": ((600,), 4, 2, 128, 128, 3, 128, 0, 0),  # its kernels alone
    "ragged_gqa_d128_dq_alone": ((600,), 4, 2, 128, 128, 3, 0, 1, 0),
    "ragged_gqa_d128_dkdv_alone": ((600,), 4, 2, 128, 128, 3, 0, 0, 1),
    "all_docs_d64": ((256, 384), 2, 1, 64, 128, 3, 64, 1, 1),
    # a length off the 8-key grid: the TMA boxes of keys see zero keys appended (masked)
    "all_length_off_8_gqa_d64": ((300,), 4, 2, 64, 128, 3, 128, 1, 1),
    # groups off the 128-key grid: the Mosaic dK/dV masks the groups a key tile meets
    "all_unaligned_groups_d64": ((300, 212), 2, 1, 64, 96, 3, 64, 1, 1),
    # packed documents as SFT batches hold them (starts off every grid, one shorter than a
    # block, one of a single token), block 128: key tiles meeting two or three blocks' groups
    "all_packed_gqa_d128": ((200, 5, 1, 333, 130, 99), 4, 2, 128, 128, 3, 128, 1, 1),
    # block 64 (two blocks a key tile) in one document: groups masked without documents
    "all_block64_one_doc_d64": ((384,), 2, 1, 64, 64, 4, 64, 1, 1),
    # block 512: 8 key chunks a sparse tile and 2-4 ring slots (the rings wrap within a tile),
    # dK/dV items of many row chunks; run with 4 CTAs (many tiles each), as at benchmark scale
    "ring_wrap_4_ctas_d128": ((1024,), 2, 1, 128, 512, 2, 128, 1, 1),
    # two batch rows with different documents (lengths per row): the (batch, kv head) flattening
    "batch2_docs_gqa_d64": (((256, 128), (128, 256)), 4, 2, 64, 128, 3, 128, 1, 1),
}
FEW_CTAS = {"ring_wrap_4_ctas_d128": 4}


DTYPE_CASES = [(n, jnp.bfloat16) for n in CASES] + [("batch2_docs_gqa_d64", jnp.float16)]


@needs_runner
@pytest.mark.parametrize("name, dtype", DTYPE_CASES, ids=lambda x: getattr(x, "__name__", x))
def test_mosaic_forward_and_gradients_match_the_float32_reference(name, dtype, retraced):
  """bf16 (and once f16) q, k, v; the oracle runs in float32 on the same (rounded) inputs; the
  bound is the bf16 bound of the benchmark-shapes test. Documents off the 8-key grid exercise the
  rounded-down TMA starts; kernels a case does not take are the Triton ones."""
  _check_against_the_float32_reference(name, dtype, retraced)


OVERLAP_CASES = ["ragged_gqa_d128_fwd128_alone", "ragged_gqa_d128_dq_alone", "all_packed_gqa_d128",
                 "ring_wrap_4_ctas_d128", "all_length_off_8_gqa_d64", "gqa_docs_d128_block_off_8"]


@pytest.mark.skipif(not (helpers.COMPILED and mm.on_hopper()),
                    reason="the overlap is a compiled schedule (interpreted runs take the plain "
                    "step, which the float32-reference cases check)")
@pytest.mark.parametrize("name", OVERLAP_CASES)
def test_mosaic_overlap_matches_the_float32_reference(name, retraced):
  """The forward's and dQ's intra-warpgroup overlap (`forward_rows(overlap=True)`,
  `dq_rows(overlap=True)`: the default from `BlockSizes.mosaic_overlap_block` keys a block) at
  the small blocks of these cases: first and last chunks peeled, tiles of one chunk, masked
  chunks, the rings wrapping within a tile (the dQ's key ring a slot deeper than its values')."""
  _check_against_the_float32_reference(name, jnp.bfloat16, retraced, overlap_block=0)


def _check_against_the_float32_reference(name, dtype, retraced, overlap_block=1024):
  """retraced: the `retraced` fixture (the kernels' entries are jitted: a case with few CTAs must
  not reuse a trace made with the default count, nor leave its own to a later case)."""
  lengths, heads, kv_heads, dim, block, topk, bkv, dq, dkdv = CASES[name]
  if name in FEW_CTAS:
    retraced.setattr(mm, "num_ctas", lambda interpret: FEW_CTAS[name])
  rows = lengths if isinstance(lengths[0], tuple) else (lengths,)  # documents of each batch row
  q, k, v = random_qkv(7, len(rows), sum(rows[0]), heads, kv_heads, dim, dtype)
  seg = jnp.concatenate([packed_segments(1, r) for r in rows])
  ct = jax.random.normal(jax.random.key(3), q.shape, dtype)
  up = lambda x: x.astype(jnp.float32)
  kw = dict(block_size=block, topk=topk)
  with jax.default_matmul_precision("highest"):
    want = helpers.vjp_all(lambda q, k, v: moba_lib.moba_reference(q, k, v, seg, **kw),
                           up(q), up(k), up(v), up(ct))
  mosaic = lambda q, k, v: run("pallas_gpu", q, k, v, seg,
                               tiles=tiles(bkv, dq, dkdv, overlap_block=overlap_block), **kw)
  got = helpers.vjp_all(mosaic, q, k, v, ct)
  errors = {what: rel_err(up(a), b) for what, a, b in zip(("out", "dq", "dk", "dv"), got, want)}
  assert max(errors.values()) < 1e-2, errors  # every output's error, for a compiled failure


SCALE = {  # name: (lengths, heads, kv_heads, dim, block, topk): the benchmark's shapes and more
    "8k_b512_k3": ((8192,), 16, 16, 128, 512, 3),
    "16k_b128_k8": ((16384,), 16, 16, 128, 128, 8),
    "32k_b512_k3": ((32768,), 16, 16, 128, 512, 3),
    "32k_b4096_k12": ((32768,), 16, 16, 128, 4096, 12),
    "32k_gqa8_d64_docs": ((9000, 12000, 11768), 16, 2, 64, 512, 3),
}


@pytest.mark.skipif(not (helpers.COMPILED and mm.on_hopper()),
                    reason="compiled on a Hopper GPU only (interpreted, one case takes hours)")
@pytest.mark.parametrize("name", list(SCALE))
def test_mosaic_at_benchmark_scale_equals_the_triton_kernels(name):
  """Hundreds of tiles per CTA, rings that wrap thousands of times: all three Mosaic kernels
  against the Triton kernels (their default tiles, `(64,)`: the kernels other GPUs run, checked
  against the oracle) on the same bf16 inputs. The bound is the bf16 rounding of P and dS that
  both make (test_mosaic_rows_equal_...)."""
  lengths, heads, kv_heads, dim, block, topk = SCALE[name]
  q, k, v = random_qkv(1, 1, sum(lengths), heads, kv_heads, dim, jnp.bfloat16)
  seg = packed_segments(1, lengths)
  ct = jax.random.normal(jax.random.key(2), q.shape, jnp.bfloat16)
  kw = dict(block_size=block, topk=topk)

  def outputs(t):
    out, vjp = jax.vjp(lambda q, k, v: run("pallas_gpu", q, k, v, seg, tiles=t, **kw), q, k, v)
    return [np.asarray(x, np.float32) for x in (out, *vjp(ct))]

  got, want = outputs(tiles(128, 1, 1)), outputs((64,))  # not (): on Hopper that is Mosaic
  errors = {what: float(np.abs(a - b).max() / np.abs(b).max())
            for what, a, b in zip(("out", "dq", "dk", "dv"), got, want)}
  assert max(errors.values()) < 2e-2, errors


@needs_runner
def test_mosaic_rows_equal_the_triton_rows():
  """Same routing, both kernel families: every live partial row's log-sum-exp agrees to float32
  rounding, its output and its dQ to the bf16 rounding of P and dS (both round them before the
  products with V and K), plus the rounding of each family's rows, both stored in bf16."""
  lengths, heads, kv_heads, dim, block = (256, 200), 4, 2, 64, 128  # groups on the 128-key grid
  q, k, v = random_qkv(9, 1, sum(lengths), heads, kv_heads, dim, jnp.bfloat16)
  do = jax.random.normal(jax.random.key(5), q.shape, jnp.bfloat16)
  seg = packed_segments(1, lengths)
  routing, dims = helpers.route(q, k, seg, block_size=block, topk=3, block_q=mm.ROWS)
  scale = dim ** -0.5
  interpret = not helpers.COMPILED

  @jax.jit
  def both(q, k, v, do):
    q_rows = mm.rows_of(q, routing.rq, kv_heads, heads // kv_heads)
    nfree = mm.free_chunks(routing.tile_ks, routing.tile_ke, routing.lo, routing.hi, routing.rq,
                           64)
    got = mm.forward_rows(routing.tile_ks, routing.tile_ke, nfree, routing.lo, routing.hi, q_rows,
                          k, v, scale=scale, block_kv=64, interpret=interpret)
    flat = [mg.flat_rows(x, dim) for x in (q, k, v)]
    want = mg.forward_rows(routing, dims, *flat, mg.BlockSizes(*tiles(64, 0)), scale, interpret)
    _, (o, lse) = mg.forward(q, k, v, routing, dims, mg.BlockSizes(*tiles(0, 0)), scale,
                             interpret)
    grads = [mg.backward(q, k, v, routing, o, lse, do, dims, mg.BlockSizes(*tiles(0, d, d)),
                         scale, interpret) for d in (1, 0)]
    return got, want, grads

  (o, lse), (o_want, lse_want), (mosaic, triton) = both(q, k, v, do)
  (dq, dk, dv), (dq_want, dk_want, dv_want) = mosaic, triton
  live = np.asarray(routing.rq) >= 0
  assert np.abs(np.asarray(lse)[live] - np.asarray(lse_want)[live]).max() < 1e-5  # dead: -inf
  assert o.dtype == o_want.dtype == jnp.bfloat16
  o, o_want = np.asarray(o, np.float32), np.asarray(o_want, np.float32)
  # each row set rounded once to bf16 (unit roundoff 2^-8): up to 2^-8 (|o| + |o_want|) apart
  assert (np.abs(o - o_want) - 2.0 ** -8 * (np.abs(o) + np.abs(o_want)))[live].max() < 1e-2
  for a, b in ((dq, dq_want), (dk, dk_want), (dv, dv_want)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.abs(a - b).max() < 2e-2 * np.abs(b).max()


@pytest.mark.parametrize("align", [8, 1])
def test_free_chunks_cover_only_whole_visible_chunks(align):
  """A chunk counted free must be seen whole by every live row of its tile (the kernels skip its
  mask); chunks start at the tile's first key rounded down to a multiple of `align` (8: the
  Mosaic GPU kernels', `moba_mgpu.free_chunks`; 1: the TPU kernel's)."""
  q, k, _ = random_qkv(4, 1, 600, 2, 1, 16)
  seg = packed_segments(1, [300, 300])  # the second document starts off the 8-key grid
  routing, _ = helpers.route(q, k, seg, block_size=128, topk=3, block_q=mm.ROWS)
  for bkv in (64, 128):
    args = (routing.tile_ks, routing.tile_ke, routing.lo, routing.hi, routing.rq, bkv)
    nf = np.asarray(rt.free_chunks(*args, align=align))
    if align == 8:  # the Mosaic kernels' own count
      np.testing.assert_array_equal(np.asarray(mm.free_chunks(*args)), nf)
    ks = np.asarray(routing.tile_ks) // align * align
    rq, lo, hi = (np.asarray(x).reshape(*nf.shape, mm.ROWS)
                  for x in (routing.rq, routing.lo, routing.hi))
    for b, t in zip(*np.nonzero(nf)):
      live = rq[b, t] >= 0
      end = ks[b, t] + nf[b, t] * bkv
      assert (lo[b, t][live] <= ks[b, t]).all() and (hi[b, t][live] >= end).all()
    assert nf.sum() > 0  # sparse tiles of whole blocks exist here



@pytest.mark.parametrize("kv_head0, per", [(0, 3), (1, 2)])
def test_rows_of_index_the_routing_rows_of_q(kv_head0, per):
  """`rows_of`: row r of (batch, kv head) bk is query row rq = t * G + g of kv head
  kv_head0 + bk % per, i.e. q[b, t, (kv_head0 + k) * G + g] (padding rows, -1: t = 0, g = 0),
  checked element by element against a loop over the routing rows (GQA 2:1, two batch rows, a
  chunk of the kv heads from kv_head0)."""
  batch, seq, kv_heads, groups, dim = 2, 5, 3, 2, 8
  x = jax.random.normal(jax.random.key(0), (batch, seq, kv_heads * groups, dim))
  rq = jax.random.randint(jax.random.key(1), (batch * per, 7), -1, seq * groups)
  got = np.asarray(mm.rows_of(x, rq, per, groups, kv_head0).gathered())
  xs, rqs = np.asarray(x), np.asarray(rq)
  for bk in range(batch * per):
    b, kvh = bk // per, kv_head0 + bk % per
    for r, row in enumerate(rqs[bk]):
      t, g = divmod(max(row, 0), groups)
      np.testing.assert_array_equal(got[bk, r], xs[b, t, kvh * groups + g])


def _gather_kernel(xs, index, tiles_n, index_in_smem):
  """xs[i][index] [64 * tiles_n, D] for each x in xs through `_gather_into_smem` (one index for
  all, read from GMEM or, as the dK/dV reads it, from SMEM where TMA put it): each CTA gathers 64
  rows of every x into swizzled SMEM tiles and stores them back by TMA (which reads the swizzle
  as wgmma does)."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
  n, dim = len(xs), xs[0].shape[-1]
  mesh = plgpu.Mesh(grid=(tiles_n,), grid_names=("cta",), num_threads=1, thread_name="wg")

  def body(*refs):
    x_refs, index_ref, out_refs = refs[:n], refs[n], refs[n + 1:]

    def scoped(smems, idx_smem, bar):
      rows = pl.ds(jax.lax.axis_index("cta") * mm.WG_ROWS, mm.WG_ROWS)
      index = index_ref.at[rows]
      if index_in_smem:
        plgpu.copy_gmem_to_smem(index, idx_smem, bar)
        plgpu.barrier_wait(bar)
        index = idx_smem
      mm._gather_into_smem(x_refs, index, smems)
      mm._commit_gathers()
      mm._gathers_done()
      for smem, out_ref in zip(smems, out_refs):
        plgpu.copy_smem_to_gmem(smem, out_ref.at[rows])
      plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(scoped, [mm._tiled((mm.WG_ROWS, dim), x.dtype) for x in xs],
                  plgpu.SMEM((mm.WG_ROWS,), jnp.int32), plgpu.Barrier(num_barriers=1),
                  collective_axes="wg")

  out = tuple(jax.ShapeDtypeStruct((tiles_n * mm.WG_ROWS, dim), x.dtype) for x in xs)
  return pl.kernel(body, out_type=out, mesh=mesh, name="moba_mgpu_gather_check")(*xs, index)


@pytest.mark.parametrize("dim, dtype, index_in_smem", [
    (64, jnp.bfloat16, False), (128, jnp.bfloat16, True), (128, jnp.float16, False)])
def test_in_kernel_row_gather_equals_xla_gather(dim, dtype, index_in_smem):
  """The producer's row gather (cp.async of 16-byte pieces into the hardware's 128-byte swizzle,
  inline PTX; two matrices through one index, read from GMEM or SMEM): rows in any order,
  repeated, first and last, equal x[index] to the bit (compiled on a Hopper GPU; on other
  machines the kernel is lowered for CUDA only: the interpreter has no rule for inline PTX)."""
  n, tiles_n = 1000, 3
  xs = tuple(jax.random.normal(jax.random.key(s), (n, dim), dtype) for s in (2, 4))
  index = jax.random.randint(jax.random.key(3), (tiles_n * mm.WG_ROWS,), 0, n, jnp.int32)
  index = index.at[:3].set(jnp.array([0, n - 1, 0], jnp.int32))
  fn = jax.jit(lambda xs, i: _gather_kernel(xs, i, tiles_n, index_in_smem))
  if not (helpers.COMPILED and mm.on_hopper()):
    text = fn.trace(xs, index).lower(lowering_platforms=("cuda",)).as_text()
    assert "custom_call @mosaic_gpu" in text
    return
  for got, x in zip(fn(xs, index), xs):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(x[index]))


@pytest.mark.parametrize("dim", [64, 128])
def test_mosaic_dq_lowers_for_cuda_without_a_gpu(dim):
  """The dQ kernel's lowering (two double-buffered row matrices and its K/V ring fit the shared
  memory) on a CPU-only machine, plain and overlapped (another kernel, whose key ring is a slot
  deeper than its value ring)."""
  bk, rows, seq = 2, 512, 256
  i32 = lambda *s: jnp.zeros(s, jnp.int32)
  f32 = lambda *s: jnp.zeros(s, jnp.float32)
  mat = mm.Rows(jnp.zeros((seq * 4, dim), jnp.bfloat16), i32(bk, rows))  # gathered in the kernel
  kv = jnp.zeros((1, seq, 2, dim), jnp.bfloat16)
  args = (i32(bk, 4), i32(bk, 4), i32(bk, 4), i32(bk, rows), i32(bk, rows), f32(bk, rows),
          f32(bk, rows), mat, kv, kv)

  def lowered(overlap):
    fn = lambda *a: mm.dq_rows(*a[:8], a[7], *a[8:], scale=0.1, block_kv=mg.MOSAIC_DQ_BLOCK_KV,
                               overlap=overlap)
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()

  plain, overlapped = lowered(False), lowered(True)
  assert "custom_call @mosaic_gpu" in plain and "custom_call @mosaic_gpu" in overlapped
  assert plain != overlapped
  assert mm.ring_depths(mg.MOSAIC_DQ_BLOCK_KV, dim, mats=2, keys_held=True) == (
      (3, 2) if dim == 128 else (5, 4))


def test_mosaic_register_split_fits_a_cta():
  """`setmaxnreg` counts are multiples of 8 in [24, 256], and two compute warpgroups and the
  producer hold at most the 65,536 registers of a CTA (512 a thread over 128 threads each)."""
  for compute, producer in (mm.ROW_TILE_REGISTERS, mm.DKDV_REGISTERS):
    assert all(r % 8 == 0 and 24 <= r <= 256 for r in (compute, producer)), (compute, producer)
    assert 2 * compute + producer <= 65536 // 128, (compute, producer)


def triton_calls_but_the_gate(text):
  """The Triton custom calls of a lowered program other than the gate kernel's (`moba_gate`,
  which the routing takes when tracing on a GPU: lowered on the H200, these programs hold it)."""
  return [line for line in text.splitlines()
          if "xla.gpu.triton" in line and "moba_gate" not in line]


@pytest.mark.parametrize("dim, split", [(64, False), (128, False), (64, True), (128, True)])
def test_mosaic_dkdv_lowers_for_cuda_without_a_gpu(dim, split):
  """The dK/dV kernel's lowering (its keys, their SMEM staging of dK/dV, and the row ring fit the
  shared memory) on a CPU-only machine; split, with its pieces' float32 stores from registers
  (two more results)."""
  bk, rows, seq = 2, 512, 200
  i32 = lambda *s: jnp.zeros(s, jnp.int32)
  f32 = lambda *s: jnp.zeros(s, jnp.float32)
  mat = mm.Rows(jnp.zeros((seq * 4, dim), jnp.bfloat16), i32(bk, rows))  # gathered in the kernel
  kv = jnp.zeros((1, seq, 2, dim), jnp.bfloat16)
  items = tuple(i32(bk, 2) for _ in range(7))
  fn = lambda *a: mm.dkdv_tiles(a[:7], *a[7:12], a[11], *a[12:], scale=0.1, split=split)
  args = items + (f32(bk, rows), f32(bk, rows), i32(bk, rows), i32(bk, rows), mat, kv, kv)
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  call = [line for line in text.splitlines() if "custom_call @mosaic_gpu" in line]
  assert len(call) == 1
  parts = f"tensor<{mm.SPLIT_SLOTS_PER_CTA * 4}x128x{dim}xf32>"  # 4 items: 4 CTAs, 2 slots each
  assert call[0].rsplit(") -> ", 1)[1].count(parts) == (2 if split else 0)


@pytest.mark.parametrize("dim, block_kv, overlap", [(128, 64, False), (128, 128, False),
                                                    (64, 128, False), (128, 128, True),
                                                    (64, 64, True)])
def test_mosaic_forward_lowers_for_cuda_without_a_gpu(dim, block_kv, overlap):
  """The Pallas-to-Mosaic-GPU lowering of the forward runs on a CPU-only machine (it checks the
  shared memory budget too): one Mosaic GPU custom call, no Triton one; with and without the
  intra-warpgroup overlap (on from `mosaic_overlap_block` keys a block)."""
  seq = 512
  seg = jnp.zeros((1, seq), jnp.int32)
  q = jnp.zeros((1, seq, 4, dim), jnp.bfloat16)
  k = jnp.zeros((1, seq, 2, dim), jnp.bfloat16)
  from moba_jax.attention import KernelOptions

  def lowered(overlap_block):
    opts = KernelOptions(tiles=tiles(block_kv, 0, overlap_block=overlap_block))
    attn = lambda q, k, v: mg.moba_attention_gpu(q, k, v, seg, block_size=128, topk=3,
                                                 options=opts)
    return jax.jit(attn).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()

  text = lowered(128 if overlap else 256)  # blocks of 128 keys: overlapped from 128, not 256
  assert "custom_call @mosaic_gpu" in text
  assert not triton_calls_but_the_gate(text)
  if overlap:  # another kernel than the plain step's
    assert text != lowered(256)


def test_mosaic_fwd_bwd_lowers_off_the_8_key_grid_gathering_their_own_rows():
  """The fwd+bwd with all three Mosaic kernels lowers for CUDA at T = 300 (TMA boxes of keys need
  a key axis a multiple of 8 long: the kernels see zero keys appended, masked; the forward and dQ
  raised "dimension 2 must have size smaller or a multiple of its tiling 8" on the H200 before),
  and the kernels gather their Q and dO rows themselves: each takes q (and dO) in the caller's
  layout, [B * T * H, D], and no operand of the routing's [BK, R, D] rows (XLA's gathered copies,
  before 2026-12-03); only the forward's and dQ's outputs have that shape. segment_ids=None: no
  `lax.cond` outside the kernels (the Mosaic dK/dV needs no Triton fallback)."""
  from moba_jax.attention import KernelOptions
  q = jnp.zeros((2, 300, 4, 64), jnp.bfloat16)
  k = jnp.zeros((2, 300, 2, 64), jnp.bfloat16)
  opts = KernelOptions(tiles=tiles(128, 1, 1))
  f = lambda q, k, v: mg.moba_attention_gpu(q, k, v, None, block_size=128, topk=3, options=opts)
  step = lambda q, k, v, ct: jax.vjp(f, q, k, v)[1](ct)
  text = jax.jit(step).trace(q, k, k, q).lower(lowering_platforms=("cuda",)).as_text()
  calls = [line for line in text.splitlines() if "custom_call @mosaic_gpu" in line]
  assert len(calls) == 3
  operands = [c.rsplit(" : (", 1)[1].split(") -> ")[0] for c in calls]
  results = [c.rsplit(") -> ", 1)[1] for c in calls]
  flat_q = "tensor<2400x64xbf16>"  # [B * T * H, D]
  assert [o.count(flat_q) for o in operands] == [1, 2, 2]  # fwd: q; dK/dV and dQ: q and dO
  rows = re.compile(r"tensor<4x\d+x64xbf16>")  # [BK, R, D] (BK = 2 batch rows x 2 kv heads)
  assert [len(rows.findall(o)) for o in operands] == [0, 0, 0]
  assert [len(rows.findall(r)) for r in results] == [1, 0, 1]  # fwd's o rows, dQ's rows
  assert not triton_calls_but_the_gate(text)
  assert "cond" not in helpers.primitives_outside_kernels(jax.make_jaxpr(step)(q, k, k, q).jaxpr)


def test_packed_documents_step_has_no_branch_and_no_triton_backward(retraced):
  """Packed documents on a Hopper GPU (the gate kernel chosen as on a GPU): the fwd+bwd lowers
  for CUDA with the three Mosaic kernels and the gate kernel (the only Triton call), no
  `lax.cond` outside the kernels (a GPU cond reads its predicate back to the host): the Mosaic
  dK/dV takes groups off its 128-key grid itself, with no Triton fallback."""
  from moba_jax.attention import KernelOptions
  from moba_jax.kernels import moba_gate
  retraced.setattr(rt, "_gate_kernel", lambda *_: moba_gate.gate_topk)
  q = jnp.zeros((2, 600, 4, 64), jnp.bfloat16)
  k = jnp.zeros((2, 600, 2, 64), jnp.bfloat16)
  seg = packed_segments(2, [250, 7, 343])
  opts = KernelOptions(tiles=tiles(128, 1, 1))
  f = lambda q, k, v: mg.moba_attention_gpu(q, k, v, seg, block_size=128, topk=3, options=opts)
  step = lambda q, k, v, ct: jax.vjp(f, q, k, v)[1](ct)
  hopper = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                       platform="gpu")  # the Triton gate lowers for it (jax 0.11)
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",),
                                                                abstract_device=hopper)):
    text = jax.jit(step).trace(q, k, k, q).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("custom_call @mosaic_gpu") == 3
  assert text.count("__gpu$xla.gpu.triton") == 1 and "moba_gate" in text
  assert "cond" not in helpers.primitives_outside_kernels(jax.make_jaxpr(step)(q, k, k, q).jaxpr)


@needs_runner
@pytest.mark.parametrize("seg, seq", [(None, 600), (None, 512), (packed_segments(1, [250, 7, 343]),
                                                                 600)],
                         ids=["one_doc", "one_doc_keys_on_tiles", "docs"])
def test_mosaic_by_kv_head_chunks_equals_one_pass(seg, seq):
  """mosaic_head_chunks=2 (the forward and the backward over two chunks of kv heads, one after
  another): the same outputs and gradients, to the bit, as one pass (each head's rows, keys and
  dK/dV items are the same; only the grids are smaller). GQA 2:1 with a ragged end. Packed
  documents off the 128-key grid (the dK/dV's masked groups): the kernels' parts are the same,
  but XLA's merge of the partial rows rounds its float32 sums by shape (on the CPU the same
  rows merged as [2, ...] and as [1, ...] differ in the last bit of 134 of 2400 lse values),
  so there a few elements differ (an o one bf16 rounding apart changes its row's delta, and a
  dQ sum of bf16 parts amplifies that relatively), by less than one rounding at the scale of
  each output. The dK/dV runs once over both kv heads either way (since run 48); T = 512 (the
  key tiles' length) and 600 (a slice of its outputs) both."""
  q, k, v = random_qkv(5, 1, seq, 4, 2, 64, jnp.bfloat16)
  ct = jax.random.normal(jax.random.key(6), q.shape, jnp.bfloat16)
  fn = lambda n: lambda q, k, v: run("pallas_gpu", q, k, v, seg, tiles=tiles(128, 1, 1, n),
                                     block_size=128, topk=3)
  for a, b in zip(helpers.vjp_all(fn(2), q, k, v, ct), helpers.vjp_all(fn(1), q, k, v, ct)):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    if seg is None:
      np.testing.assert_array_equal(a, b)
    else:  # below one bf16 rounding at the array's scale, in at most 1e-3 of the elements
      assert helpers.rel_err(a, b) < 2.0 ** -8 and (a != b).sum() <= 1e-3 * a.size


def test_mosaic_by_kv_head_chunks_lowers_in_order():
  """Two chunks of kv heads: a forward kernel per chunk, then one dK/dV kernel over both kv heads
  (its results are the whole dK and dV, nothing aliased: no pad or update assembles them), then
  a dQ kernel per chunk on the CUDA lowering, each chunk after the one before (the partial rows
  of one chunk at a time); a chunk count that does not divide the kv heads is refused before
  tracing the kernels; packed documents (groups off the 128-key grid, which the Mosaic dK/dV
  masks) run by chunks the same way."""
  from moba_jax.attention import KernelOptions
  q = jnp.zeros((1, 512, 4, 64), jnp.bfloat16)
  k = jnp.zeros((1, 512, 2, 64), jnp.bfloat16)

  def traced(n, seg=None):
    opts = KernelOptions(tiles=tiles(128, 1, 1, n))
    f = lambda q, k, v: mg.moba_attention_gpu(q, k, v, seg, block_size=128, topk=3, options=opts)
    return jax.jit(lambda q, k, v, ct: jax.vjp(f, q, k, v)[1](ct)).trace(q, k, k, q)

  lowered = lambda n, seg=None: traced(n, seg).lower(lowering_platforms=("cuda",)).as_text()

  def kind(call):  # by the results: (o rows, lse rows), (dK, dV) of both kv heads, dQ rows
    results = call.rsplit(") -> ", 1)[1]
    return "dkdv" if "1x512x2x64" in results else "fwd" if "xf32>" in results else "dq"

  for seg in (None, packed_segments(1, [200, 7, 305])):
    text = lowered(2, seg)
    calls = [line for line in text.splitlines() if "custom_call @mosaic_gpu" in line]
    assert [kind(c) for c in calls] == ["fwd", "fwd", "dkdv", "dq", "dq"]
    assert not any("output_operand_alias" in c for c in calls)
    # every kernel reads q (and dO) whole, [B * T * H, D], its rows chosen by index
    assert all("tensor<2048x64xbf16>" in c.rsplit(" : (", 1)[1] for c in calls)
    assert not triton_calls_but_the_gate(text)
  with pytest.raises(ValueError, match="mosaic_head_chunks=3 must divide the kv heads"):
    lowered(3)


@pytest.mark.parametrize("chunks", [1, 2])
def test_split_dkdv_lowers_in_the_step(chunks):
  """mosaic_dkdv_split=1 reaches the dK/dV kernel from the fwd+bwd step, with and without kv-head
  chunks (its call has the two float32 slot results: 8 key tiles, so 8 CTAs and 16 slots);
  without it the call has none."""
  from moba_jax.attention import KernelOptions
  q = jnp.zeros((1, 512, 4, 64), jnp.bfloat16)
  k = jnp.zeros((1, 512, 2, 64), jnp.bfloat16)

  def dkdv_results(split):
    opts = KernelOptions(tiles=tiles(128, 1, 1, chunks, split=split))
    f = lambda q, k, v: mg.moba_attention_gpu(q, k, v, None, block_size=128, topk=3,
                                              options=opts)
    step = jax.jit(lambda q, k, v, ct: jax.vjp(f, q, k, v)[1](ct))
    text = step.trace(q, k, k, q).lower(lowering_platforms=("cuda",)).as_text()
    calls = [line for line in text.splitlines() if "custom_call @mosaic_gpu" in line]
    dkdv = [c for c in calls if "1x512x2x64xbf16" in c.rsplit(") -> ", 1)[1]]
    assert len(dkdv) == 1 and len(calls) == 2 * chunks + 1
    return dkdv[0].rsplit(") -> ", 1)[1].count("tensor<16x128x64xf32>")

  assert dkdv_results(1) == 2
  assert dkdv_results(0) == 0


_SHARDED_CHUNKS = """
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from moba_jax.attention import KernelOptions
from moba_jax.kernels import moba_gpu as mg
mesh = jax.make_mesh((1, 1, 1, 2), ("data", "fsdp", "context", "tensor"))
opts = KernelOptions(tiles=(128, 64, 64, 64, 4, 2, 4, 128, 1, 1, 2))
f = lambda q, k, v: mg.moba_attention_gpu(q, k, v, None, block_size=128, topk=3, options=opts)
with jax.set_mesh(mesh):
  put = lambda x: jax.device_put(x, NamedSharding(mesh, P(None, None, "tensor", None)))
  q = put(jnp.zeros((1, 512, 4, 64), jnp.bfloat16))
  k = put(jnp.zeros((1, 512, 2, 64), jnp.bfloat16))
  try:
    jax.jit(f).trace(q, k, k)
  except ValueError as e:
    print(e)
"""


def test_mosaic_head_chunks_must_divide_each_devices_kv_heads():
  """Under a mesh that splits the kv heads (2 over tensor = 2: one a device), 2 chunks divide the
  call's kv heads but not a shard's: refused when tracing, naming the shard's count (it would
  otherwise run chunks of no heads)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", _SHARDED_CHUNKS], env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "mosaic_head_chunks=2 must divide the kv heads (1, on each device" in r.stdout


def test_mosaic_kernels_split_heads_themselves_where_rows_exceed_the_budget(retraced):
  """Rows over `_routing.PARTIAL_BYTES`: with the Mosaic kernels the split into kv-head chunks is
  the kernels' own (mosaic_head_chunks, one call: the forward and the dQ once per chunk, the
  dK/dV once), for one document per row and packed documents alike; with a Triton kernel in the
  step (here its dK/dV, which does not split) it is `lax.map`'s (each kernel once, in the loop's
  body)."""
  from moba_jax.attention import KernelOptions
  from moba_jax.kernels import _routing as rt
  retraced.setattr(rt, "PARTIAL_BYTES", 1)  # one kv head per chunk: 2 chunks
  opts = KernelOptions(tiles=tiles(128, 1, 1))
  q = jnp.zeros((1, 512, 4, 64), jnp.bfloat16)
  k = jnp.zeros((1, 512, 2, 64), jnp.bfloat16)

  def calls(seg, bwd, o=opts):  # Mosaic kernel calls in the CUDA lowering
    f = lambda q, k, v: mg.moba_attention_gpu(q, k, v, seg, block_size=128, topk=3, options=o)
    step = jax.jit(lambda q, k, v, ct: jax.vjp(f, q, k, v)[1](ct) if bwd else f(q, k, v))
    text = step.trace(q, k, k, q).lower(lowering_platforms=("cuda",)).as_text()
    return sum("custom_call @mosaic_gpu" in line for line in text.splitlines())

  assert calls(None, bwd=True) == 5  # fwd, fwd, dK/dV, dQ, dQ
  assert calls(packed_segments(1, [200, 7, 305]), bwd=True) == 5
  # the Triton dK/dV: the forward alone (the Triton kernel lowers for a GPU it finds, jax 0.11)
  triton_dkdv = KernelOptions(tiles=tiles(128, 1, 0))
  assert calls(None, bwd=False, o=triton_dkdv) == 1  # in the loop's body


@pytest.mark.parametrize("topk, kv_heads, chunks", [(4, 2, 1), (5, 2, 2), (8, 2, 2), (9, 4, 4),
                                                    (8, 1, 1)])
def test_mosaic_kernels_split_heads_past_four_selected_blocks_a_query(topk, kv_heads, chunks):
  """Far under `PARTIAL_BYTES`, more than `MOSAIC_SELECTED_PER_CHUNK` (4) selected blocks a query
  (block 128 top-8: partial rows about 8x q's size, 1.67x cuDNN's memory plan at 16K on the
  H200) split the kv heads into the fewest chunks (dividing them) with at most 4 a query each:
  a forward and a dQ per chunk on the CUDA lowering, one dK/dV over every head. One kv head
  cannot split."""
  from moba_jax.attention import KernelOptions
  assert mg.MOSAIC_SELECTED_PER_CHUNK == 4
  seq = 2048  # 16 blocks: every topk here is reachable
  q = jnp.zeros((1, seq, 2 * kv_heads, 64), jnp.bfloat16)
  k = jnp.zeros((1, seq, kv_heads, 64), jnp.bfloat16)
  assert rt.kv_head_chunks(q.shape, kv_heads, 128, topk, max_selected=4) == chunks
  assert rt.kv_head_chunks(q.shape, kv_heads, 128, topk) == 1  # the byte budget alone
  opts = KernelOptions(tiles=tiles(128, 1, 1))
  f = lambda q, k, v: mg.moba_attention_gpu(q, k, v, None, block_size=128, topk=topk, options=opts)
  step = jax.jit(lambda q, k, v, ct: jax.vjp(f, q, k, v)[1](ct))
  text = step.trace(q, k, k, q).lower(lowering_platforms=("cuda",)).as_text()
  assert sum("custom_call @mosaic_gpu" in line for line in text.splitlines()) == 2 * chunks + 1


@pytest.mark.parametrize("seq, block, topk", [(8192, 512, 3), (16384, 128, 8), (32768, 512, 3)])
def test_mosaic_step_at_benchmark_shapes_has_no_loop(retraced, seq, block, topk):
  """The Hopper default's fwd+bwd at the benchmark shapes (16 heads, head_dim 128) lowers for
  CUDA without a `while` or a `case` outside the kernels: on a GPU each is host-driven and
  splits XLA's command buffer in two (run 25: the routing's one-step `lax.map`s and the dK/dV
  items' binary search were such loops)."""
  retraced.setattr(mm, "on_hopper", lambda: True)
  retraced.setattr(mm, "CHECKED_JAX", (0, 0))  # this JAX counts as checked
  from moba_jax import attention as attn
  q = jax.ShapeDtypeStruct((1, seq, 16, 128), jnp.bfloat16)
  f = lambda q, k, v: attn.moba_attention(q, k, v, block_size=block, topk=topk,
                                          implementation="pallas_gpu")
  step = jax.jit(lambda q, k, v, ct: jax.vjp(f, q, k, v)[1](ct))
  text = step.trace(q, q, q, q).lower(lowering_platforms=("cuda",)).as_text()
  assert sum("custom_call @mosaic_gpu" in line for line in text.splitlines()) >= 3
  assert "stablehlo.while" not in text and "stablehlo.case" not in text


def test_routing_maps_of_one_step_are_calls_with_the_same_result():
  """`_routing.map_steps`: `lax.map`'s result, with no loop in the program for one step."""
  f = lambda xs: (jnp.sin(xs[0]) * xs[1], xs[0].sum())
  for n in (1, 3):
    xs = (jnp.arange(n * 6.0).reshape(n, 2, 3), jnp.ones((n, 2, 3)))
    got, want = rt.map_steps(f, xs), jax.lax.map(f, xs)
    jax.tree.map(np.testing.assert_array_equal, got, want)
    loops = "stablehlo.while" in jax.jit(lambda x: rt.map_steps(f, x)).lower(xs).as_text()
    assert loops == (n > 1)


def test_mosaic_kernels_lower_under_remat_and_scan():
  """The kernels (their in-kernel row gathers: inline PTX with memory effects) inside a model's
  layer loop: the gradient of a scan over checkpointed layers lowers for CUDA (interpreted runs
  cannot check this: the interpreter's callbacks are effects that remat's AD refuses)."""
  from moba_jax.attention import KernelOptions
  opts = KernelOptions(tiles=tiles(128, 1, 1))
  x = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)

  def layer(x, _):
    attn = lambda x: mg.moba_attention_gpu(x, x, x, None, block_size=128, topk=3, options=opts)
    return x + jax.checkpoint(attn)(x), None

  loss = lambda x: jnp.sum(jax.lax.scan(layer, x, None, length=2)[0].astype(jnp.float32) ** 2)
  text = jax.jit(jax.grad(loss)).trace(x).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("custom_call @mosaic_gpu") >= 3


@pytest.mark.parametrize("hopper", [False, True])
def test_the_default_is_mosaic_on_hopper_in_16_bits_else_triton(hopper, monkeypatch):
  """Compiled on a Hopper GPU, 16-bit inputs with head_dim 64 or 128 take all three Mosaic kernels;
  float32, other head_dims, other GPUs and every interpreted run take the Triton kernels, compiled
  float32 with 32-wide tiles (run 46: 64-wide ones ran ten times slower), else 64-wide."""
  monkeypatch.setattr(mm, "on_hopper", lambda: hopper)
  monkeypatch.setattr(mm, "CHECKED_JAX", (0, 0))  # this JAX counts as checked
  mosaic = lambda sizes: (sizes.block_q, sizes.mosaic_block_kv, sizes.mosaic_dq, sizes.mosaic_dkdv)
  for dim, dtype in ((128, jnp.bfloat16), (64, jnp.float16)):
    assert mosaic(mg.BlockSizes.get_default(dim, dtype)) == ((128, 128, 1, 1) if hopper
                                                              else (64, 0, 0, 0))
    assert mosaic(mg.BlockSizes.get_default(dim, dtype, interpret=True)) == (64, 0, 0, 0)
  for dim, dtype in ((96, jnp.bfloat16), (32, jnp.float16)):
    assert mosaic(mg.BlockSizes.get_default(dim, dtype)) == (64, 0, 0, 0)
  tiles = lambda s: (s.block_q, s.block_k, s.block_q_dkv, s.block_k_dkv, s.mosaic_block_kv)
  for dim in (64, 80, 128):
    assert tiles(mg.BlockSizes.get_default(dim, jnp.float32)) == (32, 32, 32, 32, 0)
    assert tiles(mg.BlockSizes.get_default(dim, jnp.float32, interpret=True)) == (64, 64, 64, 64, 0)


def test_on_hopper_is_false_off_a_gpu():
  assert mm.on_hopper() == (jax.default_backend() == "gpu"
                            and jax.devices()[0].compute_capability.startswith("9"))


def test_a_jax_the_kernels_were_not_checked_under_keeps_the_triton_default(monkeypatch):
  monkeypatch.setattr(mm, "on_hopper", lambda: True)
  monkeypatch.setattr(mm, "CHECKED_JAX", (99, 0))
  assert mg.BlockSizes.get_default(128, jnp.bfloat16).mosaic_block_kv == 0


def test_mosaic_refusals_are_one_line_errors():
  q = jnp.zeros((1, 64, 2, 48), jnp.bfloat16)
  seg = jnp.zeros((1, 64), jnp.int32)
  from moba_jax.attention import KernelOptions
  with pytest.raises(ValueError, match="head_dim 64 or 128, got 48"):
    mg.moba_attention_gpu(q, q, q, seg, block_size=16, topk=2,
                          options=KernelOptions(tiles=tiles(64)))
  q32 = jnp.zeros((1, 64, 2, 64), jnp.float32)
  with pytest.raises(ValueError, match="bfloat16 or float16"):
    mg.moba_attention_gpu(q32, q32, q32, seg, block_size=16, topk=2,
                          options=KernelOptions(tiles=tiles(64)))
  with pytest.raises(ValueError, match="needs block_q=128"):
    mg.BlockSizes(64, 64, 64, 64, 4, 2, 4, 64)
  with pytest.raises(ValueError, match="mosaic_block_kv=32 must be"):
    mg.BlockSizes(128, 64, 64, 64, 4, 2, 4, 32)
  with pytest.raises(ValueError, match="mosaic_dq=1 needs block_q=128"):
    mg.BlockSizes(64, 64, 64, 64, 4, 2, 4, 0, 1)
  with pytest.raises(ValueError, match=r"mosaic_dkdv=2 must be one of \[0, 1\]"):
    mg.BlockSizes(128, 64, 64, 64, 4, 2, 4, 0, 0, 2)
  with pytest.raises(ValueError, match="mosaic_overlap_block=-1 must be at least 0"):
    mg.BlockSizes(*tiles(128, overlap_block=-1))
  with pytest.raises(ValueError, match="block_k_dkv=0 must be at least 1"):  # moba.tiles takes 0s
    mg.BlockSizes(64, 64, 64, 0)


OFFSET_CASES = {  # name: (lengths, block, q_start, Tq, kv dtype)
    # groups off the 128-key grid: all three Mosaic kernels (the dK/dV's groups masked)
    "docs_block32": ((230, 154), 32, 160, 128, jnp.bfloat16),
    # an odd offset (G = 2: rows off the 8-row grid): the dK/dV's dense rows start rounded down
    "docs_offset_off_8": ((230, 154), 64, 101, 200, jnp.bfloat16),
    # one document, block 128: all three Mosaic kernels; the shard's rows start mid-sequence
    "block128_mosaic_dkdv": ((512,), 128, 192, 192, jnp.bfloat16),
    # float32 K/V (the context-parallel path gathers them so): the Triton dK/dV
    "block128_float32_kv": ((512,), 128, 192, 192, jnp.float32),
}


@needs_runner
@pytest.mark.parametrize("name", list(OFFSET_CASES))
def test_mosaic_kernels_take_a_query_offset(name):
  """Context parallelism's shard call (q_start, queries [q_start, q_start + Tq) over all T keys):
  the Mosaic kernels equal the Triton kernels on the same call (out, dq, dk, dv)."""
  from moba_jax.attention import KernelOptions
  lengths, block, q_start, n_q, kv_dtype = OFFSET_CASES[name]
  heads, kv_heads, dim = 2, 1, 64
  q, k, v = random_qkv(11, 1, sum(lengths), heads, kv_heads, dim, jnp.bfloat16)
  k, v = k.astype(kv_dtype), v.astype(kv_dtype)
  seg = packed_segments(1, lengths)
  qs = q[:, q_start:q_start + n_q]
  ct = jax.random.normal(jax.random.key(4), qs.shape, jnp.bfloat16)
  interpret = not helpers.COMPILED

  def grads(t):
    opts = KernelOptions(interpret=interpret, tiles=t)
    fn = lambda q, k, v: mg.moba_attention_gpu(q, k, v, seg, block_size=block, topk=3,
                                               options=opts, q_start=q_start)
    out, vjp = jax.vjp(jax.jit(fn), qs, k, v)
    return (out, *vjp(ct))

  got, want = grads(tiles(128, 1, 1)), grads(tiles(0, 0))  # the Hopper default's tiles
  for what, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    assert rel_err(a.astype(jnp.float32), b.astype(jnp.float32)) < 1e-2, what


@pytest.mark.parametrize("n, ctas", [(1024, 132), (1000, 132), (100, 132), (7, 3)])
def test_balanced_order_is_a_permutation_that_evens_the_ctas_work(n, ctas):
  """Every item exactly once; each CTA's items (c, c + C, ...) carry near the mean work, where
  the index order leaves one stride of heavy items to some CTAs (the dK/dV at 8K, block 512:
  work falls with the key block, every 64th item; 1.68x the mean there)."""
  rng = np.random.default_rng(n)
  work = np.repeat(rng.integers(1, 50, size=-(-n // 16)), 16)[:n]  # tiles of one block: equal
  order = np.asarray(mm.balanced_order(jnp.asarray(work), ctas))
  assert sorted(order.tolist()) == list(range(n))
  load = lambda o: np.bincount(np.arange(n) % ctas, weights=work[o], minlength=ctas)
  if n >= 4 * ctas:
    assert load(order).max() <= 1.1 * load(order).mean()
    assert load(order).max() <= load(np.arange(n)).max()
  assert list(work[order[:min(n, ctas)]]) == sorted(work, reverse=True)[:min(n, ctas)]


@pytest.mark.parametrize("n, ctas", [(1000, 132), (264, 132), (7, 3)])
def test_balanced_order_of_n_real_items_puts_them_first(n, ctas):
  """With n_real (a traced count): the items of work > 0 (the real ones) take the first n_real
  places, dealt as `balanced_order` deals n_real items alone; the padding after them."""
  rng = np.random.default_rng(n)
  work = rng.integers(1, 50, size=n)
  real = n - n // 3
  work[real:] = 0
  order = np.asarray(jax.jit(lambda w, r: mm.balanced_order(w, ctas, r))(jnp.asarray(work), real))
  assert sorted(order.tolist()) == list(range(n))
  alone = np.asarray(mm.balanced_order(jnp.asarray(work[:real]), ctas))
  np.testing.assert_array_equal(order[:real], alone)
  assert (work[order[real:]] == 0).all()


def _pieces_check(n, ctas, slots):
  """dkdv_pieces(n) against its promises; returns each CTA's work and the split tiles' count."""
  p = {f: np.asarray(x) for f, x in zip(mm.DkdvPieces._fields,
                                         mm.dkdv_pieces(jnp.asarray(n), ctas, slots))}
  flat, n_real = n.reshape(-1), int(p["n_real"][0])
  real = p["order"][:n_real]
  assert sorted(p["order"].tolist()) == list(range(p["tile"].size))
  assert (p["c1"][p["order"][n_real:]] == p["c0"][p["order"][n_real:]]).all()  # padding: empty
  runs = {}
  for i in real:
    runs.setdefault(int(p["tile"][i]), []).append((p["c0"][i], p["c1"][i], p["slot"][i]))
  assert sorted(runs) == list(range(flat.size))  # every tile has a piece
  for t, pieces in runs.items():  # its chunks covered once, in runs of consecutive chunks
    pieces.sort()
    assert pieces[0][0] == 0 and pieces[-1][1] == flat[t]
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
    if len(pieces) == 1:
      assert pieces[0][2] == -1  # a whole tile, stored as dK, dV
    else:
      assert len(pieces) <= mm.MAX_PIECES
      r = np.flatnonzero(p["split_tile"] == t)
      assert r.size == 1 and p["count"][r[0]] == len(pieces)
      assert sorted(x[2] for x in pieces) == list(range(p["base"][r[0]],
                                                          p["base"][r[0]] + len(pieces)))
  assert p["count"].sum() <= slots
  work = (p["c1"] - p["c0"] + 1)[real]
  load = np.bincount(np.arange(n_real) % ctas, weights=work, minlength=ctas)
  return load, int((p["count"] > 0).sum())


def test_dkdv_pieces_cover_every_tile_once_and_even_the_ctas():
  """`dkdv_pieces`: every tile's chunks once, in pieces of consecutive chunks (a split tile's in
  consecutive float32 slots, at most MAX_PIECES, all of them within the slots), the real pieces
  first in the order. With GQA's few long tiles (2 kv heads, 128 tiles, work falling with the
  key block as at 16K block 128 top-8 16/2) the busiest CTA goes from about twice the mean work
  to within 15% of it; with many short tiles (16 kv heads) nothing is split and the deal is
  `balanced_order`'s; with few CTAs and slots, zero-chunk tiles and one very long tile, the
  promises hold."""
  ctas, slots = 132, 2 * 132
  rng = np.random.default_rng(0)
  heavy = (450 * (1 - np.arange(128) / 128) ** 2 + rng.integers(0, 30, size=(2, 128)))
  heavy = heavy.astype(np.int32)
  whole = np.bincount(np.arange(256) % ctas, minlength=ctas,
                      weights=(heavy.reshape(-1) + 1)[np.asarray(mm.balanced_order(
                          jnp.asarray(heavy.reshape(-1) + 1), ctas))])
  load, n_split = _pieces_check(heavy, ctas, slots)
  mean = (heavy + 1).sum() / ctas
  assert whole.max() > 1.8 * mean and load.max() < 1.15 * mean and n_split > 0
  light = rng.integers(0, 60, size=(16, 128)).astype(np.int32)
  load, n_split = _pieces_check(light, ctas, slots)
  assert n_split == 0
  for n in (np.array([[0, 0, 500]], np.int32), np.array([[3, 0, 90, 2, 1]], np.int32),
            rng.integers(0, 9, size=(1, 2)).astype(np.int32), np.zeros((2, 3), np.int32)):
    _pieces_check(n, min(3, n.size), 2 * min(3, n.size))
  with pytest.raises(AssertionError):  # a CTA without a real piece: `dkdv_tiles` never asks
    mm.dkdv_pieces(jnp.ones((1, 2), jnp.int32), 3, 6)


def _split_equals_whole(q, k, v, seg, ct, chunks, **kw):
  """(out, dq, dk, dv) with mosaic_dkdv_split=1, checked against whole tiles: the output and dQ
  to the bit (the forward and dQ do not change), dK and dV within one bf16 rounding (a split
  tile's float32 sum adds its pieces in another order, which can move an element's rounding by
  one bf16 step: up to 2^-7 of the largest element where the element lies within a factor 2 of
  it, the bound of `rel_err`'s max-normalized difference)."""
  def grads(split):
    f = lambda q, k, v: run("pallas_gpu", q, k, v, seg,
                            tiles=tiles(128, 1, 1, chunks, split=split), **kw)
    return [np.asarray(x, np.float32) for x in helpers.vjp_all(f, q, k, v, ct)]

  got, want = grads(1), grads(0)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  for a, b in zip(got[2:], want[2:]):
    assert rel_err(a, b) <= 2.0 ** -7
  return got


def test_dkdv_balance_tool_deals_the_kernels_items(capsys):
  """tools/dkdv_balance.py: a call's items are the kernel's (kv heads x 128-key tiles over the
  calls), each CTA's work is its places' in `balanced_order`, the busiest CTA at least the
  mean."""
  from tools import dkdv_balance
  dkdv_balance.main(["1024:128:3:4:2", "--calls", "1,2", "--ctas", "3", "--row-tiles"])
  rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
  assert [(r[1], r[2]) for r in rows[:2]] == [("1", "16"), ("2", "8")]
  assert rows[2][-3:] == ["(forward", "row", "tiles)"] and len(rows) == 3
  assert all(float(r[6]) >= 1.0 for r in rows)  # busiest/mean
  work = np.array([5, 1, 9, 3, 7])
  order = np.asarray(mm.balanced_order(jnp.asarray(work), 2))
  assert dkdv_balance.deal(work, 2).tolist() == [work[order[0::2]].sum(), work[order[1::2]].sum()]


@needs_runner
@pytest.mark.parametrize("lengths, heads, kv_heads, dim, chunks, ctas",
                         [((1024,), 4, 1, 64, 1, 3), ((300, 1, 419, 304), 8, 2, 128, 2, 8)],
                         ids=["gqa4_one_doc", "gqa4_docs_head_chunks_8_ctas"])
def test_split_dkdv_equals_whole_tiles(lengths, heads, kv_heads, dim, chunks, ctas, retraced):
  """mosaic_dkdv_split=1 against whole tiles (and the float32 oracle): the same outputs and dQ
  to the bit (the forward and dQ do not change), dK and dV within one bf16 rounding (a split
  tile's float32 sum adds its pieces in another order), where tiles were split (checked: GQA
  4:1, block 128 top-3; 8 CTAs for the 16 tiles of the second case, as many tiles a CTA as a
  GPU's at GQA 8); by kv-head chunks too (the dK/dV runs once over every head)."""
  if not helpers.COMPILED:
    retraced.setattr(mm, "num_ctas", lambda interpret: ctas)
  q, k, v = random_qkv(11, 1, sum(lengths), heads, kv_heads, dim, jnp.bfloat16)
  seg = packed_segments(1, lengths) if len(lengths) > 1 else None
  ct = jax.random.normal(jax.random.key(4), q.shape, jnp.bfloat16)
  kw = dict(block_size=128, topk=3)
  routing, dims = rt.route(q, k, seg, block_q=mm.ROWS, **kw)
  chunk_n = mm.dkdv_chunks(mg.mosaic_dkdv_items(routing, dims, q.shape[1]))
  n_ctas = mm.num_ctas(not helpers.COMPILED)
  split = mm.dkdv_pieces(chunk_n, min(chunk_n.size, n_ctas), 2 * min(chunk_n.size, n_ctas))
  assert int((split.count > 0).sum()) >= 1  # the case splits tiles

  got = _split_equals_whole(q, k, v, seg, ct, chunks, **kw)
  up = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    oracle = helpers.vjp_all(lambda q, k, v: moba_lib.moba_reference(q, k, v, seg, **kw),
                             up(q), up(k), up(v), up(ct))
  for a, b in zip(got, oracle):
    assert rel_err(a, b) < 1e-2


@pytest.mark.skipif(not (helpers.COMPILED and mm.on_hopper()),
                    reason="compiled on a Hopper GPU only (interpreted, one case takes hours)")
@pytest.mark.parametrize("name", ["16k_b128_k8_gqa8", "32k_gqa8_d64_docs"])
def test_split_dkdv_at_benchmark_scale_equals_whole_tiles(name):
  """The split dK/dV (mosaic_dkdv_split=1) at GQA's benchmark shapes, where its pieces are
  many (16K block 128 top-8 with 16/2 heads: about 100 split tiles of 256): outputs and dQ to the
  bit, dK and dV within one bf16 rounding of the whole tiles'."""
  lengths, heads, kv_heads, dim, block, topk = {
      "16k_b128_k8_gqa8": ((16384,), 16, 2, 128, 128, 8), **SCALE}[name]
  q, k, v = random_qkv(1, 1, sum(lengths), heads, kv_heads, dim, jnp.bfloat16)
  seg = packed_segments(1, lengths) if len(lengths) > 1 else None
  ct = jax.random.normal(jax.random.key(2), q.shape, jnp.bfloat16)

  _split_equals_whole(q, k, v, seg, ct, 1, block_size=block, topk=topk)


@pytest.mark.parametrize("items, ctas", [(3136, 132), (3036, 132), (1000, 132), (100, 132),
                                         (3200, 132), (23, 4), (13120, 132)])
def test_snake_tiles_are_the_index_orders_rounds_with_the_pattern_evened(items, ctas):
  """`snake_tile` and `snake_count`: every tile exactly once, round i's tiles the index order's
  round i; and a work pattern of period 4 in the tile index (the dense tiles' 1-4 chunks) no
  longer lands on the same CTAs: with 132 CTAs the index order gave CTA c the tiles of work
  c % 4 + 1 (a spread growing with the rounds: 4x at 24), the snake rounds within two tiles'
  work of each other at any number of rounds (even or odd full rounds, a partial one or none)."""
  cta = np.arange(ctas)[:, None]
  rounds = -(-items // ctas)
  i = np.arange(rounds)[None, :]
  count = np.asarray(mm.snake_count(jnp.asarray(cta), ctas, items))
  mine = i < count
  tile = np.asarray(jax.jit(mm.snake_tile, static_argnums=2)(jnp.asarray(i), jnp.asarray(cta),
                                                              ctas))
  taken = np.broadcast_to(tile, mine.shape)[mine]
  assert sorted(taken.tolist()) == list(range(items))
  assert all(set(tile[:, r][mine[:, r]]) == set(range(r * ctas, min(items, (r + 1) * ctas)))
             for r in range(rounds))
  work = np.arange(items) % 4 + 1
  load = lambda t, m: np.where(m, work[np.minimum(t, items - 1)], 0).sum(axis=1)
  index_mine = i < (items - 1 - cta) // ctas + 1
  if items >= 8 * ctas:
    assert load(i * ctas + cta, index_mine).max() >= 1.5 * load(i * ctas + cta, index_mine).min()
    assert load(tile, mine).max() - load(tile, mine).min() <= 2 * work.max()


@needs_runner
def test_mosaic_kernels_without_segment_ids_equal_zeros():
  """segment_ids=None (one document per row, a static fact: no lax.cond in the routing) gives the
  outputs and gradients of explicit zeros (data: the packed-documents path, checked against the
  oracle by the all_ragged case), with all three Mosaic kernels, a ragged end, GQA."""
  q, k, v = random_qkv(7, 1, 600, 4, 2, 128, jnp.bfloat16)
  ct = jax.random.normal(jax.random.key(3), q.shape, jnp.bfloat16)

  def grads(seg):
    out, vjp = jax.vjp(lambda q, k, v: run("pallas_gpu", q, k, v, seg, tiles=tiles(128, 1, 1),
                                           block_size=128, topk=3), q, k, v)
    return [np.asarray(x, np.float32) for x in (out, *vjp(ct))]

  for what, a, b in zip(("out", "dq", "dk", "dv"), grads(None),
                        grads(jnp.zeros((1, 600), jnp.int32))):
    np.testing.assert_array_equal(a, b, err_msg=what)
