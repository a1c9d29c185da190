"""`moba-jax train [CONFIG.toml] [key=value ...]`: one training run, resumable and preemption-safe.

  run(cfg) -> summary dict    (the grid calls this)

Writes under cfg.run_dir: config.toml (resolved config), metrics.jsonl, checkpoints/ (Orbax),
summary.json (atomically, at the end). Running again with the same run_dir resumes from the newest
restorable checkpoint; with no checkpoint and train.init_from set, parameters start from that run.
SIGTERM / SIGINT: the current step finishes, a checkpoint is saved, the run exits 0 with a message.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import tomllib
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from moba_jax import attention
from moba_jax import checkpoint as ckpt
from moba_jax import data as data_lib
from moba_jax import flops as flops_lib
from moba_jax import metrics as metrics_lib
from moba_jax import rundir
from moba_jax import sharding as shd
from moba_jax import train_step as ts
from moba_jax.config import (FILE_RELATIVE, Config, config_from_dict, config_to_dict,
                             layer_kinds, load_config, read_file, save_config)
from moba_jax.rundir import atomic_write
from moba_jax.signals import SignalFlag


class NonFiniteError(FloatingPointError):
  """Too many non-finite steps in a row."""


class Preemption(SignalFlag):
  """SIGTERM/SIGINT as a flag checked between steps (agreed across processes)."""

  def should_stop(self, sync: bool = True) -> bool:
    """This process's flag; with several processes, agreed (all-gathered) on `sync` steps only,
    so that every process stops after the same step."""
    flag = self.received is not None
    if jax.process_count() > 1:
      if not sync:
        return False
      from jax.experimental import multihost_utils

      flag = bool(np.max(multihost_utils.process_allgather(np.int32(flag))))
    return flag


def _log0(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, file=sys.stderr, flush=True)


def _setup(cfg: Config):
  mesh = shd.make_mesh(cfg.mesh)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if cfg.train.batch_size % shards:
    raise ValueError(f"train.batch_size={cfg.train.batch_size} must be divisible by "
                     f"mesh data * fsdp = {shards} (mesh {dict(mesh.shape)})")
  if cfg.train.seq_len % mesh.shape["context"]:
    raise ValueError(f"train.seq_len={cfg.train.seq_len} must be divisible by mesh context = "
                     f"{mesh.shape['context']} (mesh {dict(mesh.shape)})")
  return mesh, shd.rules_from_config(cfg.mesh)


def _restore(cfg: Config, state: ts.TrainState, mngr, data_iter) -> tuple[int, dict]:
  """Restores the newest checkpoint into state/data_iter; else init_from params. -> (step, meta)."""
  abs_p = ckpt.abstract_like(nnx.to_pure_dict(state.params))
  abs_o = ckpt.abstract_like(nnx.to_pure_dict(state.opt_state))
  found = ckpt.restore_latest(mngr, abs_p, abs_o, data_iter)
  if found is not None:
    step, params, opt_state, meta = found
    nnx.replace_by_pure_dict(state.params, params)
    nnx.replace_by_pure_dict(state.opt_state, opt_state)
    _log0(f"resumed from {mngr.directory}/{step}")
    saved, now = meta.get("mesh_shape"), dict(state.mesh.shape)
    if saved and saved != now:
      _log0(f"note: step {step} was saved on mesh {saved}; it continues on {now} (the arrays "
            "resharded: bit-equal to an uninterrupted run on one mesh only)")
    return step, meta
  if cfg.train.init_from:
    step, params = ckpt.restore_params(cfg.train.init_from, abs_p)
    nnx.replace_by_pure_dict(state.params, params)
    _log0(f"initialised params from {cfg.train.init_from} (step {step})")
  return 0, {}


def _save(mngr, step, state, data_iter, meta, force=False):
  ckpt.save(mngr, step, nnx.to_pure_dict(state.params), nnx.to_pure_dict(state.opt_state),
            data_iter, meta, force=force)


def evaluate(cfg: Config, state: ts.TrainState, eval_fn) -> dict:
  """Held-out loss metrics (metrics.EvalAccumulator) over eval.batches batches."""
  acc = metrics_lib.EvalAccumulator(cfg.train.seq_len, cfg.eval.trailing_tokens,
                                    cfg.eval.position_buckets)
  bsh = shd.batch_sharding(state.mesh, state.rules)
  for local in data_lib.eval_batches(cfg, jax.process_index(), jax.process_count()):
    out = eval_fn(state.params, shd.global_batch(local, bsh, cfg.train.batch_size))
    acc.add(*(np.asarray(x.addressable_data(0)) for x in out))
  return acc.result()


class _Window:
  """Accumulates per-step numbers between two metrics rows. Checkpointed (`state`): a run
  preempted between two rows writes, once resumed, the row of every step since the last one."""

  def __init__(self, state: dict | None = None):
    state = state or {}
    self.losses = [float("nan") if x is None else float(x) for x in state.get("losses", [])]
    self.times = [float(x) for x in state.get("times", [])]
    self.flops = [float(x) for x in state.get("flops", [])]
    self.tokens = int(state.get("tokens", 0))

  def state(self) -> dict:
    return {"losses": [x if np.isfinite(x) else None for x in self.losses],
            "times": self.times, "flops": self.flops, "tokens": self.tokens}

  def add(self, loss, dt, tokens, step_flops):
    self.losses.append(loss)
    self.times.append(dt)
    self.flops.append(step_flops)
    self.tokens += tokens

  def row(self, cfg, step, peak, n_dev) -> dict:
    """n_dev: the devices of this process, whose rows `flops` counted (moba_jax/flops.py)."""
    finite = [x for x in self.losses if np.isfinite(x)]
    times = self.times[1:] if len(self.times) > 1 else self.times  # skip a compile step
    step_time = float(np.median(times))
    tps = cfg.train.batch_size * cfg.train.seq_len / step_time
    mfu = float(np.mean(self.flops)) / step_time / (peak * n_dev) if peak else None
    return {"step": step, "loss": float(np.mean(finite)) if finite else float("nan"),
            "lr": float(ts.lr_schedule(cfg.train)(step - 1)), "step_time_s": step_time,
            "tokens_per_s": tps, "mfu": mfu, "answer_tokens": self.tokens}


def attention_at(cfg: Config, step: int):
  """The MobaConfig that training step `step` (counted from 1) runs: cfg.moba, or every layer full
  attention from moba.full_from_step on (the data-level hybrid)."""
  n = cfg.moba.full_from_step
  return dataclasses.replace(cfg.moba, hybrid_full_layers="all") if n and step >= n else cfg.moba


def set_state_attention(state, moba) -> None:
  """Gives a train state's model definition the attention of `moba` (model.set_attention); the
  parameters are untouched."""
  from moba_jax.model import set_attention

  model = set_attention(nnx.merge(state.model_def, state.params), moba)
  state.model_def = nnx.split(model, nnx.Param)[0]


class _Loop:
  """The training loop's mutable state (counters, handles)."""

  def __init__(self, cfg: Config, state, mngr, data_iter, start: int, meta: dict, t0: float):
    self.cfg, self.state, self.mngr, self.it = cfg, state, mngr, data_iter
    self.step, self.start = start, start
    self.nonfinite_total = int(meta.get("nonfinite_total", 0))
    self.consecutive = int(meta.get("nonfinite_consecutive", 0))  # a rerun continues the count
    self.last_finite_step = int(meta.get("last_finite_step", start))
    self.last_loss = float("nan")
    self.last_row: dict = {}
    self.window = _Window(meta.get("metrics_window"))
    self.wall_before = float(meta.get("wall_s", 0.0))  # earlier invocations' time
    self.t0 = t0  # this invocation's start
    self.train_fn = ts.make_train_step(state)
    self.eval_fn = ts.make_eval_step(state)
    self.bsh = shd.batch_sharding(state.mesh, state.rules)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    self.n_params = n_params
    self.matmul_params = flops_lib.matmul_params(cfg, n_params)
    self.peak = ts.peak_flops_per_device(cfg)
    self.flops_cfg, self.all_full = cfg, False
    self.switch_attention()

  def switch_attention(self) -> None:
    """moba.full_from_step: from that step on every layer is full attention (the data-level
    hybrid). The parameters stay; the steps compile once more."""
    moba = attention_at(self.cfg, self.step + 1)
    if moba == self.cfg.moba or self.all_full:
      return
    set_state_attention(self.state, moba)
    self.train_fn, self.eval_fn = ts.make_train_step(self.state), ts.make_eval_step(self.state)
    self.flops_cfg, self.all_full = dataclasses.replace(self.cfg, moba=moba), True
    _log0(f"from step {self.step + 1}: every layer is full attention "
          f"(moba.full_from_step={self.cfg.moba.full_from_step})")

  def meta(self) -> dict:
    c = self.cfg
    return {"step": self.step, "nonfinite_total": self.nonfinite_total,
            "nonfinite_consecutive": self.consecutive, "last_finite_step": self.last_finite_step,
            "train_seed": c.train.seed, "data_seed": c.data.seed,
            "metrics_window": self.window.state(), "wall_s": self.wall_s(),
            "mesh_shape": dict(self.state.mesh.shape),
            "config": config_to_dict(c)}

  def wall_s(self) -> float:
    """Seconds of this run over every invocation so far (each from its start to its last save)."""
    return self.wall_before + time.time() - self.t0

  def dispatch(self) -> tuple[dict, float]:
    """Starts the next step (asynchronously) -> (its metrics on the device, its FLOPs)."""
    local = next(self.it)
    step_flops = flops_lib.step_flops(self.flops_cfg, self.matmul_params, local["segment_ids"])
    batch = shd.global_batch(local, self.bsh, self.cfg.train.batch_size)
    s = self.state
    s.params, s.opt_state, m = self.train_fn(s.params, s.opt_state, batch)
    self.step += 1
    return m, step_flops

  def finish(self, m: dict, step: int) -> tuple[float, int]:
    """Reads step `step`'s metrics (waits for it) and books them -> (loss, tokens)."""
    m = jax.device_get(m)
    loss, finite = float(m["loss"]), bool(m["finite"])
    if finite:
      self.consecutive = 0
      self.last_loss = loss
      self.last_finite_step = step
    else:
      self._nonfinite(step, loss, float(m["grad_norm"]))
    return loss, int(m["tokens"])

  def _nonfinite(self, step: int, loss: float, grad_norm: float) -> None:
    self.nonfinite_total += 1
    self.consecutive += 1
    limit = self.cfg.train.max_nonfinite_steps
    _log0(f"step {step}: non-finite loss={loss} or grad_norm={grad_norm}; params and "
          f"optimizer state left unchanged ({self.consecutive} in a row, "
          f"train.max_nonfinite_steps={limit})")
    if self.consecutive >= limit:
      raise NonFiniteError(
          f"{self.consecutive} non-finite steps in a row (steps "
          f"{step - self.consecutive + 1}..{step}, last loss={loss}, "
          f"grad_norm={grad_norm}) reached train.max_nonfinite_steps={limit}: aborting. The "
          f"last step with a finite loss was {self.last_finite_step} (loss {self.last_loss}); "
          f"the checkpoints in {self.mngr.directory} are kept as they are, the newest being "
          f"step {max(self.mngr.all_steps(), default=None)}. Lower train.lr, raise "
          "train.warmup_steps or check the data, then rerun (the count of non-finite steps in a "
          "row goes on from the newest checkpoint), or start over with --fresh.")


def _profiler(cfg: Config, step: int, tracing: bool) -> bool:
  tc = cfg.train
  if not tc.profile_steps:
    return False
  if step == tc.profile_start and not tracing:
    jax.profiler.start_trace(os.path.join(cfg.run_dir, rundir.PROFILE))
    return True
  if tracing and step >= tc.profile_start + tc.profile_steps:
    jax.effects_barrier()
    jax.profiler.stop_trace()
    _log0(f"profile of steps {tc.profile_start}..{step - 1} in {cfg.run_dir}/profile")
    return False
  return tracing


def _progress(cfg, loop, end, progress):
  from tqdm import tqdm

  disable = not (progress and cfg.log.progress and jax.process_index() == 0)
  return tqdm(total=end, initial=loop.step, desc="train", unit="step", disable=disable,
              dynamic_ncols=True, file=sys.stderr)


def _boundary(cfg: Config, step: int, end: int) -> bool:
  """Steps after which the loop waits for the device: metrics rows, evals, checkpoints, the end."""
  return (step % cfg.log.every == 0 or step == end
          or bool(cfg.eval.every and step % cfg.eval.every == 0)
          or bool(cfg.checkpoint.every and step % cfg.checkpoint.every == 0))


def _train(cfg: Config, loop: _Loop, end: int, log, progress: bool,
           pre: Preemption) -> str | None:
  """Runs steps until `end` or a signal; returns the signal name if preempted.

  Step n + 1 is dispatched before step n's metrics are read (as nanodo does), so the host never
  waits for the device except at boundary steps (`_boundary`), where the state is complete:
  metrics rows, evals and checkpoints see exactly the parameters of that step."""
  if pre.should_stop():  # a signal during start-up (compilation, restore): stop before step 1
    return pre.received or "signal"
  tracing = False
  n_dev = jax.local_device_count()
  bar = _progress(cfg, loop, end, progress)
  pending, t_last = None, time.perf_counter()

  def finish(p):
    nonlocal t_last
    loss, tokens = loop.finish(p[0], p[2])
    now = time.perf_counter()
    loop.window.add(loss, now - t_last, tokens, p[1])
    t_last = now
    bar.update(1)

  with bar:
    while loop.step < end:
      loop.switch_attention()
      tracing = _profiler(cfg, loop.step + 1, tracing)
      m, step_flops = loop.dispatch()
      if pending is not None:
        finish(pending)
      pending = (m, step_flops, loop.step)
      s = loop.step
      at_boundary = _boundary(cfg, s, end)
      if at_boundary or pre.received:
        finish(pending)
        pending = None
      if s % cfg.log.every == 0 or s == end:
        row = loop.window.row(cfg, s, loop.peak, n_dev)
        row["nonfinite_steps"] = loop.nonfinite_total
        if cfg.eval.every and s % cfg.eval.every == 0:
          row.update(_eval_row(evaluate(cfg, loop.state, loop.eval_fn)))
        log.write(row)
        loop.last_row = row
        bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        loop.window = _Window()
      if cfg.checkpoint.every and s % cfg.checkpoint.every == 0 and s < end:
        _save(loop.mngr, s, loop.state, loop.it, loop.meta())
      if pending is None and pre.should_stop(sync=at_boundary):
        if tracing:
          _profiler(cfg, 10 ** 12, tracing)
        return pre.received or "signal"
      t_last = time.perf_counter() if at_boundary else t_last
    if tracing:
      _profiler(cfg, 10 ** 12, tracing)
  return None


def _eval_row(result: dict) -> dict:
  return {k: v for k, v in result.items() if not k.startswith("position_")}


def _write_json(path: str, obj: dict) -> None:
  if jax.process_index() == 0:
    atomic_write(path, metrics_lib.dumps(obj) + "\n")


def _last_metrics_row(run_dir: str) -> dict:
  rows = metrics_lib.read_rows(run_dir)
  return rows[-1] if rows else {}


def _summary(cfg, loop: _Loop, status: str, wall: float, extra: dict) -> dict:
  rows = loop.last_row or _last_metrics_row(cfg.run_dir)  # a rerun of a finished run
  summary = {"status": status, "step": loop.step, "final_train_loss": rows.get("loss"),
             "tokens_per_s": rows.get("tokens_per_s"), "step_time_s": rows.get("step_time_s"),
             "mfu": rows.get("mfu"), "wall_s": wall, "nonfinite_steps": loop.nonfinite_total,
             "params": loop.n_params, "hybrid_full_layers": cfg.moba.hybrid_full_layers,
             "task": cfg.data.task, "run_dir": os.path.abspath(cfg.run_dir)}
  summary.update(extra)
  return summary


def validate(cfg: Config) -> Config:
  """The checks a Config cannot make by itself (they need the layers above it): implementation
  names the attention registry knows, and data settings that fit the model and sequence length.
  Raises ValueError naming the key; run() calls it first, `moba-jax grid` for every stage."""
  for key, kind in (("implementation", "moba"), ("full_implementation", "full")):
    name, known = getattr(cfg.moba, key), attention.implementations(kind)
    if name not in known:
      raise ValueError(f"moba.{key}={name!r} must be one of {known}")
  if cfg.mesh.context != 1:  # the sequence is split: every layer's attention must run that way
    for kind in set(layer_kinds(cfg.model.n_layers, cfg.moba.hybrid_full_layers)):
      key = "implementation" if kind == "moba" else "full_implementation"
      attention.check_context_parallel(kind, getattr(cfg.moba, key))
  data_lib.check_config(cfg)
  return cfg


# Model keys that fix the parameters' shapes and dtypes: a run dir holds checkpoints of one.
SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim",
              "tie_embeddings", "qkv_bias", "param_dtype")


def check_resumable(cfg: Config) -> None:
  """Raises ValueError naming the differing keys if cfg.run_dir holds checkpoints of another model
  shape (restoring them would fail at every step and the run would silently start over)."""
  path = os.path.join(cfg.run_dir, rundir.CONFIG)
  if not (os.path.isfile(path) and rundir.has_checkpoints(cfg.run_dir)):
    return
  diff = _shape_diff(path, cfg.model, "use another run_dir, or --fresh")
  if diff:
    raise ValueError(f"run_dir={cfg.run_dir!r} holds checkpoints of another model shape "
                     f"({'; '.join(diff)}); use a new run_dir, or pass --fresh to start this one "
                     "over (its checkpoints and metrics are deleted)")


# Keys a run may change between its starts without changing what it trains: where and how fast
# it runs, when it logs and saves, how long it goes on (prefixes end with a dot).
RESUME_FREE = ("run_dir", "mesh.", "log.", "checkpoint.", "data.prefetch", "model.remat",
               "moba.implementation", "moba.full_implementation", "moba.interpret", "moba.tiles",
               "train.steps", "train.stop_after", "train.init_from", "train.profile_steps",
               "train.profile_start", "train.peak_tflops", "train.max_nonfinite_steps",
               "train.deterministic")


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def _same_place(value) -> object:
  """An input path as one place: absolute, links resolved (a Config built in Python may hold it
  relative to the cwd; a URL stays as it is)."""
  if isinstance(value, str) and value and "://" not in value:
    return os.path.realpath(value)
  return value


def _same_corpus(run_dir, path: str) -> bool:
  """Whether the corpus at data.path `path` is the one the run in run_dir finished on (its
  summary's fingerprint): a corpus moved or cached elsewhere is the same data."""
  from moba_jax import corpus as corpus_lib

  saved = (rundir.read_json(os.path.join(run_dir, rundir.SUMMARY)) or {}).get(
      "corpus_fingerprint")
  try:
    return saved is not None and corpus_lib.load(path).fingerprint == saved
  except (OSError, ValueError):
    return False


def _saved_settings(cfg: Config) -> dict | None:
  """The flat settings of the config.toml in cfg.run_dir, or None where the run dir holds no
  checkpoint (a start from scratch) or no config that loads."""
  path = os.path.join(cfg.run_dir, rundir.CONFIG)
  if not (os.path.isfile(path) and rundir.has_checkpoints(cfg.run_dir)):
    return None
  try:  # raw: a relative path in it was the run's cwd's, as this command's (read_file would
    with open(path, "rb") as f:  # take it against the run dir)
      d = tomllib.load(f)
    d.pop("grid", None)
    return _flat(config_to_dict(config_from_dict(d)))
  except (OSError, ValueError):
    return None


def config_changes(cfg: Config, free: Sequence[str] = RESUME_FREE) -> list[str]:
  """The settings where cfg differs from the config.toml saved in cfg.run_dir, as "KEY: THERE
  there, NOW now", apart from those in `free` (keys, or prefixes ending with a dot); [] where the
  run dir holds no checkpoint (a start from scratch) or no config that loads (`check_resumable`
  names it where it matters). Input paths compare as places, and data.path by the corpus's
  fingerprint where the run recorded one."""
  saved = _saved_settings(cfg)
  if saved is None:
    return []
  now = _flat(config_to_dict(cfg))
  for sec, key in FILE_RELATIVE:
    k = f"{sec}.{key}"
    saved[k], now[k] = _same_place(saved.get(k)), _same_place(now.get(k))
  is_free = lambda k: any(k == f or (f.endswith(".") and k.startswith(f)) for f in free)
  keys = [k for k in sorted(set(saved) | set(now)) if not is_free(k) and saved.get(k) != now.get(k)]
  rel = lambda d: (os.path.relpath(d["train.init_from"], _same_place(d["run_dir"]))
                   if isinstance(d.get("train.init_from"), str) and d["train.init_from"] else None)
  if "train.init_from" in keys and rel(saved) is not None and rel(saved) == rel(now):
    keys.remove("train.init_from")  # a grid's out_dir moved: its runs start from its own stage 1
  if "data.path" in keys and now.get("data.task") == "corpus" and _same_corpus(
      cfg.run_dir, cfg.data.path):
    keys.remove("data.path")
  return [f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now" for k in keys]


def check_same_config(cfg: Config) -> None:
  """Before a run dir with checkpoints starts again under cfg: a finished run (nothing would
  train) of other settings is refused, naming them: its results are not of this config. An
  unfinished one continues under the new settings (e.g. the last steps with every layer full),
  with a note naming them; its config.toml then holds the new ones. eval.* may change: a run
  evaluates again when it starts finished. train.steps is free, but where the learning-rate
  schedule's length follows it (train.schedule_steps 0 then and now) a change is noted: the
  steps still to run follow a schedule of the new length."""
  saved = _saved_settings(cfg) or {}
  before, tc = saved.get("train.steps"), cfg.train
  done = rundir.finished_step(cfg.run_dir)
  if (before not in (None, tc.steps) and saved.get("train.schedule_steps") == 0
      and tc.schedule_steps == 0 and (done is None or done < tc.steps)):  # steps will run
    _log0(f"note: train.steps={tc.steps} (the run was saved with {before}) also sets the "
          f"learning-rate schedule's length here (train.schedule_steps=0): the steps from here "
          f"on follow a schedule of {tc.steps} steps, not {before}; pass "
          f"train.schedule_steps={before} to keep the run's schedule")
  changes = config_changes(cfg, RESUME_FREE + ("eval.",))
  if not changes:
    return
  step = rundir.finished_step(cfg.run_dir)
  if step is not None and step >= cfg.train.steps:
    raise ValueError(
        f"run_dir={cfg.run_dir!r} holds a run finished at step {step} under other settings "
        f"({'; '.join(changes)}): nothing would train and its results are not of this config; "
        "use a new run_dir, pass --fresh to start this one over, or raise train.steps to "
        "continue it under these settings")
  _log0(f"note: run_dir={cfg.run_dir!r} continues under settings changed since it was saved: "
        + "; ".join(changes))


def _shape_diff(config_path: str, model, advice: str) -> list[str]:
  """The parameter-shape keys (SHAPE_KEYS) where the config file's [model] differs from `model`,
  as "model.KEY: THERE there, NOW now"."""
  try:
    with open(config_path, "rb") as f:
      saved = tomllib.load(f).get("model", {})
  except (OSError, ValueError) as e:
    raise ValueError(f"{config_path} does not load ({e}); {advice}") from None
  return shape_diff(saved, model)


def shape_diff(saved: dict, model) -> list[str]:
  """The SHAPE_KEYS where a saved [model] table (missing keys: defaults) differs from `model`, as
  "model.KEY: THERE there, NOW now"."""
  defaults = type(model)()
  return [f"model.{k}: {saved.get(k, getattr(defaults, k))!r} there, {getattr(model, k)!r} now"
          for k in SHAPE_KEYS if saved.get(k, getattr(defaults, k)) != getattr(model, k)]


def check_init_from(cfg: Config, *, must_exist: bool = True) -> None:
  """ValueError naming train.init_from where it is not a directory (must_exist: a grid checks its
  own stage 1's before that has run with False) or where the run it names saved a config of
  another model shape: its parameters would restore at no step."""
  path = cfg.train.init_from
  if not path:
    return
  if not os.path.isdir(path):
    if must_exist:
      raise ValueError(f"train.init_from={path!r}: no such directory (a run dir, or its "
                       f"{rundir.CHECKPOINTS}/ dir)")
    return
  run_dir = os.path.normpath(path)
  if os.path.basename(run_dir) == rundir.CHECKPOINTS:
    run_dir = os.path.dirname(run_dir)
  saved = os.path.join(run_dir, rundir.CONFIG)
  if not os.path.isfile(saved):
    return  # a bare checkpoints dir: the restore finds out
  diff = _shape_diff(saved, cfg.model, "give train.init_from a run of this model")
  if diff:
    raise ValueError(f"train.init_from={path!r} is a run of another model shape "
                     f"({'; '.join(diff)}): give a run of this model, or this model its shape")


def run(cfg: Config, *, progress: bool = True, fresh: bool = False) -> dict:
  """Trains (resuming if possible), evaluates, writes <run_dir>/summary.json; returns the summary.

  The run dir is locked for the whole run (rundir.Lock; process 0). fresh: delete the run dir's
  checkpoints, metrics and summary first. Summary keys: status ("done" | "preempted" | "stopped"),
  step, final_train_loss (mean loss of the last metrics window), eval_loss (masked: answer tokens
  for SFT, all tokens for LM), eval_lm_loss (all tokens), trailing_loss / trailing_lm_loss (the same
  over the last eval.trailing_tokens positions), position_loss (buckets), tokens_per_s,
  step_time_s, mfu, wall_s, nonfinite_steps.
  """
  validate(cfg)
  _setup(cfg)  # the mesh on these devices: a mistake there touches no file of the run dir
  if fresh or not rundir.has_checkpoints(cfg.run_dir):
    check_init_from(cfg)  # it starts a new run only; checked before the run dir is made
  if jax.process_index() == 0:
    rundir.make_writable_dir(cfg.run_dir, "run_dir")
  else:
    os.makedirs(cfg.run_dir, exist_ok=True)
  with Preemption() as pre:  # from here on SIGTERM / SIGINT stop the run cleanly
    if jax.process_index() != 0:  # the checks process 0 makes (read-only): all stop together
      _check_run_dir(cfg, fresh)
      return _run(cfg, progress, pre)
    with rundir.Lock(cfg.run_dir):
      _check_run_dir(cfg, fresh)
      if fresh:
        rundir.clear(cfg.run_dir)
      save_config(cfg, os.path.join(cfg.run_dir, rundir.CONFIG))
      return _run(cfg, progress, pre)


def _check_run_dir(cfg: Config, fresh: bool) -> None:
  """ValueError where the run dir cannot take this run: parameters only (never cleared or set
  aside: a model to start from, not a run), or, unless --fresh clears it, checkpoints of another
  model shape or a finished run of other settings (`check_same_config`)."""
  converted = ckpt.params_only(cfg.run_dir)
  if converted:
    raise ValueError(
        f"run_dir={cfg.run_dir!r} holds parameters only (step {converted[-1]}, e.g. a "
        "`moba-jax convert` output), not a run to resume: train into a new run_dir with "
        f"train.init_from={cfg.run_dir}")
  if not fresh:
    check_resumable(cfg)
    check_same_config(cfg)


def layer_implementations(cfg: Config) -> tuple[tuple[str, ...], list[str]]:
  """(each layer's kind, the implementation it resolves to on this platform)."""
  from moba_jax.config import layer_kinds

  m, kinds = cfg.model, layer_kinds(cfg.model.n_layers, cfg.moba.hybrid_full_layers)
  dense = 4 * cfg.train.batch_size * m.n_heads * cfg.train.seq_len ** 2  # as attention() sizes it
  impl = {"moba": cfg.moba.implementation, "full": cfg.moba.full_implementation}
  if getattr(getattr(cfg, "mesh", None), "context", 1) > 1:  # attention()'s context-parallel path
    return kinds, [attention.resolve_context_parallel(k, impl[k]) for k in kinds]
  return kinds, [attention.resolve(k, impl[k], dtype=m.dtype, dense_bytes=dense) for k in kinds]


def check_attention_runs_here(cfg: Config) -> None:
  """ValueError naming the key where a layer's kernel compiles for another platform (e.g.
  moba.implementation=pallas_gpu on a CPU without moba.interpret): before the model is built."""
  for kind, name in sorted(set(zip(*layer_implementations(cfg)))):
    attention.check_runs_here(kind, name, cfg.moba.interpret)


def attention_plan(cfg: Config) -> str:
  """Which implementation each layer resolves to on this platform, e.g.
  "layers 0-6: moba -> pallas_gpu; layers 7-11: full -> cudnn"."""
  kinds, names = layer_implementations(cfg)
  context = getattr(getattr(cfg, "mesh", None), "context", 1)
  if context > 1:
    names = [f"{n}, context parallel over {context}" for n in names]
  runs, start = [], 0
  for i in range(1, len(kinds) + 1):
    if i == len(kinds) or (kinds[i], names[i]) != (kinds[start], names[start]):
      span = f"layer {start}" if i - 1 == start else f"layers {start}-{i - 1}"
      runs.append(f"{span}: {kinds[start]} -> {names[start]}")
      start = i
  return "; ".join(runs)


def _run(cfg: Config, progress: bool, pre: Preemption) -> dict:
  t0 = time.time()
  mesh, rules = _setup(cfg)
  check_attention_runs_here(cfg)
  _log0(f"attention: {attention_plan(cfg)}")
  source = data_lib.RowSource(cfg, "train")  # data errors surface before the model is built
  state = ts.init_state(cfg, mesh, rules)
  for line in shd.undivided(state.params, mesh, rules):
    _log0(f"note: {line}")
  data_iter = iter(data_lib.train_dataset(cfg, jax.process_index(), jax.process_count(), source))
  mngr = ckpt.manager(os.path.join(cfg.run_dir, rundir.CHECKPOINTS), cfg.checkpoint.keep,
                      cfg.checkpoint.async_save)
  try:
    start, meta = _restore(cfg, state, mngr, data_iter)
    loop = _Loop(cfg, state, mngr, data_iter, start, meta, t0)
    end = min(cfg.train.steps, cfg.train.stop_after or cfg.train.steps)
    if start < end:  # a summary left by an earlier invocation no longer says where the run is
      summary_path = os.path.join(cfg.run_dir, rundir.SUMMARY)
      earlier = rundir.read_json(summary_path)
      if earlier:
        _write_json(summary_path, {**earlier, "status": "running", "step": start})
    log = metrics_lib.MetricsLog(cfg.run_dir, start, cfg.log.tensorboard,
                                 enabled=jax.process_index() == 0)
    try:
      stopped = _train(cfg, loop, end, log, progress, pre) if start < end else None
    finally:
      log.close()
  except BaseException:
    mngr.close()
    raise
  with SignalFlag():  # signals now wait: the final save and the summary always complete
    try:
      mngr.wait_until_finished()
      if loop.step not in mngr.all_steps():  # idempotent: a signal on a checkpoint step
        _save(mngr, loop.step, state, data_iter, loop.meta(), force=True)
      mngr.wait_until_finished()
    finally:
      mngr.close()
    return _finish(cfg, loop, stopped, end, {"corpus_fingerprint": source.fingerprint})


def _finish(cfg: Config, loop: _Loop, stopped: str | None, end: int,
            extra: dict) -> dict:
  if stopped:
    _log0(f"received {stopped}: finished step {loop.step}, saved a checkpoint in "
          f"{cfg.run_dir}/checkpoints; run the same command again to continue")
    summary = _summary(cfg, loop, "preempted", loop.wall_s(), extra)
    _write_json(os.path.join(cfg.run_dir, rundir.SUMMARY), summary)
    return summary
  result = evaluate(cfg, loop.state, loop.eval_fn) if cfg.eval.batches else {}
  status = "done" if loop.step >= cfg.train.steps else "stopped"
  summary = _summary(cfg, loop, status, loop.wall_s(), {**extra, **result})
  _write_json(os.path.join(cfg.run_dir, rundir.SUMMARY), summary)
  return summary


def maybe_initialize_distributed() -> None:
  """jax.distributed.initialize() for multi-process runs (before any device is touched).

  Explicit: MOBA_JAX_COORDINATOR=host:port, MOBA_JAX_NUM_PROCESSES, MOBA_JAX_PROCESS_ID.
  Auto-detected (SLURM, Cloud TPU pods, Open MPI): MOBA_JAX_DISTRIBUTED=1, or SLURM_NTASKS > 1.
  """
  env = os.environ
  cpu = env.get("JAX_PLATFORMS", "").startswith("cpu")
  if env.get("MOBA_JAX_COORDINATOR"):
    if cpu:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(env["MOBA_JAX_COORDINATOR"], int(env["MOBA_JAX_NUM_PROCESSES"]),
                               int(env["MOBA_JAX_PROCESS_ID"]))
  elif env.get("MOBA_JAX_DISTRIBUTED") == "1" or int(env.get("SLURM_NTASKS", "1")) > 1:
    if cpu:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize()


USAGE = """usage: moba-jax train [CONFIG.toml] [key=value ...]

Trains one run (defaults: a small model on the synthetic kv_retrieval task, about a minute on CPU).
Examples:
  moba-jax train run_dir=runs/a train.steps=12 log.every=1
  moba-jax train exp.toml train.lr=1e-3 moba.hybrid_full_layers=all mesh.fsdp=4
Rerunning with the same run_dir resumes (a run dir holds one model shape: another is an error);
--fresh deletes the run dir's checkpoints and metrics first. Keys: see docs/training.md (an unknown
key names the nearest valid one)."""


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if any(a in ("-h", "--help") for a in argv):
    print(USAGE)
    return 0
  fresh = "--fresh" in argv
  argv = [a for a in argv if a != "--fresh"]
  path = argv[0] if argv and "=" not in argv[0] else None
  overrides = argv[1:] if path else argv
  try:
    unknown = [a for a in argv if a.startswith("-")]
    if unknown:
      raise ValueError(f"unknown option {unknown[0]!r}; the options are --fresh and --help, the "
                       "rest [CONFIG.toml] key=value ...")
    if path and not os.path.isfile(path):
      from moba_jax import grid
      what = "a directory" if os.path.isdir(path) else "no such file"
      hint = (f"; {path!r} names a packaged experiment, which `moba-jax grid {path}` runs"
              if not os.path.exists(path) and grid.is_packaged(path) else "")
      raise ValueError(f"{path!r} is not a config file ({what}); the first argument may be a "
                       f"TOML or JSON file, the others look like key=value{hint}")
    cfg = validate(load_config(path, overrides))
    if path and "grid" in read_file(path):
      print(f"moba-jax train: note: {path} is an experiment; training its run config (its [grid] "
            "table is for moba-jax grid)", file=sys.stderr)
  except (ValueError, OSError) as e:
    print(f"moba-jax train: {e}", file=sys.stderr)
    return 2
  maybe_initialize_distributed()
  try:
    summary = run(cfg, fresh=fresh)
  except NonFiniteError as e:
    print(f"moba-jax train: {e}", file=sys.stderr)
    return 1
  except (ValueError, OSError, rundir.RunDirBusy) as e:
    print(f"moba-jax train: {e}", file=sys.stderr)
    return 2
  keys = ("status", "step", "final_train_loss", "eval_loss", "trailing_loss", "tokens_per_s")
  print(" ".join(f"{k}={summary.get(k)}" for k in keys if k in summary))
  return 0
