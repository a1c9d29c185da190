"""Behavioural tests of the Pallas MoBA kernels (GPU and TPU), in interpret mode on the CPU.

Oracles: the official golden cases, `moba_reference` (forward and gradients), the float32
reference for bf16 inputs, causal full attention, and properties of MoBA. Shapes are small:
interpret mode is slow.
"""

import importlib
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moba_jax import moba as moba_lib
from moba_jax import moba_attention

GOLDEN = pathlib.Path(__file__).parent / "data" / "moba_golden"
KERNELS = ["pallas_gpu", "pallas_tpu"]


def _available(impl):
  module = {"pallas_gpu": "moba_jax.kernels.moba_gpu", "pallas_tpu": "moba_jax.kernels.moba_tpu"}
  try:
    importlib.import_module(module[impl])
    return True
  except ImportError:
    return False


@pytest.fixture(params=KERNELS)
def impl(request):
  if not _available(request.param):
    pytest.skip(f"{request.param} not importable")
  return request.param


def run(impl, q, k, v, segment_ids, **kw):
  return moba_attention(q, k, v, segment_ids=segment_ids, implementation=impl, interpret=True,
                        **kw)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def random_qkv(seed, batch, seq, heads, kv_heads, dim, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (batch, seq, heads, dim), dtype),
          jax.random.normal(kk, (batch, seq, kv_heads, dim), dtype),
          jax.random.normal(kv, (batch, seq, kv_heads, dim), dtype))


def packed_segments(batch, lengths):
  seg = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(lengths)])
  return jnp.asarray(np.broadcast_to(seg, (batch, len(seg))))


def golden_names():
  return [c["name"] for c in json.loads((GOLDEN / "index.json").read_text())]


def load_golden(name):
  g = dict(np.load(GOLDEN / f"{name}.npz"))
  cu = g["cu_seqlens"]
  seg = np.concatenate([np.full(cu[i + 1] - cu[i], i, np.int32) for i in range(len(cu) - 1)])
  out = {n: jnp.asarray(g[n])[None] for n in ("q", "k", "v", "out", "cotangent", "dq", "dk", "dv")}
  out.update(segment_ids=jnp.asarray(seg)[None], block_size=int(g["block_size"]),
             topk=int(g["topk"]))
  return out


def vjp_all(fn, q, k, v, cot):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(cot))


@pytest.mark.parametrize("case", golden_names())
def test_golden_outputs_and_gradients(impl, case):
  g = load_golden(case)
  fn = lambda q, k, v: run(impl, q, k, v, g["segment_ids"], block_size=g["block_size"],
                           topk=g["topk"])
  got = jax.jit(lambda q, k, v, c: vjp_all(fn, q, k, v, c))(g["q"], g["k"], g["v"],
                                                            g["cotangent"])
  for name, x in zip(("out", "dq", "dk", "dv"), got):
    assert rel_err(x, g[name]) < 1e-4, (case, impl, name)


@pytest.mark.parametrize("seed,lengths,heads,kv_heads,block,topk", [
    (0, [150, 45, 61], 4, 2, 32, 3),  # GQA, packed documents, ragged tails
    (1, [120], 6, 2, 16, 5),  # groups of 3 (not a power of two), many blocks
])
def test_random_gqa_packed_matches_reference(impl, seed, lengths, heads, kv_heads, block, topk):
  seq = sum(lengths)
  q, k, v = random_qkv(seed, 2, seq, heads, kv_heads, 24)  # head_dim 24: padded to 32 inside
  seg = packed_segments(2, lengths)
  cot = jax.random.normal(jax.random.key(seed + 7), q.shape)
  kw = dict(block_size=block, topk=topk)
  want = vjp_all(lambda q, k, v: moba_lib.moba_reference(q, k, v, seg, **kw), q, k, v, cot)
  got = jax.jit(lambda q, k, v, c: vjp_all(lambda q, k, v: run(impl, q, k, v, seg, **kw),
                                           q, k, v, c))(q, k, v, cot)
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    assert rel_err(a, b) < 1e-4, (impl, name)


def test_bf16_close_to_float32_reference(impl):
  q, k, v = random_qkv(3, 1, 256, 4, 2, 64, jnp.bfloat16)
  seg = packed_segments(1, [180, 76])
  kw = dict(block_size=32, topk=3)
  # The oracle sees the same (bf16-representable) inputs in float32, so it routes identically.
  ref = moba_lib.moba_reference(*(x.astype(jnp.float32) for x in (q, k, v)), seg, **kw)
  out = jax.jit(lambda q, k, v: run(impl, q, k, v, seg, **kw))(q, k, v)
  assert out.dtype == jnp.bfloat16
  err = np.abs(np.asarray(out, np.float32) - np.asarray(ref))
  assert err.max() < 4e-2 and err.mean() < 4e-4, (err.max(), err.mean())


def test_equals_full_attention_when_few_blocks(impl):
  q, k, v = random_qkv(4, 1, 128, 2, 1, 16)
  seg = packed_segments(1, [100, 28])  # at most 4 blocks of 25 per document, topk 4
  out = jax.jit(lambda q, k, v: run(impl, q, k, v, seg, block_size=25, topk=4))(q, k, v)
  full = moba_lib.full_reference(q, k, v, seg)
  assert rel_err(out, full) < 1e-5


def test_no_leakage_and_unselected_keys_get_zero_gradient(impl):
  seq, block = 160, 16
  q, k, v = random_qkv(5, 1, seq, 2, 2, 16)
  seg = packed_segments(1, [96, 64])
  kw = dict(block_size=block, topk=2)
  fn = jax.jit(lambda q, k, v: run(impl, q, k, v, seg, **kw))
  t0 = 70  # perturb keys/values after t0 and in the other document: outputs up to t0 unchanged
  noise = jax.random.normal(jax.random.key(9), k.shape)
  after = (jnp.arange(seq) > t0)[None, :, None, None]
  out_a = fn(q, k, v)
  out_b = fn(q, jnp.where(after, k + noise, k), jnp.where(after, v - noise, v))
  np.testing.assert_array_equal(np.asarray(out_a[:, :t0 + 1]), np.asarray(out_b[:, :t0 + 1]))
  other_doc = (jnp.arange(seq) >= 96)[None, :, None, None]
  out_c = fn(q, jnp.where(other_doc, k + noise, k), jnp.where(other_doc, v + noise, v))
  np.testing.assert_array_equal(np.asarray(out_a[:, :96]), np.asarray(out_c[:, :96]))
  # Query 50 only: keys of blocks it did not choose get exactly zero gradient.
  dk = jax.grad(lambda k: fn(q, k, v)[0, 50].sum())(k)
  layout = moba_lib.doc_layout(seg, block)
  starts, valid = moba_lib.select_blocks(q, moba_lib.block_key_means(k, layout), layout,
                                         block_size=block, topk=2)
  for h in range(2):
    chosen = set(np.asarray(starts[0, 50, h])[np.asarray(valid[0, 50, h])].tolist())
    for b0 in range(0, 96, block):
      grad = np.abs(np.asarray(dk[0, b0:b0 + block, h])).max()
      assert (grad > 0) == (b0 in chosen and b0 <= 50), (h, b0, grad)


def test_chunked_routing_is_the_oracles_choice(monkeypatch):
  from moba_jax.kernels import _routing as rt
  monkeypatch.setattr(rt, "ROUTING_BYTES", 1 << 13)  # many chunks: shared and mixed paths
  q, k, _ = random_qkv(6, 2, 300, 4, 2, 16)
  seg = packed_segments(2, [150, 17, 133])
  for block, topk in ((16, 3), (32, 16), (8, 20)):
    layout = moba_lib.doc_layout(seg, block)
    want = moba_lib.select_blocks(q, moba_lib.block_key_means(k, layout), layout,
                                  block_size=block, topk=topk)
    got = rt.select_chunked(q, k, layout, block_size=block, topk=topk)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))


def test_bench_prints_a_table_on_cpu(capsys):
  from moba_jax import bench
  assert bench.main(["--seqs", "128", "--configs", "32:2", "--heads", "2", "--dim", "16",
                     "--impls", "xla,full_xla", "--repeats", "2", "--warmup", "1"]) == 0
  out = capsys.readouterr().out
  assert "f+b ms" in out and "full_xla" in out


def test_kv_head_chunking_keeps_results(monkeypatch):
  from moba_jax.kernels import _routing as rt
  monkeypatch.setattr(rt, "PARTIAL_BYTES", 1)  # one kv head per chunk
  q, k, v = random_qkv(8, 1, 96, 4, 2, 16)
  seg = packed_segments(1, [60, 36])
  cot = jax.random.normal(jax.random.key(2), q.shape)
  kw = dict(block_size=16, topk=3)
  want = vjp_all(lambda q, k, v: moba_lib.moba_reference(q, k, v, seg, **kw), q, k, v, cot)
  got = vjp_all(lambda q, k, v: run("pallas_gpu", q, k, v, seg, **kw), q, k, v, cot)
  assert rt.kv_head_chunks(q.shape, 2, 16, 3) == 2
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    assert rel_err(a, b) < 1e-4, name
