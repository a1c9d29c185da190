"""Flax NNX decoder whose attention is full or MoBA per layer, with one parameter tree for both.

Embeddings -> n_layers x [RMSNorm -> GQA attention (RoPE) -> RMSNorm -> SwiGLU] -> RMSNorm -> head.
The attention kind of each layer is static data (`config.layer_kinds`): switching it (for example
from pretraining to SFT) changes no parameter, only which attention function a layer calls.
Every parameter carries logical axis names; `moba_jax.sharding` maps them to the mesh.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from moba_jax import moba as moba_lib
from moba_jax.attention import KernelOptions, attention
from moba_jax.config import MobaConfig, ModelConfig, layer_kinds
from moba_jax.sharding import shard

_fan_in = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
# [embed, heads, head_dim] projections: fan-in is embed.
_qkv_init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0,
                                              out_axis=(1, 2))


def _param(rngs, shape, axes, init=_fan_in, dtype=jnp.float32):
  """A parameter annotated with logical axes; sharded at creation only when a mesh is set."""
  value = init(rngs.params(), shape, dtype)
  eager = not jax.sharding.get_abstract_mesh().empty
  return nnx.Param(value, out_sharding=axes, eager_sharding=eager)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, param_dtype, *, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = _param(rngs, (dim,), ("norm",), init=nnx.initializers.ones, dtype=param_dtype)

  def __call__(self, x):  # x [..., E]
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope(x, positions, theta: float, inv_freq=None):
  """Rotary embedding (half-split layout). x [B, T, H, D]; positions [B, T] restart per document.
  inv_freq [D/2]: the frequencies (rope_frequencies); None = unscaled ones of `theta`."""
  dim = x.shape[-1]
  freqs = theta ** (-jnp.arange(0, dim // 2, dtype=jnp.float32) * 2.0 / dim)  # [D/2]
  freqs = freqs if inv_freq is None else inv_freq
  angles = positions[..., None].astype(jnp.float32) * freqs  # [B, T, D/2]
  sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def rope_frequencies(cfg: ModelConfig):
  """RoPE's frequencies [D/2] (float32) under model.rope_scaling, as Hugging Face computes them;
  None when unscaled (rope's own)."""
  if cfg.rope_scaling == "none":
    return None
  d = cfg.head_dim
  freqs = cfg.rope_theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)  # [D/2]
  if cfg.rope_scaling == "linear":
    return freqs / cfg.rope_factor
  n, f = cfg.rope_original_max_len, cfg.rope_factor  # llama3
  lo, hi = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  wavelen = 2 * math.pi / freqs
  smooth = (n / wavelen - lo) / (hi - lo)
  ramp = (1 - smooth) * freqs / f + smooth * freqs
  return jnp.where(wavelen > n / lo, freqs / f, jnp.where(wavelen < n / hi, freqs, ramp))


class Attention(nnx.Module):
  """GQA attention; `kind` ("full" | "moba") and the MoBA settings are static attributes."""

  def __init__(self, cfg: ModelConfig, kind: str, moba: MobaConfig, *, rngs: nnx.Rngs):
    pd = jnp.dtype(cfg.param_dtype)
    e, h, k, d = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    self.cfg, self.kind, self.moba = cfg, kind, moba
    self.wq = _param(rngs, (e, h, d), ("embed", "heads", "head_dim"), init=_qkv_init,
                     dtype=pd)
    self.wk = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), init=_qkv_init,
                     dtype=pd)
    self.wv = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), init=_qkv_init,
                     dtype=pd)
    out_init = nnx.initializers.variance_scaling(
        1.0 / (2 * cfg.n_layers), "fan_in", "truncated_normal", in_axis=(0, 1), out_axis=2)
    self.wo = _param(rngs, (h, d, e), ("heads", "head_dim", "embed"), init=out_init, dtype=pd)
    if cfg.qkv_bias:
      zeros = nnx.initializers.zeros
      self.bq = _param(rngs, (h, d), ("heads", "head_dim"), init=zeros, dtype=pd)
      self.bk = _param(rngs, (k, d), ("kv_heads", "head_dim"), init=zeros, dtype=pd)
      self.bv = _param(rngs, (k, d), ("kv_heads", "head_dim"), init=zeros, dtype=pd)

  def __call__(self, x, positions, segment_ids):  # x [B, T, E]
    q, k, v = self.project(x, positions)
    return self.output(self.attend(q, k, v, segment_ids))

  def project(self, x, positions):
    """x [B, T, E] -> q [B, T, H, D], k [B, T, K, D] (both after RoPE), v [B, T, K, D]: the
    tensors a KV cache keeps (moba_jax.decode)."""
    dt = x.dtype
    q = jnp.einsum("bte,ehd->bthd", x, self.wq[...].astype(dt))  # [B, T, H, D]
    k = jnp.einsum("bte,ekd->btkd", x, self.wk[...].astype(dt))  # [B, T, K, D]
    v = jnp.einsum("bte,ekd->btkd", x, self.wv[...].astype(dt))  # [B, T, K, D]
    if self.cfg.qkv_bias:
      # [B, T, H|K, D] + [H|K, D]
      q, k, v = (t + b[...].astype(dt) for t, b in ((q, self.bq), (k, self.bk), (v, self.bv)))
    freqs, theta = rope_frequencies(self.cfg), self.cfg.rope_theta
    q = shard(rope(q, positions, theta, freqs), ("batch", "length", "heads", "head_dim"))
    k = shard(rope(k, positions, theta, freqs), ("batch", "length", "kv_heads", "head_dim"))
    return q, k, v

  def attend(self, q, k, v, segment_ids):
    """The layer's attention (its kind and implementation) -> [B, T, H, D]."""
    if self.kind == "moba":
      return attention(q, k, v, kind="moba", implementation=self.moba.implementation,
                       segment_ids=segment_ids, block_size=self.moba.block_size,
                       topk=self.moba.topk,
                       options=KernelOptions(self.moba.interpret, self.moba.tiles))
    # moba.tiles are the MoBA kernel's; the full kernel takes its own defaults
    return attention(q, k, v, kind="full", implementation=self.moba.full_implementation,
                     segment_ids=segment_ids, options=KernelOptions(self.moba.interpret))

  def output(self, out):
    """Attention output [B, T, H, D] -> [B, T, E]."""
    out = shard(out, ("batch", "length", "heads", "head_dim"))
    return jnp.einsum("bthd,hde->bte", out, self.wo[...].astype(out.dtype))  # [B, T, E]


class SwiGLU(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pd = jnp.dtype(cfg.param_dtype)
    e, m = cfg.d_model, cfg.mlp_dim
    self.w_gate = _param(rngs, (e, m), ("embed", "mlp"), dtype=pd)
    self.w_up = _param(rngs, (e, m), ("embed", "mlp"), dtype=pd)
    out_init = nnx.initializers.variance_scaling(1.0 / (2 * cfg.n_layers), "fan_in",
                                                 "truncated_normal")
    self.w_down = _param(rngs, (m, e), ("mlp", "embed"), init=out_init, dtype=pd)

  def __call__(self, x):  # x [B, T, E]
    dt = x.dtype
    gate = jnp.einsum("bte,em->btm", x, self.w_gate[...].astype(dt))  # [B, T, M]
    up = jnp.einsum("bte,em->btm", x, self.w_up[...].astype(dt))  # [B, T, M]
    hidden = shard(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
    return jnp.einsum("btm,me->bte", hidden, self.w_down[...].astype(dt))  # [B, T, E]


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, kind: str, moba: MobaConfig, *, rngs: nnx.Rngs):
    pd = jnp.dtype(cfg.param_dtype)
    self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd, rngs=rngs)
    self.attn = Attention(cfg, kind, moba, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd, rngs=rngs)
    self.mlp = SwiGLU(cfg, rngs=rngs)

  def __call__(self, x, positions, segment_ids):
    return self.around(x, lambda h: self.attn(h, positions, segment_ids))

  def around(self, x, mixer):
    """The block around a token mixer [B, T, E] -> [B, T, E]: x + mixer(attn_norm(x)), then the
    MLP residual. The decoder's mixer is its attention; moba_jax.decode passes a cached one."""
    x = x + mixer(self.attn_norm(x))
    x = x + self.mlp(self.mlp_norm(x))
    return shard(x, ("batch", "length", "embed"))


class Decoder(nnx.Module):
  """tokens [B, T] -> logits [B, T, V] (float32)."""

  def __init__(self, cfg: ModelConfig, moba: MobaConfig, *, rngs: nnx.Rngs):
    pd = jnp.dtype(cfg.param_dtype)
    self.cfg = cfg
    self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"),
                        init=nnx.initializers.normal(1.0), dtype=pd)
    kinds = layer_kinds(cfg.n_layers, moba.hybrid_full_layers)
    self.layers = nnx.List([Block(cfg, kind, moba, rngs=rngs) for kind in kinds])
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pd, rngs=rngs)
    if not cfg.tie_embeddings:
      self.head = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), dtype=pd)

  @property
  def layer_kinds(self) -> tuple[str, ...]:
    return tuple(layer.attn.kind for layer in self.layers)

  def __call__(self, tokens, *, segment_ids=None, positions=None):
    if positions is None:  # segment_ids None (one document per row) stays None: see `attention`
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
      if segment_ids is not None:
        positions = positions - moba_lib.doc_layout(segment_ids, 1).doc_start
    x = self.embed_tokens(tokens)
    apply = lambda block, x: block(x, positions, segment_ids)
    if self.cfg.remat:
      apply = nnx.remat(apply)
    for layer in self.layers:
      x = apply(layer, x)
    return self.logits(x)

  def embed_tokens(self, tokens):
    """tokens [B, T] -> embeddings [B, T, E] in the compute dtype. The table is gathered whole
    along embed first (it is split over fsdp/context as a parameter): the rows then land where
    the tokens are, with no full-array reshuffle of the [B, T, E] result."""
    table = shard(self.embed[...], ("vocab", None))  # [V, E]
    x = jnp.take(table, tokens, axis=0).astype(jnp.dtype(self.cfg.dtype))  # [B, T, E]
    return shard(x, ("batch", "length", "embed"))

  def logits(self, x):
    """Last layer's output [B, T, E] -> logits [B, T, V] (float32): final norm, then the head."""
    dt = jnp.dtype(self.cfg.dtype)
    x = self.final_norm(x)
    if self.cfg.tie_embeddings:  # unit-variance embeddings: scale so logits start O(1)
      head = self.embed[...].T
      if self.cfg.tied_head_scale == "rsqrt_d_model":
        head = head * self.cfg.d_model ** -0.5
    else:
      head = self.head[...]
    logits = jnp.einsum("bte,ev->btv", x, head.astype(dt), preferred_element_type=jnp.float32)
    return shard(logits, ("batch", "length", "vocab"))  # [B, T, V]


def set_attention(model: Decoder, moba: MobaConfig) -> Decoder:
  """Switches every layer's attention kind and MoBA settings in place; parameters are untouched."""
  kinds = layer_kinds(len(model.layers), moba.hybrid_full_layers)
  for layer, kind in zip(model.layers, kinds):
    layer.attn.kind = kind
    layer.attn.moba = moba
  return model
