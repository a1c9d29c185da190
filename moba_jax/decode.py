"""Exact MoBA decoding with a KV cache: prefill a batch of prompts, then one token per row a step.

Shapes: B batch, T cache length (T_max), N block slots (= ceil(T / L)), L block_size, H query heads,
K kv heads, G = H // K, D head_dim, S chosen blocks (= min(topk, N)), P prompt length, E, V.

Batches: prompts are left-aligned, row b's prompt is tokens[b, :lengths[b]] and the rest of the row
is padding (never attended, never in a block's gate key). Every row is one document with its own
length; its next token goes to position lengths[b], which is also its RoPE position.

The cache is a pytree (`Cache`: per-row lengths and one `LayerCache` per layer) updated with
`.at[].set` / `dynamic_update_slice` only, so a jitted step that donates it updates it in place:
  k, v        [B, T, K, D]  keys (after RoPE) and values, compute dtype
  block_sums  [B, N, K, D]  float32 running sum of each block's keys (MoBA layers; None for full)
A block's key count follows from the row's length (`block_counts`), so its gate key sums / counts
is the mean over the keys the block really has at every length, the ragged last block included.

A decode step follows docs/semantics.md at the new position: each query head scores its kv group's
block means in float32 (`moba.select_blocks`, run in block units), the current block is always
chosen and future blocks never, ties go to the lower block, and attention (scale head_dim**-0.5)
reads only the chosen blocks' keys and values, gathered: O(topk * block_size) per head, whatever
the cache length. Full-attention layers attend the whole valid cache. Prefill runs each layer's
own attention implementation (the model's normal forward) over the prompts and fills the cache.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moba_jax import moba as moba_lib
from moba_jax import attention as attention_lib
from moba_jax.moba import HIGHEST


class LayerCache(NamedTuple):
  """One layer's cache. block_sums is None for full-attention layers."""

  k: jax.Array  # [B, T, K, D] keys after RoPE
  v: jax.Array  # [B, T, K, D]
  block_sums: jax.Array | None  # [B, N, K, D] float32


class Cache(NamedTuple):
  """The whole model's cache."""

  lengths: jax.Array  # [B] int32 tokens held per row = the position of the row's next token
  layers: tuple[LayerCache, ...]


def init_cache(model, batch: int, max_len: int) -> Cache:
  """An empty cache for `batch` rows of up to `max_len` tokens, rounded up to whole blocks of the
  MoBA layers (a decode kernel then reads every block in place; a ragged cache would be padded,
  a copy of the whole cache at every step)."""
  cfg = model.cfg
  blocks = [b.attn.moba.block_size for b in model.layers if b.attn.kind == "moba"]
  max_len = -(-max_len // math.lcm(*blocks)) * math.lcm(*blocks) if blocks else max_len
  shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
  layers = []
  for block in model.layers:
    attn = block.attn
    sums = None
    if attn.kind == "moba":
      n_blocks = math.ceil(max_len / attn.moba.block_size)
      sums = jnp.zeros((batch, n_blocks, *shape[2:]), jnp.float32)
    layers.append(LayerCache(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype), sums))
  return Cache(jnp.zeros((batch,), jnp.int32), tuple(layers))


def block_counts(lengths, n_blocks: int, block_size: int) -> jax.Array:
  """[B, N] float32: how many of a row's `lengths` tokens each block holds."""
  starts = jnp.arange(n_blocks, dtype=jnp.int32) * block_size
  return jnp.clip(lengths[:, None] - starts, 0, block_size).astype(jnp.float32)


# ----------------------------------------------------------------------------- cache updates


def block_key_sums(k, lengths, block_size: int) -> jax.Array:
  """Sums of the keys k [B, P, K, D] at positions < lengths, per block: float32 [B, ceil(P/L), K, D]
  (the same zero-padded reshape-sum as `moba.slot_means`)."""
  batch, seq, kv_heads, dim = k.shape
  n_blocks = math.ceil(seq / block_size)
  real = jnp.arange(seq)[None, :] < lengths[:, None]  # [B, P]
  k32 = jnp.where(real[..., None, None], k.astype(jnp.float32), 0.0)
  k32 = jnp.pad(k32, ((0, 0), (0, n_blocks * block_size - seq), (0, 0), (0, 0)))
  return k32.reshape(batch, n_blocks, block_size, kv_heads, dim).sum(axis=2)


def fill(cache: LayerCache, k, v, lengths, block_size: int) -> LayerCache:
  """The cache holding the prompts' keys and values k, v [B, P, K, D] (rows of `lengths`). Positions
  past a row's length hold zeros (the padding's keys and values are not kept), as everywhere
  else in a cache: a step writes only at each row's length."""
  real = (jnp.arange(k.shape[1])[None, :] < lengths[:, None])[..., None, None]  # [B, P, 1, 1]
  k, v = jnp.where(real, k, 0), jnp.where(real, v, 0)
  at0 = (0, 0, 0, 0)
  new_k = jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), at0)
  new_v = jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), at0)
  sums = cache.block_sums
  if sums is not None:
    sums = jax.lax.dynamic_update_slice(sums, block_key_sums(k, lengths, block_size), at0)
  return LayerCache(new_k, new_v, sums)


def append(cache: LayerCache, k, v, lengths, block_size: int) -> LayerCache:
  """The cache with one more token per row: k, v [B, K, D] at positions `lengths` [B]."""
  rows = jnp.arange(k.shape[0])
  sums = cache.block_sums
  if sums is not None:
    sums = sums.at[rows, lengths // block_size].add(k.astype(jnp.float32))
  return LayerCache(cache.k.at[rows, lengths].set(k.astype(cache.k.dtype)),
                    cache.v.at[rows, lengths].set(v.astype(cache.v.dtype)), sums)


# ----------------------------------------------------------------------------- attention


def choose_blocks(q, block_sums, n, *, block_size: int, topk: int):
  """The gate of each row's newest token (position n - 1). q [B, H, D]; block_sums [B, N, K, D];
  n [B] tokens held, the new one included.

  Returns blocks [B, H, S] int32 block indices (the current block first) and valid [B, H, S].
  `moba.select_blocks` runs in block units (block_size 1 over the N block means), so training and
  decoding share one gating rule.
  """
  n_blocks = block_sums.shape[1]
  means = block_sums / jnp.maximum(block_counts(n, n_blocks, block_size), 1.0)[..., None, None]
  current = ((n - 1) // block_size)[:, None]  # [B, 1]
  start = jnp.zeros_like(current)
  layout = moba_lib.Layout(doc_start=start, doc_end=current + 1, block_index=current,
                           block_start=current, block_end=current + 1)
  # every row is one document from position 0: slot j's gate key is block j's mean (no gather)
  blocks, valid = moba_lib.select_blocks(q[:, None], means, layout, block_size=1, topk=topk,
                                         slot_kbar=means[:, None])
  return blocks[:, 0], valid[:, 0]


def _masked_softmax(logits, keep):
  """Softmax over the last axis of float32 `logits`, entries not in `keep` given probability 0."""
  return jax.nn.softmax(jnp.where(keep, logits, -jnp.inf), axis=-1)


# Decode-step attention over the chosen blocks: "xla" gathers them; the Pallas kernels
# (kernels/moba_decode.py) read them in place. "auto" follows the training implementation's
# platform choice (attention.resolve), so one config string picks the kernels of both.
DECODE_IMPLS = ("auto", "xla", "pallas_gpu", "pallas_tpu")


# What each decode kernel's tiles need: the GPU kernel loads whole [block_k, head_dim] tiles (head
# dims that are powers of two); the TPU kernel's (block_size, head_dim) tiles of the [B, T, K * D]
# cache take Mosaic's (sublane, 128-lane) tiling (moba_tpu.tile_error: block_size a multiple of 8
# for float32 caches, 16 for bfloat16). Neither pads the cache (a copy of it at every step), so
# other shapes decode through the XLA step.
_WARNED: set = set()


def kernel_refusal(name: str, dim: int | None, block_size: int | None = None,
                   dtype=None) -> str | None:
  """Why decode kernel `name` cannot take head_dim `dim` / `block_size` / cache `dtype` (None:
  unknown, not checked), or None when it can."""
  if name == "pallas_gpu" and dim is not None and dim & (dim - 1):
    return f"head_dim={dim} (it takes powers of two)"
  if name == "pallas_tpu" and dim is not None:
    from moba_jax.kernels import moba_tpu

    dtype = jnp.float32 if dtype is None else dtype
    rows = moba_tpu.sublane_tile(dtype) if block_size is None else block_size
    err = moba_tpu.tile_error((rows, dim), None, dtype)
    if err:
      return f"head_dim={dim}, block_size={block_size}: {err}"
  return None


def resolve_decode(implementation: str = "auto", dim: int | None = None,
                   block_size: int | None = None, dtype=None) -> str:
  """The decode implementation that a name stands for: DECODE_IMPLS' names as they are, "auto" and
  the training implementations' names through `attention.resolve` (a Pallas kernel on its own
  platform, else "xla"). A kernel that cannot take the shape (`kernel_refusal`) falls back to
  "xla", with a warning when it was named explicitly."""
  name = implementation
  if implementation not in DECODE_IMPLS or implementation == "auto":
    name = attention_lib.resolve("moba", implementation)
    name = name if name in DECODE_IMPLS else "xla"
  why = kernel_refusal(name, dim, block_size, dtype)
  if why:
    if implementation != "auto" and (name, why) not in _WARNED:
      _WARNED.add((name, why))
      warnings.warn(f"decode implementation {name!r} cannot take {why}; decoding through the "
                    "XLA step instead", RuntimeWarning, stacklevel=2)
    return "xla"
  return name


def moba_step_attention(q, cache: LayerCache, n, *, block_size: int, topk: int, scale=None,
                        implementation: str = "xla", options=None):
  """MoBA attention of each row's newest token over its chosen blocks only. q [B, H, D];
  n [B] tokens held (the new one included) -> [B, H, D] in q's dtype. Only the chosen blocks'
  positions < n are read (others are zeroed before use, whatever they hold). implementation:
  one of DECODE_IMPLS or a MoBA training implementation name (see `resolve_decode`); options: a
  KernelOptions (its `interpret` runs the Pallas kernels on the CPU)."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  blocks, valid = choose_blocks(q, cache.block_sums, n, block_size=block_size, topk=topk)
  name = resolve_decode(implementation, q.shape[-1], block_size, cache.k.dtype)
  if name == "xla":
    return _gathered_attention(q, cache, n, blocks, valid, block_size=block_size, scale=scale)
  from moba_jax.kernels import moba_decode

  fn = {"pallas_gpu": moba_decode.decode_attention_gpu,
        "pallas_tpu": moba_decode.decode_attention_tpu}[name]
  return fn(q, cache.k, cache.v, blocks, valid, n, block_size=block_size, scale=scale,
            interpret=bool(options and options.interpret))


def _gathered_attention(q, cache: LayerCache, n, blocks, valid, *, block_size: int, scale):
  """The XLA step: the chosen blocks' keys and values gathered [B, H, S * L, D], then attended."""
  batch, heads, dim = q.shape
  seq, kv_heads = cache.k.shape[1], cache.k.shape[2]
  pos = blocks[..., None] * block_size + jnp.arange(block_size, dtype=jnp.int32)  # [B, H, S, L]
  keep = (valid[..., None] & (pos < n[:, None, None, None])).reshape(batch, heads, -1)
  pos = jnp.clip(pos, 0, seq - 1).reshape(batch, heads, -1)  # [B, H, S * L]
  kv_head = (jnp.arange(heads) // (heads // kv_heads))[:, None]  # [H, 1]

  def gather(x):  # [B, T, K, D] -> [B, H, S * L, D], float32, zero where not kept
    x = jax.vmap(lambda x_row, pos_row: x_row[pos_row, kv_head])(x, pos)
    return jnp.where(keep[..., None], x.astype(jnp.float32), 0.0)

  logits = jnp.einsum("bhd,bhmd->bhm", q.astype(jnp.float32), gather(cache.k),
                      precision=HIGHEST) * scale
  out = jnp.einsum("bhm,bhmd->bhd", _masked_softmax(logits, keep), gather(cache.v),
                   precision=HIGHEST)
  return out.astype(q.dtype)


def full_step_attention(q, cache: LayerCache, n, *, scale=None):
  """Causal full attention of each row's newest token over the row's n [B] cached tokens.
  q [B, H, D] -> [B, H, D] in q's dtype. Reads the cache once in its own dtype (products in float32:
  exact for bfloat16 operands); logits at positions >= n are masked. Those positions hold zeros
  (`init_cache`, `fill`; a step writes only at each row's length), so their values meet
  probability 0 and add nothing."""
  batch, heads, dim = q.shape
  seq, kv_heads = cache.k.shape[1], cache.k.shape[2]
  scale = dim ** -0.5 if scale is None else scale
  keep = jnp.arange(seq)[None, :] < n[:, None]  # [B, T]
  q_g = q.astype(cache.k.dtype).reshape(batch, kv_heads, heads // kv_heads, dim)  # [B, K, G, D]
  logits = jnp.einsum("bkgd,btkd->bkgt", q_g, cache.k, precision=HIGHEST,
                      preferred_element_type=jnp.float32) * scale  # [B, K, G, T]
  probs = _masked_softmax(logits, keep[:, None, None, :])
  out = jnp.einsum("bkgt,btkd->bkgd", probs.astype(cache.v.dtype), cache.v, precision=HIGHEST,
                   preferred_element_type=jnp.float32)
  return out.reshape(batch, heads, dim).astype(q.dtype)


def step_attention(attn, q, cache: LayerCache, n):
  """The decode-step attention of a model layer `attn` (its kind and MoBA settings)."""
  if attn.kind == "moba":
    return moba_step_attention(q, cache, n, block_size=attn.moba.block_size, topk=attn.moba.topk,
                               implementation=attn.moba.implementation,
                               options=attention_lib.KernelOptions(attn.moba.interpret))
  return full_step_attention(q, cache, n)


# ----------------------------------------------------------------------------- the model


def _run_layers(model, x, caches, positions, mix: Callable):
  """Every block over x [B, T, E], each attention being mix(attn, q, k, v, cache) -> (out
  [B, T, H, D], the layer's new cache). Returns (x, the new caches)."""
  new = []
  for block, cache in zip(model.layers, caches):
    def mixer(h, attn=block.attn, cache=cache):
      q, k, v = attn.project(h, positions)
      out, updated = mix(attn, q, k, v, cache)
      new.append(updated)
      return attn.output(out)
    x = block.around(x, mixer)
  return x, tuple(new)


def prefill(model, tokens, lengths, max_len: int):
  """Runs the model over left-aligned prompts tokens [B, P] (row b's first lengths[b] >= 1 are real)
  and returns (logits [B, P, V] float32, the Cache of max_len tokens holding the prompts).
  Logits at positions >= lengths[b] are padding's and mean nothing."""
  batch, seq = tokens.shape
  if seq > max_len:
    raise ValueError(f"prompts of {seq} tokens do not fit a cache of max_len={max_len}")
  lengths = jnp.asarray(lengths, jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
  segment_ids = jnp.zeros((batch, seq), jnp.int32)  # padding comes after: causality hides it

  def mix(attn, q, k, v, cache):
    return (attn.attend(q, k, v, segment_ids),
            fill(cache, k, v, lengths, attn.moba.block_size))

  empty = init_cache(model, batch, max_len).layers
  x, layers = _run_layers(model, model.embed_tokens(tokens), empty, positions, mix)
  return model.logits(x), Cache(lengths, layers)


def decode_step(model, cache: Cache, tokens):
  """Feeds each row's next token tokens [B] at position cache.lengths -> (logits [B, V] float32
  for that position, the cache one token longer). A row whose cache is full may still be fed (its
  writes are dropped: JAX scatters drop out-of-bounds updates), but its logits mean nothing."""
  positions = cache.lengths[:, None]  # [B, 1]
  n = cache.lengths + 1

  def mix(attn, q, k, v, layer_cache):
    layer_cache = append(layer_cache, k[:, 0], v[:, 0], cache.lengths, attn.moba.block_size)
    return step_attention(attn, q[:, 0], layer_cache, n)[:, None], layer_cache

  x, layers = _run_layers(model, model.embed_tokens(tokens[:, None]), cache.layers, positions, mix)
  return model.logits(x)[:, 0], Cache(n, layers)


class Decoding(NamedTuple):
  """Jitted prefill and decode step of one model (split once: each call passes arrays only)."""

  prefill: Callable  # (tokens [B, P], lengths [B]) -> (logits [B, P, V], Cache)
  step: Callable  # (Cache, tokens [B]) -> (logits [B, V], Cache); the cache argument is donated


def jit_decoding(model, max_len: int) -> Decoding:
  """`prefill` and `decode_step` of `model` compiled, with caches of max_len tokens."""
  graphdef, state = nnx.split(model)
  prefill_fn = jax.jit(lambda s, tokens, lengths: prefill(nnx.merge(graphdef, s), tokens, lengths,
                                                          max_len))
  step_fn = jax.jit(lambda s, cache, tokens: decode_step(nnx.merge(graphdef, s), cache, tokens),
                    donate_argnums=1)
  return Decoding(lambda tokens, lengths: prefill_fn(state, tokens, lengths),
                  lambda cache, tokens: step_fn(state, cache, tokens))


@jax.jit
def sample(logits, key, temperature):
  """Next tokens [B] from logits [B, V]: argmax at temperature 0, else a softmax sample."""
  greedy = jnp.argmax(logits, axis=-1)
  drawn = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-30), axis=-1)
  return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


def stream(decoding: Decoding, tokens, lengths, steps: int, *, temperature: float = 0.0,
           seed: int = 0) -> Iterator[jax.Array]:
  """Yields `steps` arrays of next tokens [B], one per step, after prefilling left-aligned prompts
  tokens [B, P] of `lengths`; token i of row b sits at position lengths[b] + i, so a row's tokens
  past max_len - lengths[b] + 1 mean nothing. The caller may stop early (close the generator)."""
  logits, cache = decoding.prefill(tokens, lengths)
  lengths = jnp.asarray(lengths, jnp.int32)
  last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # [B, V]
  key, temperature = jax.random.key(seed), jnp.float32(temperature)
  for i in range(steps):
    key, sub = jax.random.split(key)
    nxt = sample(last, sub, temperature)
    yield nxt
    if i + 1 < steps:
      last, cache = decoding.step(cache, nxt)
