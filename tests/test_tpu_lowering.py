"""The pallas_tpu kernels lower for TPU (Mosaic) on the CPU, and their blocks tile as Mosaic needs.

Lowering only: `jax.jit(f).trace(...).lower(lowering_platforms=("tpu",))` runs every Pallas TPU
lowering rule (what interpret mode skips); nothing compiles or runs, so benchmark shapes cost only
tracing. The interpret suite (tests/test_kernels.py, tests/test_moba.py) checks the arithmetic.
What needs a TPU (Mosaic's compiler passes, VMEM limits, speed) is listed in docs/tpu.md.
"""

import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl

from moba_jax import attention
from moba_jax.kernels import moba_tpu

ALL = ["moba_tpu_fwd", "moba_tpu_dq", "moba_tpu_dkdv_dense", "moba_tpu_dkdv_sparse"]
DENSE = ALL[:3]  # top-1 (or one block): no past blocks, no sparse dK/dV kernel
GATED = ALL + ["moba_gate_tpu"]  # 16-bit queries: the routing's gate is the TPU gate kernel


def _grad_fn(block_size, topk, tiles=()):
  options = attention.KernelOptions(tiles=tiles)

  def loss(q, k, v, seg):
    out = attention.moba_attention(q, k, v, segment_ids=seg, block_size=block_size, topk=topk,
                                   implementation="pallas_tpu", options=options)
    return out.astype(jnp.float32).sum()
  return jax.grad(loss, argnums=(0, 1, 2))


def _specs(batch, seq, heads, kv_heads, dim, dtype):
  s = jax.ShapeDtypeStruct
  return (s((batch, seq, heads, dim), dtype), s((batch, seq, kv_heads, dim), dtype),
          s((batch, seq, kv_heads, dim), dtype), s((batch, seq), jnp.int32))


def lower_for_tpu(shape, dtype, block_size, topk, tiles=()):
  """Forward + backward traced with the routing's TPU choices (`_routing.tracing_for`: the gate
  kernel where it takes the case, the key counts' search), tiles checked, lowered for TPU ->
  (kernels, StableHLO text)."""
  from moba_jax.kernels import _routing as rt
  with rt.tracing_for("tpu"):
    traced = jax.jit(_grad_fn(block_size, topk, tiles)).trace(*_specs(*shape, dtype))
    kernels = moba_tpu.check_tiles(traced.jaxpr)
    return kernels, traced.lower(lowering_platforms=("tpu",)).as_text()


def _assert_lowered(kernels, text, expected):
  assert sorted(kernels) == sorted(expected)
  assert text.count("@tpu_custom_call") == len(expected)
  for name in expected:  # every kernel is in the module as a Mosaic custom call
    assert name in text


# (batch, seq, heads, kv_heads, head_dim), dtype, block_size, topk, tiles, kernels
CASES = {
    # the benchmark shape (docs/benchmarks.md): 8K, 16 heads, head_dim 128, block 512 top-3
    "bench_8k_bf16": ((1, 8192, 16, 16, 128), jnp.bfloat16, 512, 3, (), GATED),
    # ragged: seq not a multiple of the block or the tiles; GQA 4:1; head_dim padded to 128
    "ragged_gqa_f32": ((2, 1000, 8, 2, 64), jnp.float32, 128, 3, (), ALL),
    "ragged_gqa_bf16": ((1, 777, 4, 2, 64), jnp.bfloat16, 100, 2, (), GATED),
    # top-1, the smallest float32 tiles Mosaic takes, GQA 2:1
    "top1_f32_tiles8": ((1, 300, 2, 1, 32), jnp.float32, 64, 1, (8, 8, 8), DENSE),
}


SLOW = {"ragged_gqa_f32"}  # float32 is covered by top1_f32_tiles8 in the default run


@pytest.mark.parametrize("case", [pytest.param(c, marks=[pytest.mark.slow] if c in SLOW else [])
                                  for c in CASES])
def test_pallas_tpu_lowers_for_tpu(case):
  """Packed documents change only values (segment ids), not what is lowered: one trace covers
  one document and many."""
  shape, dtype, block_size, topk, tiles, expected = CASES[case]
  _assert_lowered(*lower_for_tpu(shape, dtype, block_size, topk, tiles), expected)


def test_pallas_tpu_writes_forward_and_dq_rows_over_the_gathered_q_rows():
  """The forward's o and the dQ kernel's rows are aliased to their q-rows operand (no buffers of
  their own), the dK/dV kernels' outputs are not; the dK/dV run before the dQ, which takes the q
  rows after them (else XLA would copy the rows)."""
  _, text = lower_for_tpu((1, 1024, 4, 2, 128), jnp.bfloat16, 256, 3)
  calls = [line for line in text.splitlines() if "@tpu_custom_call" in line
           and "moba_gate_tpu" not in line]
  names = [next(n for n in ALL if n in line) for line in calls]
  aliased = {n: "output_operand_alias" in line for n, line in zip(names, calls)}
  assert aliased == {"moba_tpu_fwd": True, "moba_tpu_dq": True, "moba_tpu_dkdv_dense": False,
                     "moba_tpu_dkdv_sparse": False}
  assert names.index("moba_tpu_dq") > max(names.index("moba_tpu_dkdv_dense"),
                                          names.index("moba_tpu_dkdv_sparse"))


@pytest.mark.parametrize("seq, block, topk, packed, window, steps", [
    (8192, 512, 3, False, 512, 1),  # the benchmark shape: a tile's block is one window
    (8192, 512, 3, True, 640, 1),  # packed documents: a tile's range may cross a block start
    (16384, 128, 8, False, 128, 1),
    (32768, 4096, 12, False, 2048, 2),  # WINDOW_BYTES: 2048 keys of 16-bit head_dim 128
])
def test_forward_and_dq_take_one_grid_step_per_window_of_a_tiles_keys(seq, block, topk, packed,
                                                                      window, steps):
  """The TPU grid's fixed cost is paid once a step (docs/tpu_roofline.md): the forward and dQ
  take a row tile's key range in windows of up to WINDOW_BYTES (`kv_window`), so blocks of up to
  2048 keys are one grid step a tile (they were one a 128-key chunk, plus one past the block)."""
  from moba_jax.kernels import _routing as rt
  shape = (1, seq, 16, 16, 128)
  specs = _specs(*shape, jnp.bfloat16)
  traced = jax.jit(_grad_fn(block, topk)).trace(*specs[:3], specs[3] if packed else None)
  dims = rt.make_dims(seq, 1, block, topk, 128, one_doc=not packed)
  sizes = moba_tpu.BlockSizes()
  assert moba_tpu.kv_window(sizes, dims, 128, 2) == (window, steps)
  grid = moba_tpu.grid_steps(traced.jaxpr)
  assert grid["moba_tpu_fwd"] == grid["moba_tpu_dq"] == 16 * dims.tiles * steps


@pytest.mark.slow
def test_pallas_tpu_lowers_for_tpu_at_32k():
  _assert_lowered(*lower_for_tpu((1, 32768, 16, 16, 128), jnp.bfloat16, 512, 3), GATED)


@pytest.mark.parametrize("dtype,dim,topk,slots", [(jnp.bfloat16, 128, 3, 256),
                                                   (jnp.float16, 64, 8, 512),
                                                   (jnp.bfloat16, 128, 12, 32)])
def test_gate_kernel_lowers_for_tpu(dtype, dim, topk, slots):
  """The TPU gate kernel (kernels/moba_gate.py, `gate_topk_tpu`) lowers for Mosaic TPU at 8K
  with GQA 16/4: head_dim 128, or 64 padded; two, four and one chunks of 128 table slots;
  top-3, 8, 12; the tiles' chunk ranges as scalar-prefetch operands. Integer index maps and
  divisions avoid `//`, whose sign op needs a TPU's generation to lower. The interpret tests
  (tests/test_kernels.py) check its choice."""
  from moba_jax.kernels import moba_gate
  q = jax.ShapeDtypeStruct((1, 8192, 16, dim), dtype)
  pieces = jax.ShapeDtypeStruct((3, 1, slots, 4, dim), jnp.bfloat16)
  col = jax.ShapeDtypeStruct((1, 8192), jnp.int32)
  fn = functools.partial(moba_gate.gate_topk_tpu, n_sel=topk)
  with jax.default_matmul_precision("highest"):  # the kernel's products name their precision
    traced = jax.jit(fn).trace(q, pieces, col, col)
  text = traced.lower(lowering_platforms=("tpu",)).as_text()
  assert text.count("@tpu_custom_call") == 1 and "moba_gate_tpu" in text


@pytest.mark.parametrize("block, array, dtype, ok", [
    ((8, 128), (64, 256), jnp.float32, True),
    ((8, 128), (64, 256), jnp.bfloat16, False),  # 16-bit rows pack two to a sublane: 16
    ((16, 128), (64, 256), jnp.bfloat16, True),
    ((32, 128), (64, 256), jnp.int8, True),
    ((16, 128), (64, 256), jnp.int8, False),
    ((8, 64), (64, 256), jnp.float32, False),  # lanes: 128
    ((8, 64), (64, 64), jnp.float32, True),  # ... or the full extent
    ((4, 128), (4, 256), jnp.bfloat16, True),
    ((1, 128, 1), (2, 1024, 1), jnp.float32, True),
])
def test_tile_rule(block, array, dtype, ok):
  err = moba_tpu.tile_error(block, array, dtype)
  assert (err is None) == ok, err
  if not ok:
    assert str(list(block)) in err and "\n" not in err


@pytest.mark.parametrize("dtype, tiles, msg", [
    (jnp.bfloat16, (8,), "block_q=8"),
    (jnp.bfloat16, (128, 0), "block_k=0 must be at least 1"),
    (jnp.bfloat16, (128, 24), "block_k=24"),
    (jnp.float32, (128, 128, 100), "block_k_dkv=100"),
    (jnp.float32, (128, 128, 128, 192), "block_kv_window=192 must be a multiple of block_k=128"),
    (jnp.bfloat16, (128, 128, 128, 0, 200), "block_kv_window_dkv=200: bfloat16 block"),
])
def test_bad_tiles_fail_before_compile(dtype, tiles, msg):
  """A tile Mosaic would refuse is a one-line ValueError naming it, raised while tracing (on the
  CPU, in interpret mode too), before anything lowers or compiles."""
  specs = _specs(1, 256, 4, 2, 64, dtype)
  with pytest.raises(ValueError, match=msg.replace("*", r"\*")) as e:
    jax.eval_shape(_grad_fn(64, 2, tiles), *specs)
  assert "\n" not in str(e.value)


def test_check_tiles_names_the_kernel_and_block():
  """check_tiles catches a bfloat16 [8, 128] block, which Pallas' own TPU lowering lets through
  (it checks (8, 128) for every dtype) and Mosaic refuses."""
  def kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...] * 2

  def f(x):
    return pl.pallas_call(kernel, grid=(8,), in_specs=[pl.BlockSpec((8, 128), lambda i: (i, 0))],
                          out_specs=pl.BlockSpec((8, 128), lambda i: (i, 0)),
                          out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), name="toy")(x)

  f32 = jax.jit(f).trace(jax.ShapeDtypeStruct((64, 128), jnp.float32))
  assert moba_tpu.check_tiles(f32.jaxpr) == ["toy"]
  bf16 = jax.jit(f).trace(jax.ShapeDtypeStruct((64, 128), jnp.bfloat16))
  with pytest.raises(ValueError, match=r"toy .*bfloat16 block \[8, 128\] of array \[64, 128\]"):
    moba_tpu.check_tiles(bf16.jaxpr)


def test_sublane_tile():
  assert [moba_tpu.sublane_tile(d) for d in (jnp.float32, jnp.bfloat16, jnp.int8)] == [8, 16, 32]


SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from moba_jax import moba
from moba_jax.kernels import _routing as rt
mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                     axis_types=(jax.sharding.AxisType.Auto,) * 3)
rules = (("batch", ("data", "fsdp")), ("heads", ("tensor",)), ("kv_heads", ("tensor",)))
ref = lambda q, k, v, s: moba.moba_reference(q, k, v, s, block_size=32, topk=2)
w = jnp.linspace(-1, 1, 4 * 128 * 4 * 16).reshape(4, 128, 4, 16)
def grads(attn):
  return jax.jit(jax.value_and_grad(lambda q, k, v, s: (attn(q, k, v, s) * w).sum(), (0, 1, 2)))
def per_shard(q, k, v, s):
  with nnx.logical_axis_rules(rules):
    return rt.over_mesh_shards(ref, q, k, v, s)
keys = jax.random.split(jax.random.key(0), 3)
q = jax.random.normal(keys[0], (4, 128, 4, 16))
k, v = (jax.random.normal(x, (4, 128, 2, 16)) for x in keys[1:])
seg = jnp.asarray(np.repeat([[0] * 50 + [1] * 78], 4, 0), jnp.int32)
with jax.set_mesh(mesh):
  got = grads(per_shard)(q, k, v, seg)
  assert grads(per_shard).lower(q, k, v, seg).as_text().count("manual_computation") == 2
want = grads(ref)(q, k, v, seg)
for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
print("ok")
"""


@pytest.mark.slow  # ~45 s on 2 busy cores; the plan test lowers the kernels through the wrapper
def test_kernels_run_per_mesh_shard():
  """On 8 fake devices, `over_mesh_shards` (what the kernels run under a mesh: Mosaic custom calls
  cannot be auto-partitioned) gives the unsharded outputs and gradients: batch over data x fsdp,
  GQA heads over tensor with their kv heads. The reference stands in for the kernel."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", SHARDED], env=env, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
