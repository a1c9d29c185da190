"""`moba-jax convert`: Hugging Face Llama-family checkpoints in and out.

  moba-jax convert hf-to-orbax HF_DIR OUT [KEY=VALUE ...]
  moba-jax convert orbax-to-hf CKPT OUT [--dtype D] [--like HF_DIR] [--shard-gb G] [--set K=V]

hf-to-orbax reads a local LlamaForCausalLM or Qwen2ForCausalLM directory (config.json and
model.safetensors, or the shards model.safetensors.index.json names; nothing is downloaded) and
writes a run dir OUT that `train.init_from=OUT`, `moba-jax inspect OUT` and `moba-jax generate OUT`
take: OUT/config.toml (the model; every layer full attention; the tokenizer when HF_DIR has a
tokenizer.json), OUT/checkpoints/0 (params and meta, as `moba-jax train` saves them) and OUT/hf/
(HF_DIR's config, generation config and tokenizer files, for the way back). Each array is placed
with its logical axes' NamedSharding as it is read (default mesh: fsdp over every device), so a
model larger than one device loads; KEY=VALUE are run-config overrides (model.dtype=bfloat16,
mesh.tensor=2, train.seq_len=8192; not the keys config.json fixes).

orbax-to-hf writes OUT/config.json and model safetensors (sharded over --shard-gb files with an
index) from a run dir's newest step, in --dtype (default: model.dtype), with the tokenizer files of
--like (default: the run's hf/ dir, else the directory of its data.tokenizer) copied beside them.

Layouts: HF's Linear weight [out, in] is our [in, ...] transposed; q/k/v [H*D, E] become
[E, H, D], o_proj [E, H*D] becomes [H, D, E]. Both sides rotate half-split RoPE pairs (HF's
rotate_half), so no head permutation is needed. Parameters go float32 by default
(model.param_dtype): exact for bfloat16 and float16 weights, so hf -> orbax -> hf is bit-exact.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from moba_jax import rundir
from moba_jax.config import ModelConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json")
TOKENIZER_FILES = HF_FILES[2:]
INDEX = "model.safetensors.index.json"
DTYPES = ("float32", "bfloat16", "float16")
# The per-layer tensors: our path in a block -> (HF name in model.layers.N, layout).
_LAYER = {
    "attn_norm/scale": ("input_layernorm.weight", "copy"),
    "attn/wq": ("self_attn.q_proj.weight", "in_heads"),
    "attn/wk": ("self_attn.k_proj.weight", "in_heads"),
    "attn/wv": ("self_attn.v_proj.weight", "in_heads"),
    "attn/bq": ("self_attn.q_proj.bias", "heads"),
    "attn/bk": ("self_attn.k_proj.bias", "heads"),
    "attn/bv": ("self_attn.v_proj.bias", "heads"),
    "attn/wo": ("self_attn.o_proj.weight", "out_heads"),
    "mlp_norm/scale": ("post_attention_layernorm.weight", "copy"),
    "mlp/w_gate": ("mlp.gate_proj.weight", "t"),
    "mlp/w_up": ("mlp.up_proj.weight", "t"),
    "mlp/w_down": ("mlp.down_proj.weight", "t"),
}
_TOP = {"embed": ("model.embed_tokens.weight", "copy"),
        "final_norm/scale": ("model.norm.weight", "copy"), "head": ("lm_head.weight", "t")}
_IGNORED = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved


class ConvertError(ValueError):
  """A checkpoint or request that cannot be converted; the message names what and why."""


# ----------------------------------------------------------------------------- configs


def read_hf_config(hf_dir: Path, name: str = "HF_DIR") -> dict:
  """config.json of a local HF model directory; `name`: the argument it came from (errors)."""
  path = hf_dir / "config.json"
  if not path.is_file():
    what = "no such directory" if not hf_dir.is_dir() else "it has no config.json"
    raise ConvertError(f"{name} {str(hf_dir)!r}: {what} (a local Hugging Face model directory)")
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise ConvertError(f"{path}: not valid JSON ({e})") from None


def _rope_keys(hf: dict) -> dict:
  """ModelConfig's rope_* keys from config.json's rope_parameters (or the older rope_theta and
  rope_scaling)."""
  params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  kind = params.get("rope_type", params.get("type", "default"))
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ConvertError("partial_rotary_factor != 1 is not supported (RoPE on every head dim)")
  def number(key, default=None):
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConvertError(f"config.json rope {key}={value!r} must be a number")
    return value

  out = {"rope_theta": float(theta)}
  if kind == "linear":
    out.update(rope_scaling="linear", rope_factor=float(number("factor")))
  elif kind == "llama3":
    out.update(rope_scaling="llama3", rope_factor=float(number("factor")),
               rope_low_freq_factor=float(number("low_freq_factor")),
               rope_high_freq_factor=float(number("high_freq_factor")),
               rope_original_max_len=int(number("original_max_position_embeddings",
                                                hf.get("max_position_embeddings"))))
  elif kind != "default":
    raise ConvertError(f"rope_type {kind!r} is not supported; accepted: 'default', 'linear', "
                       "'llama3'")
  return out


def _check_supported(hf: dict) -> str:
  """The family ('llama' | 'qwen2'); ConvertError naming the first feature we lack."""
  arch = (hf.get("architectures") or [None])[0]
  if arch not in ARCHITECTURES:
    raise ConvertError(f"architecture {arch!r} is not supported; accepted: "
                       f"{list(ARCHITECTURES)}")
  checks = [("hidden_act", hf.get("hidden_act", "silu") == "silu", "'silu'"),
            ("pretraining_tp", hf.get("pretraining_tp", 1) in (1, None), "1"),
            ("mlp_bias", not hf.get("mlp_bias"), "false"),
            ("attention_bias", not hf.get("attention_bias"), "false (Llama's bias on o_proj too)"),
            ("use_sliding_window", not hf.get("use_sliding_window"), "false")]
  for key, ok, accepted in checks:
    if not ok:
      raise ConvertError(f"config.json {key}={hf.get(key)!r} is not supported; accepted: "
                         f"{accepted}")
  return ARCHITECTURES[arch]


def hf_dtype(hf: dict) -> str:
  """config.json's dtype (torch_dtype in older files) if we know it, else float32."""
  name = str(hf.get("dtype") or hf.get("torch_dtype") or "float32").replace("torch.", "")
  return name if name in DTYPES else "float32"


def _required(hf: dict, key: str) -> int:
  if not isinstance(hf.get(key), int):
    raise ConvertError(f"config.json {key}={hf.get(key)!r} must be an integer")
  return hf[key]


def model_config(hf: dict) -> ModelConfig:
  """Our ModelConfig of a Llama-family config.json (compute dtype: the checkpoint's)."""
  family = _check_supported(hf)
  d_model, heads = _required(hf, "hidden_size"), _required(hf, "num_attention_heads")
  return ModelConfig(
      vocab_size=_required(hf, "vocab_size"), d_model=d_model,
      n_layers=_required(hf, "num_hidden_layers"), n_heads=heads,
      n_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or d_model // heads),
      mlp_dim=_required(hf, "intermediate_size"), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), tied_head_scale="none",
      qkv_bias=family == "qwen2", dtype=hf_dtype(hf), param_dtype="float32", **_rope_keys(hf))


def _rope_parameters(m: ModelConfig) -> dict:
  out = {"rope_theta": m.rope_theta, "rope_type": "default"}
  if m.rope_scaling == "linear":
    out.update(rope_type="linear", factor=m.rope_factor)
  elif m.rope_scaling == "llama3":
    out.update(rope_type="llama3", factor=m.rope_factor, low_freq_factor=m.rope_low_freq_factor,
               high_freq_factor=m.rope_high_freq_factor,
               original_max_position_embeddings=m.rope_original_max_len)
  return out


def hf_config(m: ModelConfig, template: dict | None, dtype: str, context: int) -> dict:
  """config.json of our model: `template` (the original's) with every model field set from `m`.
  Qwen2 when the model has q/k/v biases, else Llama."""
  arch = "Qwen2ForCausalLM" if m.qkv_bias else "LlamaForCausalLM"
  d = dict(template or {}) if (template or {}).get("architectures") == [arch] else {}
  for old in ("rope_scaling", "rope_theta", "torch_dtype"):
    d.pop(old, None)
  d.update(architectures=[arch], model_type=ARCHITECTURES[arch], vocab_size=m.vocab_size,
           hidden_size=m.d_model, intermediate_size=m.mlp_dim, num_hidden_layers=m.n_layers,
           num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, head_dim=m.head_dim,
           hidden_act="silu", rms_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings,
           rope_parameters=_rope_parameters(m), dtype=dtype)
  d.setdefault("max_position_embeddings", context)
  # The pre-5 transformers keys too: readers that know only them would otherwise load theta 10000
  # without scaling, a different model, silently.
  rope = d["rope_parameters"]
  d["rope_theta"] = rope["rope_theta"]
  if rope["rope_type"] != "default":
    d["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
  if m.qkv_bias:
    d.update(use_sliding_window=False, layer_types=["full_attention"] * m.n_layers)
    d.setdefault("max_window_layers", m.n_layers)
  else:
    d.update(attention_bias=False, mlp_bias=False)
  return d


# ----------------------------------------------------------------------------- tensor layouts


def hf_shape(layout: str, shape: tuple) -> tuple:
  """The HF shape of our parameter of `shape` stored in `layout`."""
  if layout == "copy":
    return tuple(shape)
  if layout == "heads":
    return (math.prod(shape),)
  if layout == "out_heads":
    return (shape[-1], math.prod(shape[:-1]))
  return (math.prod(shape[1:]), shape[0])  # t, in_heads


def to_ours(layout: str, w: np.ndarray, shape: tuple) -> np.ndarray:
  """An HF tensor in our layout `shape`."""
  if layout == "copy":
    return w
  if layout == "heads":  # [H*D] -> [H, D]
    return w.reshape(shape)
  if layout == "t":  # [out, in] -> [in, out]
    return w.T
  if layout == "in_heads":  # [H*D, E] -> [E, H, D]
    return w.T.reshape(shape)
  return w.T.reshape(shape)  # out_heads: [E, H*D] -> [H, D, E]


def to_hf(layout: str, x: np.ndarray) -> np.ndarray:
  """Our array in HF's layout (contiguous)."""
  if layout == "heads":  # [H, D] -> [H*D]
    x = x.reshape(-1)
  elif layout in ("t", "in_heads"):  # [in, out...] -> [out, in]
    x = x.reshape(x.shape[0], -1).T
  elif layout == "out_heads":  # [H, D, E] -> [E, H*D]
    x = x.reshape(-1, x.shape[-1]).T
  return np.ascontiguousarray(x)


def key_path(path) -> str:
  """'layers/3/attn/wq' of a pytree key path."""
  import jax

  return jax.tree_util.keystr(path, simple=True, separator="/")


def hf_name(path: str) -> tuple[str, str]:
  """(HF tensor name, layout) of our parameter path 'layers/3/attn/wq'."""
  if path.startswith("layers/"):
    _, i, rest = path.split("/", 2)
    name, layout = _LAYER[rest]
    return f"model.layers.{i}.{name}", layout
  return _TOP[path]


# ----------------------------------------------------------------------------- safetensors


class Tensors:
  """The tensors of a local safetensors checkpoint (one file, or the shards of an index), read
  one at a time as numpy arrays (bfloat16 through ml_dtypes)."""

  def __init__(self, hf_dir: Path):
    index = hf_dir / INDEX
    if index.is_file():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (ValueError, KeyError, TypeError) as e:
        raise ConvertError(f"{index}: not a safetensors index (no weight_map: "
                           f"{type(e).__name__}: {e})") from None
      if not isinstance(weight_map, dict):
        raise ConvertError(f"{index}: weight_map is {type(weight_map).__name__}, not an object")
    elif (hf_dir / "model.safetensors").is_file():
      with _opened(hf_dir / "model.safetensors") as f:
        weight_map = {k: "model.safetensors" for k in f.keys()}
    else:
      raise ConvertError(f"{hf_dir}: no model.safetensors or {INDEX} (only safetensors "
                         "checkpoints are read)")
    self.dir, self.files = hf_dir, weight_map

  def get(self, name: str) -> np.ndarray:
    if name not in self.files:
      raise ConvertError(f"{self.dir}: no tensor {name!r} in the checkpoint")
    path = self.dir / self.files[name]
    with _opened(path) as f:
      try:
        return f.get_tensor(name)
      except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise ConvertError(f"{path}: tensor {name!r} does not read ({e}); a partial "
                           "download?") from None


@contextlib.contextmanager
def _opened(path: Path):
  """safetensors' safe_open, its errors (a missing, truncated or corrupt file) as one line."""
  from safetensors import safe_open

  try:
    f = safe_open(path, framework="numpy")
  except Exception as e:  # noqa: BLE001 - SafetensorError is not an OSError or ValueError
    raise ConvertError(f"{path}: not a readable safetensors file ({e}); a partial "
                       "download?") from None
  with f:
    yield f


def write_safetensors(out: Path, tensors: list[tuple[str, int, object]], max_bytes: int) -> int:
  """Writes (name, nbytes, make_array) in order into files of at most max_bytes (a tensor larger
  than that gets its own), with an index when there is more than one. -> the file count."""
  from safetensors.numpy import save_file

  shards, size = [[]], 0
  for item in tensors:
    if shards[-1] and size + item[1] > max_bytes:
      shards.append([])
      size = 0
    shards[-1].append(item)
    size += item[1]
  names = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  for fname, shard in zip(names, shards):
    save_file({name: make() for name, _, make in shard}, out / fname, metadata={"format": "pt"})
    os.chmod(out / fname, rundir.created_file_mode())  # safetensors creates 0600
  if len(shards) > 1:
    index = {"metadata": {"total_size": sum(t[1] for t in tensors)},
             "weight_map": {name: f for f, s in zip(names, shards) for name, _, _ in s}}
    rundir.atomic_write(out / INDEX, json.dumps(index, indent=2) + "\n")
  return len(shards)


# ----------------------------------------------------------------------------- hf -> orbax


def run_config(hf: dict, out: Path, hf_dir: Path, overrides) -> object:
  """The converted run's Config: every layer full attention (as the model was trained), its
  context (train.seq_len) up to 8192, HF_DIR's tokenizer if it has one, params sharded over every
  device (mesh.fsdp=-1); then `overrides`, which may not change what config.json fixed."""
  from moba_jax import config as config_lib
  from moba_jax import data as data_lib
  from moba_jax import train

  m = model_config(hf)
  tokenizer = hf_dir / "tokenizer.json" if (hf_dir / "tokenizer.json").is_file() else None
  text = tokenizer is not None or m.vocab_size >= data_lib.MIN_VOCAB["corpus"]
  d = {"run_dir": str(out), "model": config_lib.config_to_dict(m),
       "moba": {"hybrid_full_layers": "all"},
       "train": {"seq_len": min(int(hf.get("max_position_embeddings") or 4096), 8192)},
       "data": {"task": "corpus" if text else "lm", "tokenizer": str(tokenizer or "")},
       "mesh": {"data": 1, "fsdp": -1}}
  cfg = config_lib.apply_overrides(config_lib.config_from_dict(d), overrides)
  fixed = [f"model.{k}" for k, v in config_lib.config_to_dict(m).items()
           if k not in ("dtype", "param_dtype", "remat") and getattr(cfg.model, k) != v]
  if fixed:
    raise ConvertError(f"{', '.join(fixed)}: config.json fixes these; only model.dtype, "
                       "model.param_dtype and model.remat may be set")
  return train.validate(cfg)


def abstract_params(cfg):
  """(pure dict of ShapeDtypeStructs, pure dict of NamedShardings) of cfg's Decoder on its mesh."""
  from flax import nnx

  from moba_jax import sharding as shd
  from moba_jax.model import Decoder

  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: Decoder(cfg.model, cfg.moba, rngs=nnx.Rngs(0)))
  state = nnx.state(abstract, nnx.Param)
  mesh = shd.make_mesh(cfg.mesh)
  shardings = shd.state_shardings(state, mesh, shd.rules_from_config(cfg.mesh))
  return nnx.to_pure_dict(state), nnx.to_pure_dict(shardings)


def _check_names(tensors: Tensors, used: set[str], cfg) -> None:
  left = [n for n in tensors.files if n not in used and not n.endswith(_IGNORED)
          and not (cfg.model.tie_embeddings and n == "lm_head.weight")]
  if left:
    raise ConvertError(f"{tensors.dir}: {len(left)} tensors have no place in the model "
                       f"({', '.join(sorted(left)[:4])}); its config.json and weights disagree")


def load_params(tensors: Tensors, cfg) -> dict:
  """Our parameters (pure dict of jax.Arrays), each placed with its NamedSharding as it is read:
  a device receives only its shard; the host holds one tensor at a time."""
  import jax

  target, shardings = abstract_params(cfg)
  used = set()

  def place(path, leaf, sharding):
    name, layout = hf_name(key_path(path))
    used.add(name)
    w = tensors.get(name)
    if tuple(w.shape) != hf_shape(layout, leaf.shape):
      raise ConvertError(f"{name}: shape {list(w.shape)} does not fit our {key_path(path)} "
                         f"{list(leaf.shape)} (HF shape {list(hf_shape(layout, leaf.shape))}): "
                         "config.json and weights disagree")
    x = to_ours(layout, w, leaf.shape).astype(leaf.dtype)
    return jax.make_array_from_callback(leaf.shape, sharding, lambda idx: x[idx])

  params = jax.tree_util.tree_map_with_path(place, target, shardings)
  _check_names(tensors, used, cfg)
  return params


def hf_to_orbax(hf_dir: str, out: str, overrides=()) -> object:
  """Converts HF_DIR into the run dir OUT (see the module doc). -> OUT's Config."""
  import jax

  from moba_jax import checkpoint as ckpt
  from moba_jax.config import config_to_dict, save_config

  hf_dir, out = Path(hf_dir).resolve(), Path(out).resolve()
  hf = read_hf_config(hf_dir)
  check_out(out)
  cfg = run_config(hf, out, hf_dir, overrides)
  params = load_params(Tensors(hf_dir), cfg)
  own_tokenizer = cfg.data.tokenizer == str(hf_dir / "tokenizer.json")
  if own_tokenizer:  # the run dir's own copy
    tokenizer = str(out / rundir.HF / "tokenizer.json")
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=tokenizer))
  first = jax.process_index() == 0
  meta = {"step": 0, "config": config_to_dict(cfg),
          "converted_from": {"dir": str(hf_dir), "architecture": hf["architectures"][0]}}
  with rundir.staged_dir(out, main=first) as stage:  # OUT appears whole, or not at all
    if first:
      (stage / rundir.HF).mkdir()
      for name in HF_FILES:
        if (hf_dir / name).is_file():
          shutil.copy2(hf_dir / name, stage / rundir.HF / name)
    ckpt.save_params(str(stage), params, meta)  # every process writes its shards
    if first:  # the tokenizer relative to the run dir (config files resolve it): OUT may move
      saved = cfg if not own_tokenizer else dataclasses.replace(cfg, data=dataclasses.replace(
          cfg.data, tokenizer=f"{rundir.HF}/tokenizer.json"))
      save_config(saved, str(stage / rundir.CONFIG))
  return cfg


def check_out(out: Path) -> None:
  """ConvertError unless OUT can be written (missing, or an empty directory, in a writable
  place): before any weight is read."""
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise ConvertError(f"OUT {str(out)!r} exists and is not an empty directory; choose a new "
                       "directory")
  why = rundir.why_unwritable(out, directory=True)
  if why:
    raise ConvertError(f"OUT {str(out)!r}: {why}")


# ----------------------------------------------------------------------------- orbax -> hf


def _template_dir(run_dir: Path | None, cfg, like: str | None) -> Path | None:
  """Where the original's config.json and tokenizer files are: --like, the run's hf/, or the
  directory of its data.tokenizer."""
  if like:
    return Path(like)
  candidates = [run_dir / rundir.HF] if run_dir else []
  if cfg.data.tokenizer:
    candidates.append(Path(cfg.data.tokenizer).parent)
  return next((c for c in candidates if (c / "config.json").is_file()), None)


def export_tensors(params: dict, cfg, dtype: str) -> list[tuple[str, int, object]]:
  """(HF name, bytes, make array) of every tensor, in HF's order. A tied head scaled by
  d_model ** -0.5 (our default, model.tied_head_scale) is folded into the final norm."""
  import jax
  import ml_dtypes

  np_dtype = np.dtype(dtype if dtype != "bfloat16" else ml_dtypes.bfloat16)
  fold = cfg.model.tie_embeddings and cfg.model.tied_head_scale == "rsqrt_d_model"
  items = []
  for path, arr in jax.tree_util.tree_flatten_with_path(params)[0]:
    name, layout = hf_name(key_path(path))
    scale = cfg.model.d_model ** -0.5 if fold and name == "model.norm.weight" else None

    def make(arr=arr, layout=layout, scale=scale):
      x = np.asarray(jax.device_get(arr))
      x = x.astype(np.float32) * np.float32(scale) if scale is not None else x
      return to_hf(layout, x).astype(np_dtype)
    items.append((name, math.prod(arr.shape) * np_dtype.itemsize, make))
  order = lambda item: [int(p) if p.isdigit() else p for p in item[0].split(".")]
  return sorted(items, key=order)


def orbax_to_hf(ckpt_path: str, out: str, dtype: str | None = None, like: str | None = None,
                shard_gb: float = 4.0, overrides=()) -> tuple[Path, int]:
  """Writes the newest step that restores of a run dir as a Hugging Face checkpoint in OUT
  (naming on stderr a newer one that did not, and MoBA layers, which transformers runs as full
  attention). -> (OUT, the step written)."""
  import jax

  from moba_jax import checkpoint as ckpt
  from moba_jax import generate
  from moba_jax import inspect as insp

  if jax.process_count() > 1:
    raise ConvertError("orbax-to-hf runs in one process (it gathers every array on the host)")
  ckpt_dir, run_dir = insp.resolve_dirs(ckpt_path)
  newest = generate.latest_step(ckpt_dir)
  one_device_group = ["mesh.data=1", "mesh.fsdp=-1", "mesh.context=1", "mesh.tensor=1"]
  cfg = generate.checkpoint_config(ckpt_dir, run_dir, None, [*one_device_group, *overrides])
  dtype = dtype or cfg.model.dtype
  out = Path(out).resolve()
  check_out(out)
  tdir = _template_dir(run_dir, cfg, like)
  template = read_hf_config(tdir, "--like" if like else "the template") if tdir else None
  target, shardings = abstract_params(cfg)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        target, shardings)
  absl = logging.getLogger("absl")  # Orbax's notes on opening a read-only manager are noise here
  level = absl.level
  absl.setLevel(logging.ERROR)
  try:
    step, params = ckpt.restore_params(str(ckpt_dir), target, name="CKPT")
  finally:
    absl.setLevel(level)
  if step != newest:
    print(f"moba-jax convert: note: exporting step {step}: the newest, {newest}, did not "
          "restore (the warnings above)", file=sys.stderr)
  from moba_jax.config import layer_kinds
  moba_layers = layer_kinds(cfg.model.n_layers, cfg.moba.hybrid_full_layers).count("moba")
  if moba_layers:
    print(f"moba-jax convert: note: {moba_layers} of {cfg.model.n_layers} layers are MoBA "
          f"(block {cfg.moba.block_size}, top-{cfg.moba.topk}); transformers runs every layer as "
          "full attention, so its outputs differ once a sequence has more than top-k blocks",
          file=sys.stderr)
  with rundir.staged_dir(out) as stage:  # OUT appears whole (weights, config, tokenizer) or not
    write_safetensors(stage, export_tensors(params, cfg, dtype), int(shard_gb * 2 ** 30))
    config = hf_config(cfg.model, template, dtype, cfg.train.seq_len)
    if template is None and not cfg.data.tokenizer:  # a native run: our own ids (data.py)
      from moba_jax import data as data_lib
      config.update(bos_token_id=data_lib.BOS, eos_token_id=data_lib.EOS,
                    pad_token_id=data_lib.PAD)
    rundir.atomic_write(stage / "config.json", json.dumps(config, indent=2) + "\n")
    for name in (("generation_config.json",) + TOKENIZER_FILES) if tdir else ():
      if (tdir / name).is_file():
        shutil.copy2(tdir / name, stage / name)
  return out, step


# ----------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
  from moba_jax.cli import OneLineParser, number_arg

  p = OneLineParser(prog="moba-jax convert", description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="direction", required=True, parser_class=OneLineParser,
                         metavar="{hf-to-orbax,orbax-to-hf}")
  a = sub.add_parser("hf-to-orbax", help="a local Hugging Face model dir -> a run dir")
  a.add_argument("hf_dir")
  a.add_argument("out")
  a.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
  b = sub.add_parser("orbax-to-hf", help="a run dir's newest step -> a Hugging Face model dir")
  b.add_argument("checkpoint")
  b.add_argument("out")
  b.add_argument("--dtype", choices=DTYPES, help="tensor dtype (default: model.dtype)")
  b.add_argument("--like", help="an HF model dir whose config.json and tokenizer files to keep")
  b.add_argument("--shard-gb", type=number_arg(float, 1e-6), default=4.0,
                 help="largest safetensors file (GiB)")
  b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a config override; repeatable")
  return p


def main(argv: list[str] | None = None) -> int:
  try:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.direction == "hf-to-orbax":
      cfg = hf_to_orbax(args.hf_dir, args.out, args.overrides)
      m = cfg.model
      print(f"moba-jax convert: {args.out}: {m.n_layers} layers, d_model {m.d_model}, "
            f"{m.n_heads}/{m.n_kv_heads} heads, params {m.param_dtype}; continue training with "
            f"train.init_from={args.out}")
    else:
      out, step = orbax_to_hf(args.checkpoint, args.out, args.dtype, args.like, args.shard_gb,
                              args.set)
      print(f"moba-jax convert: wrote {out} (step {step})")
  except (ValueError, OSError) as e:  # ConvertError and UsageError included
    print(f"moba-jax convert: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
