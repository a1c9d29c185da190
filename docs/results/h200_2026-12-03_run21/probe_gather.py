"""Run 21 probe (kept as run): 64 rows gathered into a swizzled SMEM tile by cp.async (inline PTX),
stored back by TMA, compared with x[idx] (docs/kernel_notes.md "Run 21")."""
import sys
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.mosaic.gpu import utils as mu
from jax._src.lib.mlir import ir
from jax._src.lib.mlir.dialects import arith, llvm

ROWS = 64
TILING = lambda: (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

def gather_rows_smem(src, idx, dst):
  """dst [64, D] (tiled (8, 64), swizzled 128) <- rows idx[0:64] of src [N, D] (16-bit)."""
  dim = src.shape[-1]
  cpr = dim * 2 // 16  # 16-byte chunks per row
  per_thread = ROWS * cpr // 128

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType(), plgpu.RefType(TILING())))
  def body(ctx, src_m, idx_m, dst_m):
    i32, i64 = ir.IntegerType.get_signless(32), ir.IntegerType.get_signless(64)
    c32 = lambda v: arith.constant(i32, v)
    tid = arith.remui(mu.thread_idx(), c32(128))
    src_p = llvm.ptrtoint(i64, mu.memref_ptr(src_m))
    idx_p = mu.memref_ptr(idx_m)
    dst_p = llvm.ptrtoint(i32, mu.memref_ptr(dst_m))
    rows_per_step = 128 // cpr
    r_in = arith.divui(tid, c32(cpr))           # row within a step
    col = arith.remui(tid, c32(cpr))            # chunk within the row
    tcol = arith.divui(col, c32(8))
    sw = arith.xori(arith.remui(col, c32(8)), arith.remui(r_in, c32(8)))
    for j in range(per_thread):
      r = arith.addi(r_in, c32(j * rows_per_step))
      ip = llvm.getelementptr(idx_p.type, idx_p, [r], [-2147483648], i32, llvm.GEPNoWrapFlags.none)
      row = llvm.load(i32, ip)
      off = arith.muli(arith.extsi(i64, row), arith.constant(i64, dim * 2))
      off = arith.addi(off, arith.extui(i64, arith.muli(col, c32(16))))
      s_addr = arith.addi(src_p, off)
      d_off = arith.addi(arith.muli(arith.addi(arith.muli(arith.divui(r, c32(8)), c32(dim // 64)), tcol), c32(1024)),
                         arith.addi(arith.muli(arith.remui(r, c32(8)), c32(128)), arith.muli(sw, c32(16))))
      d_addr = arith.addi(dst_p, d_off)
      llvm.inline_asm(ir.Type.parse("!llvm.void"), [d_addr, s_addr],
                      "cp.async.cg.shared.global [$0], [$1], 16;", "r,l", has_side_effects=True)
    llvm.inline_asm(ir.Type.parse("!llvm.void"), [],
                    "cp.async.wait_all;\n\tfence.proxy.async.shared::cta;", "", has_side_effects=True)
    mu.warpgroup_barrier()

  body(src, idx, dst)


def probe(n=4096, dim=128, dtype=jnp.bfloat16, tiles=3):
  src = jax.random.normal(jax.random.key(0), (n, dim), dtype)
  idx = jax.random.randint(jax.random.key(1), (tiles * ROWS,), 0, n, jnp.int32)
  mesh = plgpu.Mesh(grid=(tiles,), grid_names=("cta",), num_threads=1, thread_name="wg")

  def kernel(src_ref, idx_ref, out_ref, smem, bar):
    t = jax.lax.axis_index("cta")
    gather_rows_smem(src_ref, idx_ref.at[pl.ds(t * ROWS, ROWS)], smem)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(smem, out_ref.at[pl.ds(t * ROWS, ROWS)])
    plgpu.wait_smem_to_gmem(0)

  def body(src_ref, idx_ref, out_ref):
    pl.run_scoped(lambda sm: kernel(src_ref, idx_ref, out_ref, sm, None),
                  plgpu.SMEM((ROWS, dim), dtype, transforms=TILING()), collective_axes="wg")

  f = pl.kernel(body, out_type=jax.ShapeDtypeStruct((tiles * ROWS, dim), dtype), mesh=mesh,
                name="gather_probe")
  return f, src, idx


if __name__ == "__main__":
  for dim in (64, 128):
    f, src, idx = probe(dim=dim)
    if sys.argv[1:] == ["lower"]:
      txt = jax.jit(f).trace(src, idx).lower(lowering_platforms=("cuda",)).as_text()
      print(dim, "lowered", len(txt))
    else:
      out = jax.jit(f)(src, idx)
      ok = np.array_equal(np.asarray(out), np.asarray(src[idx]))
      print(dim, "equal to src[idx]:", ok, float(jnp.abs(out.astype(jnp.float32) - src[idx].astype(jnp.float32)).max()))
