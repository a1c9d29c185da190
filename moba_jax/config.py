"""Typed, frozen configuration dataclasses (the project's one config system).

Sections are frozen dataclasses; each validates itself in __post_init__ and raises ValueError naming
the key and the accepted range. A whole config is built from a dict (TOML file) plus dotted
`key=value` overrides, validated once:

  cfg = load_config("exp.toml", ["train.steps=100", "moba.hybrid_full_layers=all"])

Unknown keys raise ValueError naming them and suggesting the nearest valid key. Override values are
parsed as TOML literals (`3`, `1e-3`, `true`, `[1, 2]`, `"x"`), else taken as strings (`all`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from typing import Annotated, Any, Literal, Sequence, Union

from moba_jax import config_io
from moba_jax.config_io import Partial, parse_override, to_toml
from moba_jax.rundir import atomic_write

HybridFull = Union[int, Literal["all"]]


def _int(section: str, key: str, value, lo: int | None = None, hi: int | None = None):
  ok = isinstance(value, int) and not isinstance(value, bool)
  ok = ok and (lo is None or value >= lo) and (hi is None or value <= hi)
  if not ok:
    rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
    raise ValueError(f"{section}.{key}={value!r} must be an integer {rng}")


def _num(section: str, key: str, value, lo: float, hi: float | None = None, lo_open=False):
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  ok = ok and (value > lo if lo_open else value >= lo) and (hi is None or value <= hi)
  if not ok:
    rng = (f"> {lo}" if lo_open else f">= {lo}") + (f" and <= {hi}" if hi is not None else "")
    raise ValueError(f"{section}.{key}={value!r} must be a finite number {rng}")


def _choice(section: str, key: str, value, choices):
  if value not in choices:
    raise ValueError(f"{section}.{key}={value!r} must be one of {tuple(choices)}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder shape. head_dim * heads need not equal d_model."""

  vocab_size: int = 256
  d_model: int = 128
  n_layers: int = 4
  n_heads: int = 4
  n_kv_heads: int = 2
  head_dim: int = 32
  mlp_dim: int = 384
  rope_theta: float = 10000.0
  # RoPE frequency scaling, as Hugging Face's rope_type of that name: "none", "linear" (every
  # frequency / rope_factor) or "llama3" (wavelengths above rope_original_max_len /
  # rope_low_freq_factor / rope_factor, below rope_original_max_len / rope_high_freq_factor kept,
  # a smooth ramp between).
  rope_scaling: str = "none"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  norm_eps: float = 1e-6
  tie_embeddings: bool = False
  # The tied head: "rsqrt_d_model" = embed.T * d_model ** -0.5 (unit-variance embeddings start
  # with O(1) logits), "none" = embed.T (Hugging Face models).
  tied_head_scale: str = "rsqrt_d_model"
  qkv_bias: bool = False  # biases on the q/k/v projections (Qwen2)
  dtype: str = "float32"  # compute dtype of activations (bfloat16 on accelerators)
  param_dtype: str = "float32"
  remat: bool = False  # rematerialize each layer in the backward pass

  def __post_init__(self):
    for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                "mlp_dim", "rope_original_max_len"):
      _int("model", key, getattr(self, key), 1)
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"model.n_heads={self.n_heads} must be divisible by "
                       f"model.n_kv_heads={self.n_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim={self.head_dim} must be even (RoPE rotates pairs of "
                       "dimensions)")
    for key in ("dtype", "param_dtype"):
      _choice("model", key, getattr(self, key), ("float32", "bfloat16", "float16"))
    _num("model", "rope_theta", self.rope_theta, 0, lo_open=True)
    _choice("model", "rope_scaling", self.rope_scaling, ("none", "linear", "llama3"))
    for key in ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
      _num("model", key, getattr(self, key), 0, lo_open=True)
    if self.rope_scaling == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
      raise ValueError(f"model.rope_high_freq_factor={self.rope_high_freq_factor} must be > "
                       f"model.rope_low_freq_factor={self.rope_low_freq_factor} for "
                       "model.rope_scaling='llama3'")
    _num("model", "norm_eps", self.norm_eps, 0, lo_open=True)
    _choice("model", "tied_head_scale", self.tied_head_scale, ("rsqrt_d_model", "none"))


@dataclasses.dataclass(frozen=True)
class MobaConfig:
  """Attention of each layer: the last `hybrid_full_layers` are full attention, the rest MoBA.

  hybrid_full_layers: 0 = all MoBA; n_layers or "all" = all full attention.
  implementation / full_implementation: names from moba_jax.attention.implementations().
  """

  block_size: int = 64
  topk: int = 3
  hybrid_full_layers: HybridFull = 0
  implementation: str = "auto"
  full_implementation: str = "auto"
  interpret: bool = False  # run Pallas kernels in interpret mode (CPU testing)
  # the kernel's BlockSizes fields in order; () = its defaults. Entries >= 0: 0 is a value of
  # some fields (pallas_gpu's Mosaic switches and overlap block, pallas_tpu's windows: auto);
  # each kernel's BlockSizes checks its own fields
  tiles: tuple[int, ...] = ()
  # The data-level hybrid (the paper's Figure 5a): from training step full_from_step on (steps
  # counted from 1, as in metrics.jsonl) every layer is full attention; 0 = never.
  full_from_step: int = 0

  def __post_init__(self):  # implementation names are checked against the registry by validate()
    _int("moba", "block_size", self.block_size, 1)
    _int("moba", "topk", self.topk, 1)
    _int("moba", "full_from_step", self.full_from_step, 0)
    hfl = self.hybrid_full_layers
    if not (hfl == "all" or (isinstance(hfl, int) and not isinstance(hfl, bool) and hfl >= 0)):
      raise ValueError(f"moba.hybrid_full_layers={hfl!r} must be an integer >= 0 or 'all'")
    for t in self.tiles:
      _int("moba", "tiles[]", t, 0)


def layer_kinds(n_layers: int, hybrid_full_layers: HybridFull) -> tuple[str, ...]:
  """Attention kind per layer: the last `hybrid_full_layers` layers "full", the others "moba"."""
  n_full = n_layers if hybrid_full_layers == "all" else int(hybrid_full_layers)
  if not 0 <= n_full <= n_layers:
    raise ValueError(f"moba.hybrid_full_layers={hybrid_full_layers!r} must be in "
                     f"[0, n_layers={n_layers}] or 'all'")
  return ("moba",) * (n_layers - n_full) + ("full",) * n_full


SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation. The LR schedule spans `schedule_steps` (0 = `steps`): warmup (capped at the
  schedule length), then decay to lr * min_lr_ratio. `stop_after` ends this invocation early (with a
  checkpoint) without changing the schedule: stop_after=6, then a rerun, reproduces 12 straight
  steps."""

  steps: int = 60  # the no-file default: a small CPU run of about a minute
  batch_size: int = 4
  seq_len: int = 256
  lr: float = 3e-3
  warmup_steps: int = 6
  schedule: str = "cosine"
  schedule_steps: int = 0
  min_lr_ratio: float = 0.1
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  grad_clip: float = 1.0  # global-norm clip; 0 = off
  seed: int = 0
  init_from: str = ""  # checkpoint dir or run dir: initialise params (only) from its latest step
  max_nonfinite_steps: int = 5  # abort after this many non-finite steps in a row
  stop_after: int = 0  # 0 = run to `steps`
  profile_steps: int = 0  # trace this many steps with jax.profiler (0 = off)
  profile_start: int = 3  # first traced step (after compilation)
  peak_tflops: float = 0.0  # per-device peak for MFU; 0 = look up the device kind
  # on a GPU: compile the steps with XLA's deterministic ops (scatter-adds without atomics), so
  # that a resumed or repeated run gives the same bits; the CPU and TPU are deterministic already
  deterministic: bool = False

  def __post_init__(self):
    for key, lo in (("steps", 1), ("batch_size", 1), ("seq_len", 2), ("warmup_steps", 0),
                    ("schedule_steps", 0), ("seed", 0), ("max_nonfinite_steps", 1),
                    ("stop_after", 0), ("profile_steps", 0), ("profile_start", 1)):
      _int("train", key, getattr(self, key), lo)
    _num("train", "lr", self.lr, 0, lo_open=True)
    _choice("train", "schedule", self.schedule, SCHEDULES)
    _num("train", "min_lr_ratio", self.min_lr_ratio, 0, 1)
    _num("train", "weight_decay", self.weight_decay, 0)
    _num("train", "b1", self.b1, 0, 1)
    _num("train", "b2", self.b2, 0, 1)
    _num("train", "grad_clip", self.grad_clip, 0)
    _num("train", "peak_tflops", self.peak_tflops, 0)
    if self.profile_steps and self.profile_start > self.steps:
      raise ValueError(f"train.profile_start={self.profile_start} must be <= train.steps="
                       f"{self.steps} when train.profile_steps={self.profile_steps} (no step "
                       "would be traced)")

  @property
  def total_schedule_steps(self) -> int:
    return self.schedule_steps or self.steps


TASKS = ("lm", "kv_retrieval", "passkey", "corpus")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Training data (see moba_jax/data.py and docs/training.md).

  task: "corpus" (real text, byte-level tokens, model.vocab_size >= 259, or those of `tokenizer`,
  a local tokenizer.json, model.vocab_size >= its vocabulary; `path` = a corpus
  directory from `moba-jax data`, a JSONL file of {"text"} / {"prompt", "response"} lines, or ""
  for the code corpus of this interpreter's standard library), "lm" (synthetic Markov+copy text,
  loss on all tokens), "kv_retrieval" and "passkey" (synthetic long-context SFT: loss on answers).
  response_tokens: corpus SFT windows, the last this-many targets of each row are the response
  (the paper's "last 2K of 32K"); 0 = LM rows (loss on every token).
  loss_on: "auto" (answers for SFT tasks, all tokens for LM), "answer" or "all"; it shapes the
  training loss only (held-out scores always count the answers).
  Difficulty knobs: kv_pairs (0 = fill the prompt), key_len, value_len, num_queries,
  filler (fraction of the kv prompt that is distractor noise), passkey_len.
  """

  task: str = "kv_retrieval"
  path: str = ""
  tokenizer: str = ""  # corpus: a Hugging Face tokenizer.json (or its dir); "" = byte-level
  response_tokens: int = 0
  loss_on: str = "auto"
  pack: bool = True  # pack examples; False = one a row (full-length, or a JSONL one then padding)
  min_len_frac: float = 0.25  # synthetic tasks' packed examples: lengths in [frac*seq, seq]
  seed: int = 1234
  kv_pairs: int = 0
  key_len: int = 2
  value_len: int = 2
  num_queries: int = 4
  filler: float = 0.0
  passkey_len: int = 5
  prefetch: int = 2  # batches prepared ahead by a background thread (0 = none)

  def __post_init__(self):
    _choice("data", "task", self.task, TASKS)
    _choice("data", "loss_on", self.loss_on, ("auto", "answer", "all"))
    _num("data", "min_len_frac", self.min_len_frac, 0, 1, lo_open=True)
    for key, lo in (("seed", 0), ("response_tokens", 0), ("kv_pairs", 0), ("key_len", 1),
                    ("value_len", 1),
                    ("num_queries", 1), ("passkey_len", 1), ("prefetch", 0)):
      _int("data", key, getattr(self, key), lo)
    _num("data", "filler", self.filler, 0, 0.95)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Held-out evaluation at the end of a run (and every `every` steps; 0 = only at the end).
  Eval rows are full-length, unpacked examples from a seed disjoint from training's."""

  batches: int = 2
  trailing_tokens: int = 64  # trailing loss: the last this-many positions of each row
  position_buckets: int = 8  # position-wise loss in this many equal buckets
  every: int = 0

  def __post_init__(self):
    for key, lo in (("batches", 0), ("trailing_tokens", 1), ("position_buckets", 1),
                    ("every", 0)):
      _int("eval", key, getattr(self, key), lo)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 20  # save every this many steps (and always at the end); 0 = only at the end
  keep: int = 3  # keep the last this-many checkpoints
  async_save: bool = True

  def __post_init__(self):
    _int("checkpoint", "every", self.every, 0)
    _int("checkpoint", "keep", self.keep, 1)


@dataclasses.dataclass(frozen=True)
class LogConfig:
  every: int = 5  # metrics.jsonl row (and progress-bar refresh) every this many steps
  tensorboard: bool = False  # TensorBoard event files under <run_dir>/tb (if a writer is installed)
  progress: bool = True

  def __post_init__(self):
    _int("log", "every", self.every, 1)


# Mesh axes, outermost first: context sits inside data/fsdp and outside tensor, so the devices of
# one sequence's shards are near each other and tensor parallelism has the closest links.
MESH_AXES = ("data", "fsdp", "context", "tensor")


@dataclasses.dataclass(frozen=True)
class AxisRules:
  """Logical axis -> mesh axes. Params use vocab/embed/mlp/heads/kv_heads/head_dim/norm/layers,
  activations batch/length/embed/heads/kv_heads/head_dim/mlp/vocab. A mesh axis already used by an
  earlier dimension of the same array is skipped, and so is one that does not divide the
  dimension, or has size 1. `length` (the sequence of activations) goes to `context`: with
  mesh.context > 1 every activation is split along the sequence and attention runs context
  parallel (moba_jax/context_parallel.py). Parameters' `embed` goes to fsdp and context (ZeRO-3
  over both: activation `embed` comes after batch and length, whose axes it then skips)."""

  batch: tuple[str, ...] = ("data", "fsdp")
  length: tuple[str, ...] = ("context",)
  embed: tuple[str, ...] = ("fsdp", "context")
  mlp: tuple[str, ...] = ("tensor",)
  heads: tuple[str, ...] = ("tensor",)
  kv_heads: tuple[str, ...] = ("tensor",)
  head_dim: tuple[str, ...] = ()
  vocab: tuple[str, ...] = ("tensor",)
  norm: tuple[str, ...] = ()
  layers: tuple[str, ...] = ()

  def __post_init__(self):
    for f in dataclasses.fields(self):
      axes = getattr(self, f.name)
      for axis in axes:
        _choice("mesh.rules", f.name, axis, MESH_AXES)
      if len(set(axes)) != len(axes):
        raise ValueError(f"mesh.rules.{f.name}={list(axes)!r} names a mesh axis twice (an array "
                         "dimension is split over each mesh axis at most once)")

  def as_tuples(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
    return tuple((f.name, getattr(self, f.name)) for f in dataclasses.fields(self))


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh (data, fsdp, context, tensor); -1 on one axis = all remaining devices.
  context: devices one sequence is split over (context parallelism; train.seq_len must be a
  multiple of it)."""

  data: int = -1
  fsdp: int = 1
  context: int = 1
  tensor: int = 1
  rules: AxisRules = dataclasses.field(default_factory=AxisRules)

  def __post_init__(self):
    for key in MESH_AXES:
      value = getattr(self, key)
      if not (isinstance(value, int) and not isinstance(value, bool)
              and (value >= 1 or value == -1)):
        raise ValueError(f"mesh.{key}={value!r} must be an integer >= 1 or -1 (all remaining)")
    minus = [k for k in MESH_AXES if getattr(self, k) == -1]
    if len(minus) > 1:
      hint = (f" (mesh.data is -1 by default: with mesh.{minus[1]}=-1 set mesh.data=1)"
              if minus[0] == "data" else "")
      raise ValueError(f"mesh: at most one of {MESH_AXES} may be -1 (all remaining devices), "
                       f"got {', '.join(f'mesh.{k}=-1' for k in minus)}{hint}")


@dataclasses.dataclass(frozen=True)
class Config:
  """The whole run. Sections: model, moba, train, data, eval, checkpoint, log, mesh. Checks that
  need the layers above the config (attention implementation names, data settings against the
  model) are `moba_jax.train.validate(cfg)`, which every entry point runs before any work."""

  run_dir: str = "runs/default"
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  moba: MobaConfig = dataclasses.field(default_factory=MobaConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  log: LogConfig = dataclasses.field(default_factory=LogConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

  def __post_init__(self):
    if not isinstance(self.run_dir, str) or not self.run_dir:
      raise ValueError(f"run_dir={self.run_dir!r} must be a non-empty path")
    layer_kinds(self.model.n_layers, self.moba.hybrid_full_layers)  # range check
    if self.eval.trailing_tokens > self.train.seq_len:
      raise ValueError(f"eval.trailing_tokens={self.eval.trailing_tokens} must be <= "
                       f"train.seq_len={self.train.seq_len}")
    shards = self.mesh.data * self.mesh.fsdp
    if shards > 0 and self.train.batch_size % shards:
      raise ValueError(f"train.batch_size={self.train.batch_size} must be divisible by "
                       f"mesh.data * mesh.fsdp = {shards}")
    if self.mesh.context > 0 and self.train.seq_len % self.mesh.context:
      raise ValueError(f"train.seq_len={self.train.seq_len} must be divisible by "
                       f"mesh.context={self.mesh.context} (each device holds seq_len / context "
                       "positions)")


# ----------------------------------------------------------------------------- experiments


@dataclasses.dataclass(frozen=True)
class GridConfig:
  """The layer-wise hybrid grid (moba_jax/grid.py; docs/grid.md). Stage 1 pretrains once (the run
  config with the `pretrain` table applied, hybrid_full_layers = `pretrain_attention`); stage 2
  fine-tunes each (variant, seed) from it (the run config with the `sft` table applied,
  hybrid_full_layers = variant). `pretrain` and `sft` are typed tables of run-config keys, written
  `[grid.pretrain.train]` / `steps = 400` in a file and `grid.pretrain.train.steps=400` as an
  override."""

  out_dir: str = "runs/grid"
  seeds: tuple[int, ...] = (0, 1, 2)
  # hybrid_full_layers of each SFT variant: 0 = all MoBA, "all" = all full attention.
  variants: tuple[HybridFull, ...] = (0, 1, 3, 5, 10, "all")
  pretrain_attention: HybridFull = 0  # hybrid_full_layers of stage 1 (0 = MoBA, "all" = full)
  pretrain: Annotated[dict, Partial(Config)] = dataclasses.field(default_factory=dict)
  sft: Annotated[dict, Partial(Config)] = dataclasses.field(default_factory=dict)
  init_from: str = ""  # an existing pretrained run/checkpoint dir: skip stage 1
  stage: str = "all"  # "all", "pretrain" (stage 1 only) or "sft" (stage 2 only)
  only: Union[tuple[HybridFull, ...], HybridFull] = ()  # run only these variants; () = all
  only_seeds: Union[tuple[int, ...], int] = ()  # run only these seeds; () = all
  name: str = ""  # chart title (default: the experiment file's name)
  jax_cache: bool = True  # persistent compilation cache in <out_dir>/jax_cache (seeds reuse it)
  workers: int = 1  # runs at a time, as subprocesses spread over the GPUs (moba_jax/grid_pool.py)

  def __post_init__(self):
    for key in ("only", "only_seeds"):  # a scalar (grid.only=3) means one value
      if not isinstance(getattr(self, key), tuple):
        object.__setattr__(self, key, (getattr(self, key),))
    for key, values in (("seeds", self.seeds), ("variants", self.variants)):
      if not values or len(set(values)) != len(values):
        raise ValueError(f"grid.{key}={list(values)!r} must be a non-empty list without repeats")
    for s in self.seeds:
      _int("grid", "seeds[]", s, 0)
    for v in (*self.variants, self.pretrain_attention):
      if not (v == "all" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)):
        raise ValueError(f"grid variant {v!r} must be an integer >= 0 or 'all'")
    _choice("grid", "stage", self.stage, ("all", "pretrain", "sft"))
    _int("grid", "workers", self.workers, 1)
    for key, chosen, allowed in (("only", self.only, self.variants),
                                 ("only_seeds", self.only_seeds, self.seeds)):
      for v in chosen:
        _choice("grid", key, v, allowed)


STAGES = ("pretrain", "sft")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """An experiment (`moba-jax grid`): the run config every run starts from, and the grid. In a file
  the run's sections are at the top level and the grid is the [grid] table; a run's own
  config.toml holds only its Config."""

  run: Config = dataclasses.field(default_factory=Config)
  grid: GridConfig = dataclasses.field(default_factory=GridConfig)

  def __post_init__(self):
    for stage in STAGES:  # each stage's table must give a valid run config
      self.stage_config(stage)

  def stage_config(self, stage: str) -> Config:
    """The run config of `stage` ("pretrain" | "sft"): the base with the stage's table applied."""
    try:
      return config_from_dict(config_io.merge(config_to_dict(self.run), getattr(self.grid, stage)))
    except ValueError as e:
      raise ValueError(f"grid.{stage}: {e}") from None


# ----------------------------------------------------------------------------- public API


def config_from_dict(d: dict) -> Config:
  """Builds (and validates) a Config from a nested dict; missing keys take their defaults."""
  return config_io.build(Config, d)


def config_to_dict(cfg) -> dict:
  """Nested dict of plain values (tuples become lists): TOML/JSON-serialisable."""
  return config_io.to_dict(cfg)


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
  """Returns cfg with dotted `key=value` overrides applied (validated once, at the end)."""
  d = config_to_dict(cfg)
  for item in overrides:
    config_io.set_dotted(Config, d, *_override(item))
  return config_from_dict(d)


# Input paths that a file gives relative to itself (on the command line: to the cwd), in a run
# config and in each grid stage table.
FILE_RELATIVE = (("data", "path"), ("data", "tokenizer"), ("train", "init_from"))


def _override(item: str) -> tuple[str, Any]:
  """parse_override, with an input path (FILE_RELATIVE, in a run section or a grid stage table,
  or grid.init_from) given relative on the command line made absolute against the cwd: saved in
  a run's config.toml it would otherwise be read against that file's directory. URLs
  (gs://...) stay as they are."""
  key, value = parse_override(item)
  file_key = tuple(key.split(".")[-2:]) in FILE_RELATIVE or key == "grid.init_from"
  if (file_key and isinstance(value, str) and value and "://" not in value
      and not os.path.isabs(value)):
    value = os.path.abspath(value)
  return key, value


class ConfigFileError(ValueError):
  """A config file that does not parse: the message names the file; `why` is the parser's."""

  def __init__(self, path: str, why: str):
    super().__init__(f"{path}: {why}")
    self.why = why


def read_file(path: str) -> dict:
  """A TOML (or JSON) config file as a dict, its FILE_RELATIVE paths (and grid.init_from, and those
  of the grid's stage tables) made absolute against the file's directory. A file that does not
  parse raises ConfigFileError naming it."""
  kind = "JSON" if str(path).endswith(".json") else "TOML"
  with open(path, "rb") as f:
    try:
      d = json.load(f) if kind == "JSON" else tomllib.load(f)
    except (ValueError, UnicodeDecodeError) as e:  # TOMLDecodeError, JSONDecodeError
      raise ConfigFileError(str(path), f"not valid {kind} ({e})") from None
  if not isinstance(d, dict):
    raise ConfigFileError(str(path), f"not a {kind} table of config sections")
  base = os.path.dirname(os.path.abspath(path))
  grid = d.get("grid") if isinstance(d.get("grid"), dict) else {}
  tables = [d, *(grid.get(s) for s in STAGES if isinstance(grid.get(s), dict))]
  places = [(t.get(sec), key) for t in tables for sec, key in FILE_RELATIVE] + [(grid, "init_from")]
  for table, key in places:
    value = table.get(key) if isinstance(table, dict) else None
    if isinstance(value, str) and value and not os.path.isabs(value):
      table[key] = os.path.normpath(os.path.join(base, value))
  return d


def load_config(path: str | None = None, overrides: Sequence[str] = ()) -> Config:
  """A run's Config: a TOML (or JSON) file (None = defaults) with dotted overrides applied,
  validated once. An experiment file's [grid] table is not part of a run and is left out."""
  d = read_file(path) if path else {}
  d.pop("grid", None)
  config_io.check_keys(Config, d)
  for item in overrides:
    key, value = _override(item)
    if key.split(".")[0] == "grid":
      raise ValueError(f"{key!r} configures an experiment grid (moba-jax grid), not one run")
    config_io.set_dotted(Config, d, key, value)
  return config_from_dict(d)


def load_experiment_config(path: str | None = None,
                           overrides: Sequence[str] = ()) -> ExperimentConfig:
  """An experiment: the file's run sections and its [grid] table, with overrides (`grid.*` keys
  go to the grid, `grid.pretrain.train.steps=...` into a stage table), validated once."""
  d = read_file(path) if path else {}
  grid = d.pop("grid", {})
  config_io.check_keys(Config, d)
  for item in overrides:
    key, value = _override(item)
    if key.split(".")[0] == "grid":
      config_io.set_dotted(GridConfig, grid, key.partition(".")[2], value, prefix="grid.")
    else:
      config_io.set_dotted(Config, d, key, value)
  return ExperimentConfig(config_from_dict(d), config_io.build(GridConfig, grid, prefix="grid."))


def experiment_to_dict(exp: ExperimentConfig) -> dict:
  """The file form of an experiment: the run's sections, then the [grid] table."""
  return {**config_to_dict(exp.run), "grid": config_to_dict(exp.grid)}


def save_config(cfg: Config, path: str) -> None:
  """Writes cfg as TOML (or JSON if path ends in .json), atomically."""
  d = config_to_dict(cfg)
  text = json.dumps(d, indent=2) + "\n" if str(path).endswith(".json") else to_toml(d)
  atomic_write(path, text)
