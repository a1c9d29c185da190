"""The decoder: one parameter tree for every attention setting, hybrid layer placement, oracles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moba_jax import model as model_lib
from moba_jax.config import MobaConfig, ModelConfig, layer_kinds
from moba_jax.model import Decoder, set_attention

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8,
                  mlp_dim=64)
LOGICAL_AXES = {"vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "norm"}


@pytest.fixture(autouse=True)
def exact_float32_products():
  """Both sides of every float32 comparison in true float32: on a GPU the model's projections
  default to TF32 (10-bit mantissas), whose rounding turns the 1e-7 differences between two equal
  attentions into 1e-3 differences downstream (seen compiled on the H200, 2026-12-02)."""
  with jax.default_matmul_precision("highest"):
    yield


# One compile per model setting: eager dispatch compiles each op of the forward separately.
forward = nnx.jit(lambda model, x, segment_ids=None: model(x, segment_ids=segment_ids))


def tokens(seed=0, batch=2, seq=48):
  return jax.random.randint(jax.random.key(seed), (batch, seq), 0, CFG.vocab_size)


def params_of(model):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_layer_kinds_put_full_attention_last():
  assert layer_kinds(12, 0) == ("moba",) * 12
  assert layer_kinds(12, 3) == ("moba",) * 9 + ("full",) * 3
  assert layer_kinds(12, "all") == ("full",) * 12
  assert layer_kinds(12, 12) == ("full",) * 12
  with pytest.raises(ValueError, match="hybrid_full_layers=13 must be in"):
    layer_kinds(12, 13)
  with pytest.raises(ValueError, match="hybrid_full_layers=-1"):
    MobaConfig(hybrid_full_layers=-1)


def test_one_parameter_tree_runs_under_every_setting():
  model = Decoder(CFG, MobaConfig(block_size=8, topk=2), rngs=nnx.Rngs(0))
  before = params_of(model)
  x = tokens()
  outs = {}
  for hfl in (0, 1, 3, "all"):
    set_attention(model, MobaConfig(block_size=8, topk=2, hybrid_full_layers=hfl))
    assert model.layer_kinds == layer_kinds(4, hfl)
    outs[hfl] = np.asarray(forward(model, x))
    assert np.isfinite(outs[hfl]).all()
    jax.tree.map(np.testing.assert_array_equal, before, params_of(model))
  fresh = Decoder(CFG, MobaConfig(block_size=8, topk=2, hybrid_full_layers=3), rngs=nnx.Rngs(0))
  jax.tree.map(np.testing.assert_array_equal, before, params_of(fresh))
  np.testing.assert_allclose(np.asarray(forward(fresh, x)), outs[3], rtol=1e-5, atol=1e-5)
  assert not np.allclose(outs[0], outs["all"], atol=1e-3)  # MoBA really drops context here


def llama_rope(x, theta):
  """Hugging Face Llama's rotary embedding, written out: x [B, T, H, D] at positions 0..T-1,
  x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1] (the half-split layout) and
  inv_freq[i] = theta ** (-2i / D)."""
  d = x.shape[-1]
  inv_freq = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)  # [D/2]
  angles = np.arange(x.shape[1])[:, None] * inv_freq  # [T, D/2]
  emb = np.concatenate([angles, angles], axis=-1)[None, :, None, :]  # [1, T, 1, D]
  cos, sin = jnp.asarray(np.cos(emb), jnp.float32), jnp.asarray(np.sin(emb), jnp.float32)
  rotate_half = jnp.concatenate([-x[..., d // 2:], x[..., :d // 2]], axis=-1)
  return x * cos + rotate_half * sin


def plain_full_attention_forward(p, cfg, tok):
  """An independent causal transformer forward over the same parameters (the oracle; RoPE
  included, nothing from moba_jax.model)."""
  def norm(x, scale):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * scale

  x = p["embed"][tok]
  for layer in p["layers"].values():
    a = layer["attn"]
    h = norm(x, layer["attn_norm"]["scale"])
    q = llama_rope(jnp.einsum("bte,ehd->bthd", h, a["wq"]), cfg.rope_theta)
    k = llama_rope(jnp.einsum("bte,ehd->bthd", h, a["wk"]), cfg.rope_theta)
    v = jnp.einsum("bte,ehd->bthd", h, a["wv"])
    o = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    x = x + jnp.einsum("bthd,hde->bte", o, a["wo"])
    m = layer["mlp"]
    h = norm(x, layer["mlp_norm"]["scale"])
    x = x + (jax.nn.silu(h @ m["w_gate"]) * (h @ m["w_up"])) @ m["w_down"]
  return norm(x, p["final_norm"]["scale"]) @ p["head"]


def test_all_full_equals_a_plain_full_attention_model():
  model = Decoder(CFG, MobaConfig(block_size=8, topk=2, hybrid_full_layers="all"),
                  rngs=nnx.Rngs(1))
  x = tokens(1)
  expected = plain_full_attention_forward(
      jax.tree.map(jnp.asarray, params_of(model)), CFG, x)
  np.testing.assert_allclose(np.asarray(forward(model, x)), np.asarray(expected), rtol=2e-5, atol=2e-5)


def test_all_moba_equals_full_when_sequence_fits_in_topk_blocks():
  model = Decoder(CFG, MobaConfig(block_size=16, topk=3), rngs=nnx.Rngs(2))
  x = tokens(2, seq=48)
  moba_out = forward(model, x)
  set_attention(model, MobaConfig(block_size=16, topk=3, hybrid_full_layers="all"))
  np.testing.assert_allclose(np.asarray(moba_out), np.asarray(forward(model, x)), rtol=1e-5, atol=1e-5)


def test_packed_document_is_independent_and_positions_restart(monkeypatch):
  """Each document of a packed row (segment_ids, no positions) gives the logits it gives alone,
  and the RoPE positions that reach every layer's q and k restart at 0 at each document (seen
  by a spy on `rope`: RoPE is relative, so the logits alone cannot tell 0..55 from 0..29,0..25)."""
  model = Decoder(CFG, MobaConfig(block_size=8, topk=2, hybrid_full_layers=1), rngs=nnx.Rngs(3))
  doc_a, doc_b = tokens(4, 1, 30), tokens(5, 1, 26)
  packed = jnp.concatenate([doc_a, doc_b], axis=1)
  seg = jnp.concatenate([jnp.zeros((1, 30), jnp.int32), jnp.ones((1, 26), jnp.int32)], axis=1)
  seen, real_rope = [], model_lib.rope

  def spy(x, positions, *args, **kwargs):
    seen.append(positions)
    return real_rope(x, positions, *args, **kwargs)
  monkeypatch.setattr(model_lib, "rope", spy)
  # a jit of its own (traced here, with the spy): the positions come out beside the logits
  out, positions = nnx.jit(lambda m, x, s: (m(x, segment_ids=s), jnp.stack(seen)))(
      model, packed, seg)
  assert positions.shape == (2 * CFG.n_layers, 1, 56)  # q and k of every layer
  expected = np.concatenate([np.arange(30), np.arange(26)])
  for p in np.asarray(positions):
    np.testing.assert_array_equal(p[0], expected)
  monkeypatch.undo()
  np.testing.assert_allclose(np.asarray(out[:, 30:]), np.asarray(forward(model, doc_b)), atol=2e-5)
  np.testing.assert_allclose(np.asarray(out[:, :30]), np.asarray(forward(model, doc_a)), atol=2e-5)


def test_every_parameter_has_logical_axis_names():
  model = Decoder(CFG, MobaConfig(), rngs=nnx.Rngs(0))
  params = jax.tree.leaves(nnx.state(model, nnx.Param),
                           is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert len(params) == 3 + 9 * CFG.n_layers  # embed, final norm, head; 9 per layer
  for var in params:
    names = var.get_metadata()["out_sharding"]
    assert len(names) == var[...].ndim and set(names) <= LOGICAL_AXES, names


def dot_generals(jaxpr) -> list:
  """Every dot_general equation of jaxpr and of the jaxprs in its equations' params."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      found.append(eqn)
    subs = list(eqn.params.values())
    while subs:
      x = subs.pop()
      if isinstance(x, (tuple, list)):
        subs.extend(x)
      elif hasattr(x, "eqns"):
        found += dot_generals(x)
      elif hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns"):
        found += dot_generals(x.jaxpr)
  return found


def test_bfloat16_compute_with_float32_params():
  """model.dtype=bfloat16: the parameters stay float32, every matmul with a weight (q, k, v, o,
  the SwiGLU's three, the head) multiplies bfloat16 operands (read from the forward's jaxpr),
  and the logits come out float32."""
  cfg = ModelConfig(**{**CFG.__dict__, "dtype": "bfloat16"})
  model = Decoder(cfg, MobaConfig(block_size=8, topk=2, hybrid_full_layers=2), rngs=nnx.Rngs(0))
  out = forward(model, tokens())
  assert out.dtype == jnp.float32 and np.isfinite(np.asarray(out)).all()
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  assert all(x.dtype == jnp.float32 for x in params)
  graphdef, state = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens()).jaxpr
  weight_shapes = {x.shape for x in params if x.ndim >= 2}
  with_weight = [e for e in dot_generals(jaxpr) if e.invars[1].aval.shape in weight_shapes]
  assert len(with_weight) == 7 * cfg.n_layers + 1
  assert all(v.aval.dtype == jnp.bfloat16 for e in with_weight for v in e.invars), [
      [v.aval.dtype for v in e.invars] for e in with_weight]
  assert with_weight[-1].outvars[0].aval.dtype == jnp.float32  # the head's logits
