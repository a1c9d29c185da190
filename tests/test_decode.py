"""KV-cache decoding (moba_jax/decode.py): prefill then one token at a time gives the logits of one
full forward pass at every position, and a decode step reads only the blocks its gate chose."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moba_jax import decode
from moba_jax.config import MobaConfig
from moba_jax.model import Decoder
from moba_jax.moba import moba_reference
from tests import helpers
from tests.helpers import random_qkv
from tests.test_model import CFG

# 2 layers (the hybrid: 1 MoBA + 1 full), GQA: 4 query heads over 2 kv heads.
SMALL = dataclasses.replace(CFG, n_layers=2)
BLOCK = 4
SEQ = 22  # 6 blocks, the last ragged
# Jitted once per static setting: eager dispatch would dominate these small problems.
step_attention = jax.jit(decode.moba_step_attention,
                         static_argnames=("block_size", "topk", "implementation", "options"))
choose_blocks = jax.jit(decode.choose_blocks, static_argnames=("block_size", "topk"))
reference = jax.jit(moba_reference, static_argnames=("block_size", "topk"))
append = jax.jit(decode.append, static_argnums=4)
fill = jax.jit(decode.fill, static_argnums=4)
# Left-aligned prompts: one token, exactly one block, and two ragged lengths; every row fills
# blocks mid-generation (the first decode token of row 1 opens a new block).
PROMPT_LENGTHS = (1, 4, 7, 10)


@pytest.fixture(autouse=True)
def exact_float32_products():
  """Both sides of every comparison in true float32: on a GPU the model's projections would
  default to TF32 (relative error ~1e-3), which no 1e-5 comparison survives and which can flip a
  near-tied gate choice between two otherwise equal computations."""
  with jax.default_matmul_precision("highest"):
    yield


def teacher_forced_logits(model, tokens, lengths, max_len):
  """Logits [B, T, V] of every position: prefill of each row's prompt, then the row's own next
  tokens fed one step at a time (rows past the end are fed a dummy token and not read)."""
  batch, seq = tokens.shape
  dec = decode.jit_decoding(model, max_len)
  prompt = int(max(lengths))
  logits, cache = dec.prefill(tokens[:, :prompt], jnp.asarray(lengths))
  out = np.full((batch, seq, model.cfg.vocab_size), np.nan, np.float32)
  rows = np.arange(batch)
  for b, n in enumerate(lengths):
    out[b, :n] = np.asarray(logits[b, :n])
  pos = np.asarray(lengths)
  while pos.min() < seq:
    live = pos < seq
    step_logits, cache = dec.step(cache, jnp.asarray(tokens[rows, np.minimum(pos, seq - 1)]))
    out[rows[live], pos[live]] = np.asarray(step_logits)[live]
    pos = pos + 1
  return out


def check_decoding_matches_forward(moba, seed=0, lengths=PROMPT_LENGTHS, seq=SEQ, cfg=SMALL):
  model = Decoder(cfg, moba, rngs=nnx.Rngs(seed))
  tokens = np.asarray(jax.random.randint(jax.random.key(seed + 100), (len(lengths), seq), 0,
                                         SMALL.vocab_size))
  expected = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens)))
  max_len = seq + max(lengths) - min(lengths)  # rows that finish early keep stepping
  got = teacher_forced_logits(model, tokens, lengths, max_len)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
  return model, tokens


@pytest.mark.parametrize("moba", [
    MobaConfig(block_size=BLOCK, topk=2),
    MobaConfig(block_size=BLOCK, topk=2, hybrid_full_layers=1),
    MobaConfig(block_size=BLOCK, topk=2, hybrid_full_layers="all"),
    MobaConfig(block_size=BLOCK, topk=1, implementation="xla"),  # prefill on the gathered path
    MobaConfig(block_size=BLOCK, topk=10),  # more than the 6 (+ spare) blocks of the cache
], ids=["moba", "hybrid", "full", "topk1-xla", "topk10"])
def test_decoding_equals_one_forward_pass(moba):
  check_decoding_matches_forward(moba)


@pytest.mark.parametrize("impl", [
    p if p.values[0] == "pallas_gpu" else pytest.param(*p.values, marks=[*p.marks,
                                                                          pytest.mark.slow])
    for p in helpers.kernel_impls()])
@pytest.mark.filterwarnings("error:decode implementation:RuntimeWarning")  # no silent fallback
def test_decoding_through_the_kernels_equals_one_forward_pass(impl):
  """A hybrid model whose MoBA layer prefills and decodes through a Pallas kernel (the TPU one,
  interpreted, takes minutes: slow-marked; the step tests above cover its attention)."""
  block, seq, scale = geometry(impl)
  check_decoding_matches_forward(MobaConfig(block_size=block, topk=2, hybrid_full_layers=1,
                                            implementation=impl,
                                            interpret=helpers.options(impl).interpret),
                                 lengths=tuple(n * scale for n in PROMPT_LENGTHS), seq=seq,
                                 cfg=dataclasses.replace(SMALL, head_dim=kernel_dim(impl)))


def kernel_dim(impl) -> int:
  """A head dim the implementation's decode kernel takes (the TPU kernel's tiles need 128 lanes;
  smaller dims would fall back to the XLA step, which the tests turn into an error)."""
  return 128 if impl == "pallas_tpu" else 8


def geometry(impl) -> tuple[int, int, int]:
  """(block_size, sequence length, scale of the lengths) of a decode test: the TPU kernel's (block,
  head_dim) tiles need blocks of 8 (float32) or 16 (bfloat16) rows, so its cases run the same
  layout of 6 blocks, the last ragged, at 4 times the length."""
  scale = 4 if impl == "pallas_tpu" else 1
  return BLOCK * scale, SEQ * scale, scale


def random_cache(seed, lengths, seq=SEQ, kv_heads=2, dim=8, block=BLOCK):
  """A MoBA layer cache filled from random keys/values of rows of `lengths` tokens (4 rows in
  every test, so that the jitted functions compile once)."""
  q, k, v = random_qkv(seed, len(lengths), seq, 2 * kv_heads, kv_heads, dim)
  empty = decode.LayerCache(jnp.zeros_like(k), jnp.zeros_like(v),
                            jnp.zeros((len(lengths), -(-seq // block), kv_heads, dim)))
  n = jnp.asarray(lengths, jnp.int32)
  return q, k, v, fill(empty, k, v, n, block), n


def impl_cache(seed, impl, lengths):
  """random_cache at the implementation's geometry: (q, k, v, cache, n, block_size)."""
  block, seq, scale = geometry(impl)
  return (*random_cache(seed, tuple(n * scale for n in lengths), seq=seq, dim=kernel_dim(impl),
                        block=block), block)


def decode_impls() -> list:
  """The decode step's attention implementations: the XLA gather and the Pallas kernels
  (interpreted on the CPU, compiled with --compiled on their own platform)."""
  return [pytest.param("xla")] + helpers.kernel_impls()


def impl_step(impl, q, cache, n, **kw):
  return step_attention(q, cache, n, implementation=impl, options=helpers.options(impl), **kw)


@pytest.mark.filterwarnings("error:decode implementation:RuntimeWarning")  # no silent fallback
@pytest.mark.parametrize("impl", decode_impls())
@pytest.mark.parametrize("topk", [1, 2, 3])
def test_step_attention_equals_reference_at_the_newest_position(topk, impl):
  """Row b's newest query (position n_b - 1) against the reference over the whole row: keys after
  it change only its current block's gate key, and the current block is always chosen."""
  q, k, v, cache, n, block = impl_cache(1, impl, (3, 9, 13, SEQ))
  rows = np.arange(len(n))
  got = impl_step(impl, q[rows, n - 1], cache, n, block_size=block, topk=topk)
  ref = reference(q, k, v, jnp.zeros(q.shape[:2], jnp.int32), block_size=block, topk=topk)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref[rows, n - 1]), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("error:decode implementation:RuntimeWarning")  # no silent fallback
@pytest.mark.parametrize("impl", helpers.kernel_impls())
def test_kernel_steps_equal_the_gathered_step_in_bfloat16(impl):
  """bfloat16 caches: the kernels read the chosen blocks in place, the XLA step gathers them; both
  accumulate in float32, so they differ by the output's rounding at most (one bf16 ulp)."""
  q, _, _, cache, n, block = impl_cache(5, impl, (1, 7, 16, SEQ))
  cast = lambda x: x.astype(jnp.bfloat16)
  cache = cache._replace(k=cast(cache.k), v=cast(cache.v))
  q_new = cast(q[np.arange(4), n - 1])
  want = np.asarray(impl_step("xla", q_new, cache, n, block_size=block, topk=2), np.float32)
  got = np.asarray(impl_step(impl, q_new, cache, n, block_size=block, topk=2), np.float32)
  np.testing.assert_allclose(got, want, rtol=2 ** -8, atol=0)


def test_prefilled_cache_is_whole_blocks_and_zero_past_each_row():
  """init_cache rounds the cache up to whole MoBA blocks (22 -> 24 tokens: a decode kernel reads
  every block in place, no per-step padding) and prefill keeps no padding keys or values: every
  position past a row's length holds zeros, as the full-attention step assumes."""
  model = Decoder(SMALL, MobaConfig(block_size=BLOCK, topk=2, hybrid_full_layers=1),
                  rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (4, 10), 3, SMALL.vocab_size)
  _, cache = decode.jit_decoding(model, SEQ).prefill(tokens, jnp.asarray(PROMPT_LENGTHS))
  past = np.arange(24)[None, :] >= np.asarray(PROMPT_LENGTHS)[:, None]  # [B, T]
  for layer in cache.layers:
    assert layer.k.shape[1] == layer.v.shape[1] == 24
    for x in (np.asarray(layer.k), np.asarray(layer.v)):
      assert (x[past] == 0).all() and (x[~past] != 0).any()


def test_appending_keys_one_by_one_keeps_exact_block_sums():
  """After every token, block sums grown one key at a time equal a prefill's of that length
  (the ragged last block included)."""
  _, k, v, grown, _ = random_cache(2, (0,) * 4)
  for t in range(SEQ):
    at = jnp.full((4,), t, jnp.int32)
    grown = append(grown, k[:, t], v[:, t], at, BLOCK)
    whole = fill(grown, k, v, at + 1, BLOCK)
    np.testing.assert_allclose(np.asarray(grown.block_sums), np.asarray(whole.block_sums),
                               rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(grown.k), np.asarray(k))


@pytest.mark.filterwarnings("error:decode implementation:RuntimeWarning")  # no silent fallback
@pytest.mark.parametrize("impl", decode_impls())
def test_decode_step_reads_only_the_chosen_blocks(impl):
  """NaN in every key and value no head of a kv group chose (and past each row's length) leaves
  the output unchanged, bit for bit."""
  topk = 2
  q, _, _, cache, n, block = impl_cache(3, impl, (2, 6, 14, SEQ))
  rows, heads, kv_heads = np.arange(len(n)), q.shape[2], cache.k.shape[2]
  q_new = q[rows, n - 1]
  clean = impl_step(impl, q_new, cache, n, block_size=block, topk=topk)
  blocks, valid = choose_blocks(q_new, cache.block_sums, n, block_size=block, topk=topk)
  read = np.zeros(cache.k.shape[:3], bool)  # [B, T, K]: entries some head may read
  for b, h, s in zip(*np.nonzero(np.asarray(valid))):
    start = int(blocks[b, h, s]) * block
    read[b, start:min(start + block, int(n[b])), h // (heads // kv_heads)] = True
  assert 0 < read.sum() < read.size / 2  # a real sparsity pattern
  poison = lambda x: jnp.where(jnp.asarray(read)[..., None], x, jnp.nan)
  dirty = impl_step(impl, q_new, cache._replace(k=poison(cache.k), v=poison(cache.v)), n,
                    block_size=block, topk=topk)
  assert np.isfinite(np.asarray(dirty)).all()
  np.testing.assert_array_equal(np.asarray(dirty), np.asarray(clean))


def test_gate_always_chooses_the_current_block_and_never_a_future_one():
  lengths = (1, 4, 5, 17)
  q, _, _, cache, n = random_cache(4, lengths)
  q_new = q[np.arange(4), n - 1]
  blocks, valid = choose_blocks(q_new, cache.block_sums, n, block_size=BLOCK, topk=3)
  blocks, valid = np.asarray(blocks), np.asarray(valid)
  current = (np.asarray(n) - 1) // BLOCK
  assert (blocks[..., 0] == current[:, None]).all() and valid[..., 0].all()
  assert (np.where(valid, blocks, -1) <= current[:, None, None]).all()
  assert (valid.sum(-1) == np.minimum(3, current + 1)[:, None]).all()


def test_decode_bench_prints_a_table_and_counts_bytes(capsys):
  """The decode benchmark runs on the CPU; its floor counts the bytes a step must read."""
  from moba_jax import bench, bench_decode
  argv = ["--decode", "--caches", "1024", "--batches", "2", "--heads", "4", "--kv-heads", "2",
          "--dim", "16", "--block", "64", "--topk", "3", "--repeats", "2", "--warmup", "1"]
  assert bench.main(argv) == 0
  out = capsys.readouterr().out
  assert "x floor" in out and "attention moba" in out and "attention full" in out
  args = bench_decode.parse_args(argv[1:])
  # full: K and V, 2 rows x 1024 tokens x 2 kv heads x 16 dims x 2 bytes (bfloat16)
  assert bench_decode.read_bytes("full", 2, 1024, args) == 2 * 2 * 1024 * 2 * 16 * 2
  # MoBA: 16 block sums (float32) per kv head, plus 3 blocks of 64 keys and values per query head
  assert bench_decode.read_bytes("moba", 2, 1024, args) == \
      2 * 16 * 2 * 16 * 4 + 2 * 2 * 4 * 3 * 64 * 16 * 2


@pytest.mark.parametrize("shape", [(1, 131072, 16, 16, 128, 512, 3, jnp.bfloat16),
                                   (2, 1000, 8, 2, 128, 64, 3, jnp.float32)],
                         ids=["bench_128k_bf16", "ragged_gqa_f32"])
def test_tpu_decode_kernel_lowers_for_tpu(shape):
  """The TPU decode step lowers through Mosaic's rules on the CPU (nothing runs) and its blocks
  tile as Mosaic needs (moba_tpu.check_tiles); the interpret tests above check its arithmetic."""
  from moba_jax.kernels import moba_tpu
  batch, seq, heads, kv_heads, dim, block, topk, dtype = shape
  spec = jax.ShapeDtypeStruct
  kv = spec((batch, seq, kv_heads, dim), dtype)

  def step(q, k, v, sums, n):
    return decode.moba_step_attention(q, decode.LayerCache(k, v, sums), n, block_size=block,
                                      topk=topk, implementation="pallas_tpu")
  traced = jax.jit(step).trace(spec((batch, heads, dim), dtype), kv, kv,
                               spec((batch, -(-seq // block), kv_heads, dim), jnp.float32),
                               spec((batch,), jnp.int32))
  assert moba_tpu.check_tiles(traced.jaxpr) == ["moba_decode_tpu"]
  assert traced.lower(lowering_platforms=("tpu",)).as_text().count("@tpu_custom_call") == 1


def test_decode_implementation_follows_the_training_string():
  """One config string picks training and decoding kernels; a kernel that cannot take the head
  dim falls back to the XLA step (with a warning when it was named)."""
  assert decode.resolve_decode("xla") == decode.resolve_decode("reference") == "xla"
  assert decode.resolve_decode("pallas_gpu", 128) == "pallas_gpu"
  assert decode.resolve_decode("pallas_tpu", 256) == "pallas_tpu"
  assert decode.resolve_decode("auto", 128) == {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(
      jax.default_backend(), "xla")
  with pytest.warns(RuntimeWarning, match="head_dim=96"):
    assert decode.resolve_decode("pallas_gpu", 96) == "xla"
  with pytest.warns(RuntimeWarning, match="head_dim=64"):
    assert decode.resolve_decode("pallas_tpu", 64) == "xla"
  # the TPU kernel's (block_size, head_dim) tiles: 8 rows for float32 caches, 16 for bfloat16
  assert decode.resolve_decode("pallas_tpu", 128, 8, jnp.float32) == "pallas_tpu"
  assert decode.resolve_decode("pallas_tpu", 128, 16, jnp.bfloat16) == "pallas_tpu"
  with pytest.warns(RuntimeWarning, match="block_size=8: bfloat16 block"):
    assert decode.resolve_decode("pallas_tpu", 128, 8, jnp.bfloat16) == "xla"
  with pytest.warns(RuntimeWarning, match="block_size=4: float32 block"):
    assert decode.resolve_decode("pallas_tpu", 128, 4, jnp.float32) == "xla"
