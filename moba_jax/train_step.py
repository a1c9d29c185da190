"""Train state, optimizer, loss and the jit'ed train / eval steps (sharded, donated).

The state crossing the jit boundary is two nnx.State trees, `params` and `opt_state`, laid out by
shardings derived from each parameter's logical axis names (moba_jax.sharding). Inside the step they
are merged back into the Decoder and its nnx.Optimizer. A step whose loss or gradient norm is not
finite returns the incoming params and optimizer state unchanged (and says so in its metrics).
With `train.deterministic` on a GPU the steps are compiled with XLA's deterministic ops
(`compile_options`).
"""

from __future__ import annotations

import dataclasses
import functools
import types
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moba_jax import sharding as shd
from moba_jax.config import Config
from moba_jax.model import Decoder


def lr_schedule(tc) -> optax.Schedule:
  """Warmup from 0 to lr over warmup_steps, then cosine/linear/constant to lr * min_lr_ratio."""
  total, peak = tc.total_schedule_steps, tc.lr
  warm = min(tc.warmup_steps, total)
  end = peak * tc.min_lr_ratio
  decay = max(total - warm, 1)
  if tc.schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, decay, alpha=tc.min_lr_ratio)
  elif tc.schedule == "linear":
    after = optax.linear_schedule(peak, end, decay)
  else:
    after = optax.constant_schedule(peak)
  if warm == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warm), after], [warm])


_TX_FIELDS = ("steps", "lr", "warmup_steps", "schedule", "schedule_steps", "min_lr_ratio",
              "weight_decay", "b1", "b2", "grad_clip")


def make_tx(tc) -> optax.GradientTransformation:
  """AdamW (decay on matrices only) after global-norm clipping. One object per distinct setting, so
  runs that differ only in seed or data share optimizer graph definitions and compiled steps."""
  return _make_tx(tuple(getattr(tc, f) for f in _TX_FIELDS))


@functools.lru_cache(maxsize=64)
def _make_tx(key) -> optax.GradientTransformation:
  tc = types.SimpleNamespace(**dict(zip(_TX_FIELDS, key)))
  tc.total_schedule_steps = tc.schedule_steps or tc.steps
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  adamw = optax.adamw(lr_schedule(tc), b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay,
                      mask=decay_mask)
  return optax.chain(optax.clip_by_global_norm(tc.grad_clip), adamw) if tc.grad_clip else adamw


# XLA's GPU scatter-adds (the embedding's gradient, the xla attention path's gathers) add with
# atomics whose order changes from call to call; this option makes XLA use ordered ones. The CPU
# and TPU compilers run scatters in one order already.
DETERMINISTIC_GPU = {"xla_gpu_deterministic_ops": True}


def compile_options(deterministic: bool, platform: str) -> tuple:
  """The (name, value) XLA compile options of the train and eval steps on `platform`."""
  return tuple(DETERMINISTIC_GPU.items()) if deterministic and platform == "gpu" else ()


# Compiled functions are reused by later runs in the same process (a grid) with the same model
# graph, optimizer setting, mesh and rules: the key determines every sharding.
_JIT_CACHE: dict = {}


@dataclasses.dataclass
class TrainState:
  """Host-side handles: static graph definitions and the sharded state (nnx.State trees)."""

  model_def: Any
  opt_def: Any
  params: nnx.State
  opt_state: nnx.State
  param_shardings: nnx.State
  opt_shardings: nnx.State
  mesh: jax.sharding.Mesh
  rules: tuple
  compile_options: tuple = ()  # the steps' XLA options (name, value), see compile_options()


def _build(cfg: Config, key):
  model = Decoder(cfg.model, cfg.moba, rngs=nnx.Rngs(key))
  return model, nnx.Optimizer(model, make_tx(cfg.train), wrt=nnx.Param)


def abstract_state(cfg: Config, mesh, rules) -> TrainState:
  """The TrainState with shape/dtype-only params and optimizer state (nothing allocated): what
  `moba-jax plan` lowers the train step with."""
  key = jax.random.key(cfg.train.seed)
  with nnx.use_eager_sharding(False):
    abs_model, abs_opt = nnx.eval_shape(lambda: _build(cfg, key))
  model_def, abs_params = nnx.split(abs_model, nnx.Param)
  opt_def, abs_opt_state = nnx.split(abs_opt)
  p_sh = shd.state_shardings(abs_params, mesh, rules)
  o_sh = shd.state_shardings(abs_opt_state, mesh, rules)
  options = compile_options(cfg.train.deterministic, mesh.devices.flat[0].platform)
  return TrainState(model_def, opt_def, abs_params, abs_opt_state, p_sh, o_sh, mesh, rules,
                    options)


def init_state(cfg: Config, mesh, rules) -> TrainState:
  """Initialises params and optimizer state directly into their shardings (one jit, reused by
  later runs of the same model, optimizer setting and mesh; the seed is an argument)."""
  key = jax.random.key(cfg.train.seed)
  abstract = abstract_state(cfg, mesh, rules)
  model_def, opt_def = abstract.model_def, abstract.opt_def
  p_sh, o_sh = abstract.param_shardings, abstract.opt_shardings

  def init(key):
    with nnx.use_eager_sharding(False):
      model, opt = _build(cfg, key)
    return nnx.state(model, nnx.Param), nnx.state(opt)

  cache_key = ("init", model_def, opt_def, mesh, rules)
  if cache_key not in _JIT_CACHE:
    _JIT_CACHE[cache_key] = jax.jit(init, out_shardings=(p_sh, o_sh))
  params, opt_state = _JIT_CACHE[cache_key](key)
  return dataclasses.replace(abstract, params=params, opt_state=opt_state)


def masked_nll(logits, targets, mask):
  """Per-token negative log-likelihood [B, T] (float32) and the mask as float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, T, V]
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, T]
  return nll, mask.astype(jnp.float32)


def _forward(model, batch):
  logits = model(batch["inputs"], segment_ids=batch["segment_ids"], positions=batch["positions"])
  return masked_nll(logits, batch["targets"], batch["mask"])


def loss_fn(model, batch):
  nll, w = _forward(model, batch)
  tokens = jnp.sum(w)
  return jnp.sum(nll * w) / jnp.maximum(tokens, 1.0), tokens


def _tree_norm(tree):
  norm = getattr(getattr(optax, "tree", None), "norm", None)  # optax >= 0.2.5
  return norm(tree) if norm else optax.global_norm(tree)


def _keep_if(finite, new, old_leaves):
  """new where finite, else the old leaves (same tree layout)."""
  leaves, treedef = jax.tree.flatten(new)
  kept = [jnp.where(finite, n, o) for n, o in zip(leaves, old_leaves)]
  return jax.tree.unflatten(treedef, kept)


def _train_step(model_def, opt_def, params, opt_state, batch):
  # The update mutates the merged Variables in place: keep the incoming arrays aside first.
  old_params, old_opt = jax.tree.leaves(params), jax.tree.leaves(opt_state)
  model = nnx.merge(model_def, params)
  opt = nnx.merge(opt_def, opt_state)
  (loss, tokens), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)
  grad_norm = _tree_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  opt.update(model, grads)
  new_params = _keep_if(finite, nnx.state(model, nnx.Param), old_params)
  new_opt = _keep_if(finite, nnx.state(opt), old_opt)
  metrics = {"loss": loss, "grad_norm": grad_norm, "tokens": tokens,
             "finite": finite.astype(jnp.int32)}
  return new_params, new_opt, metrics


def _cached_jit(kind: str, state: TrainState, fn, **shardings):
  key = (kind, state.model_def, state.opt_def if kind == "train" else None, state.mesh,
         state.rules, state.compile_options)
  if key not in _JIT_CACHE:
    _JIT_CACHE[key] = jax.jit(fn, compiler_options=dict(state.compile_options) or None,
                              **shardings)
  return _JIT_CACHE[key]


def make_train_step(state: TrainState):
  """jit(step)(params, opt_state, batch) -> (params, opt_state, metrics); params/opt donated."""
  rep = shd.replicated(state.mesh)
  batch_sh = shd.batch_sharding(state.mesh, state.rules)
  fn = functools.partial(_train_step, state.model_def, state.opt_def)
  jitted = _cached_jit(
      "train", state, fn, in_shardings=(state.param_shardings, state.opt_shardings, batch_sh),
      out_shardings=(state.param_shardings, state.opt_shardings, rep), donate_argnums=(0, 1))

  def step(params, opt_state, batch):
    with shd.activate(state.mesh, state.rules):
      return jitted(params, opt_state, batch)
  step.jitted = jitted  # for .trace / .lower under shd.activate (moba_jax/plan.py)
  return step


def _eval_step(model_def, params, batch):
  model = nnx.merge(model_def, params)
  nll, w = _forward(model, batch)
  return nll, w, batch["lm_mask"]  # every real target (moba_jax.data: held-out rows' lm_mask)


def make_eval_step(state: TrainState):
  """jit(eval)(params, batch) -> per-token nll, loss mask, real-token mask ([B, T], replicated)."""
  rep = shd.replicated(state.mesh)
  batch_sh = shd.batch_sharding(state.mesh, state.rules)
  jitted = _cached_jit("eval", state, functools.partial(_eval_step, state.model_def),
                       in_shardings=(state.param_shardings, batch_sh),
                       out_shardings=(rep, rep, rep))

  def step(params, batch):
    with shd.activate(state.mesh, state.rules):
      return jitted(params, batch)
  return step


_PEAK_TFLOPS = {"h200": 989.0, "h100": 989.0, "a100": 312.0, "tpu v4": 275.0,
                "tpu v5 lite": 197.0, "tpu v5e": 197.0, "tpu v5p": 459.0, "tpu v6": 918.0}


def peak_flops_per_device(cfg: Config) -> float | None:
  """Peak dense bf16 FLOP/s of one device (train.peak_tflops, else by device kind; None on CPU)."""
  if cfg.train.peak_tflops:
    return cfg.train.peak_tflops * 1e12
  kind = jax.devices()[0].device_kind.lower()
  for name, tflops in _PEAK_TFLOPS.items():
    if name in kind:
      return tflops * 1e12
  return None
