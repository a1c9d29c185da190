"""`moba-jax generate CHECKPOINT --prompt TEXT`: continue text prompts with a trained model.

CHECKPOINT is a run dir (from `moba-jax train`, or one of a grid's: OUT/pretrain,
OUT/sft/<variant>/seed<S>) or its checkpoints/ dir; the newest restorable step is used. The model's
config is --config FILE when given (used in place of any saved config: the experiment it was
trained with), else the run's saved config.toml, else the one in the step's metadata; --set
KEY=VALUE changes it (moba.topk=4, moba.hybrid_full_layers=2, model.dtype=bfloat16, ...; not the
parameter shapes).

Tokens are the corpus task's: byte-level (moba_jax/data.py: BOS, then each UTF-8 byte + 3), or
those of the config's data.tokenizer or --tokenizer (a local tokenizer.json; moba_jax/tokenizer.py,
as a converted Hugging Face model's config sets it); generation of a prompt stops at EOS (any of
the model's end-of-sequence ids), after --max-new-tokens, or at the model's context
(train.seq_len). Decoding is exact MoBA with a KV cache (moba_jax/decode.py), greedy at
--temperature 0. The continuation streams to stdout as it is produced; with several prompts
(--prompt repeated, --prompt-file with one per line) they run as one batch and each continuation
is printed in order, followed by a newline.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from moba_jax import data as data_lib
from moba_jax import rundir
from moba_jax.cli import OneLineParser, UsageError, number_arg

TEXT_VOCAB = 256 + data_lib.BYTE_OFFSET  # PAD, BOS, EOS, then the 256 bytes
CONFIG_HELP = ("a config file used in place of the checkpoint's own (default: the run's saved "
               "config.toml, else the step's metadata)")


def parser() -> argparse.ArgumentParser:
  p = OneLineParser(prog="moba-jax generate", description=__doc__.splitlines()[0])
  p.add_argument("checkpoint", help="a run dir or its checkpoints/ dir")
  p.add_argument("--prompt", action="append", default=[], help="a text prompt; repeatable")
  p.add_argument("--prompt-file", help="a UTF-8 file of prompts, one per line")
  p.add_argument("--max-new-tokens", type=number_arg(int, 1), default=256)
  p.add_argument("--temperature", type=number_arg(float, 0), default=0.0,
                 help="0 = greedy (default); else sample softmax(logits / T)")
  p.add_argument("--seed", type=number_arg(int, 0), default=0, help="sampling seed")
  p.add_argument("--config", help=CONFIG_HELP)
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a config override (moba.topk=4); repeatable")
  p.add_argument("--tokenizer", help="a tokenizer.json (or its dir) instead of data.tokenizer's")
  return p


# ----------------------------------------------------------------------------- config and model


def latest_step(ckpt_dir: Path) -> int:
  """The newest complete step in ckpt_dir; ValueError if there is none."""
  from moba_jax import inspect as insp

  steps = [s["step"] for s in insp.list_steps(ckpt_dir) if s["complete"]]
  if not steps:
    raise ValueError(f"no complete checkpoint step in {ckpt_dir} (give a run dir or its "
                     "checkpoints/ dir; a grid's runs are OUT/pretrain and OUT/sft/VARIANT/seedS)")
  return steps[-1]


def _saved_config_dict(ckpt_dir: Path) -> dict | None:
  """The config in the newest complete step's metadata (moba_jax/checkpoint.py's `meta` item)."""
  meta = rundir.read_json(ckpt_dir / str(latest_step(ckpt_dir)) / "meta" / "metadata")
  return (meta or {}).get("config")


def _load_config_file(path: str, overrides, what: str):
  """config.load_config(path, overrides), its read and parse errors naming the file as `what`."""
  from moba_jax import config as config_lib

  try:
    return config_lib.load_config(path, overrides)
  except config_lib.ConfigFileError as e:
    raise ValueError(f"{what}: {e.why}") from None
  except OSError as e:
    raise OSError(f"{what}: {e.strerror or e}") from None


def load_tokenizer(flag: str | None, cfg):
  """--tokenizer's tokenizer when given (errors name the flag), else the config's data.tokenizer."""
  from moba_jax import tokenizer

  if not flag:
    return tokenizer.load(cfg.data.tokenizer)
  try:
    return tokenizer.load(flag)
  except ValueError as e:
    raise ValueError(f"--tokenizer {str(e).removeprefix('data.tokenizer=')}") from None


def checkpoint_config(ckpt_dir: Path, run_dir: Path | None, config_file: str | None, overrides):
  """The checkpoint's config with `overrides` applied, validated (ValueError naming the key): the
  file `config_file` when given (--config, in place of the saved one), else the run's config.toml,
  else the one in the newest step's metadata."""
  from moba_jax import config as config_lib
  from moba_jax import train

  shape_keys = {f"model.{k}" for k in train.SHAPE_KEYS}
  for item in overrides:
    if config_lib.parse_override(item)[0] in shape_keys:
      raise ValueError(f"--set {item}: that key fixes the shapes of the checkpoint's parameters")
  def load(overrides):
    if config_file is not None:
      return _load_config_file(config_file, overrides, f"--config {config_file!r}")
    if run_dir is not None and (run_dir / rundir.CONFIG).is_file():
      path = str(run_dir / rundir.CONFIG)
      return _load_config_file(path, overrides, path)
    saved = _saved_config_dict(ckpt_dir)
    if saved is None:
      raise ValueError(f"{ckpt_dir} has no saved config (no {rundir.CONFIG} beside it, none in "
                       "its step metadata): pass --config with the experiment it was trained with")
    saved.pop("grid", None)  # an experiment's table in older saves, not part of a run
    return config_lib.apply_overrides(config_lib.config_from_dict(saved), overrides)

  cfg = train.validate(load(overrides))
  if config_file is not None:  # its model must be the checkpoint's: else no step would restore
    if run_dir is not None and (run_dir / rundir.CONFIG).is_file():
      saved = config_lib.read_file(str(run_dir / rundir.CONFIG))
    else:
      saved = _saved_config_dict(ckpt_dir) or {}
    diff = train.shape_diff(saved.get("model") or {}, cfg.model) if saved else []
    if diff:
      raise ValueError(f"--config {config_file!r} is another model shape than the checkpoint's "
                       f"({'; '.join(diff)}): give the config it was trained with")
  trained = load([]).train.seq_len
  if cfg.train.seq_len > trained:
    print(f"note: train.seq_len={cfg.train.seq_len} is past the {trained} positions the model "
          "was trained on (its RoPE positions beyond them are unseen)", file=sys.stderr,
          flush=True)
  return cfg


def load_model(ckpt_dir: Path, cfg):
  """(Decoder with the newest restorable step's parameters, that step), on the default device."""
  import jax
  from flax import nnx

  from moba_jax import checkpoint as ckpt
  from moba_jax.model import Decoder

  with nnx.use_eager_sharding(False):
    abstract = nnx.eval_shape(lambda: Decoder(cfg.model, cfg.moba, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        nnx.to_pure_dict(state))
  absl = logging.getLogger("absl")  # Orbax's notes on opening a read-only manager are noise here
  level = absl.level
  absl.setLevel(logging.ERROR)
  try:
    step, params = ckpt.restore_params(str(ckpt_dir), target, name="CHECKPOINT")
  except FileNotFoundError:
    raise ValueError(f"no restorable checkpoint step in {ckpt_dir}") from None
  finally:
    absl.setLevel(level)
  nnx.replace_by_pure_dict(state, params)
  return nnx.merge(graphdef, state), step


# ----------------------------------------------------------------------------- text


def encode(text: str, tok=None) -> np.ndarray:
  """BOS, then the text's tokens (byte-level by default: each UTF-8 byte + BYTE_OFFSET); no EOS:
  it continues."""
  data = text.encode("utf-8")
  if tok is not None and not tok.byte_level:
    from moba_jax.tokenizer import with_specials

    return with_specials(tok, tok.encode(data), eos=False)
  return data_lib.text_tokens(data, 0, len(data) + 1)


def token_bytes(token: int) -> bytes:
  """The byte a token stands for; b"" for PAD, BOS, EOS and ids past the bytes."""
  byte = token - data_lib.BYTE_OFFSET
  return bytes([byte]) if 0 <= byte < 256 else b""


def read_prompts(args) -> list[str]:
  prompts = list(args.prompt)
  if args.prompt_file:
    try:
      prompts += Path(args.prompt_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
      raise ValueError(f"--prompt-file={args.prompt_file!r}: {e}") from None
  if not prompts:
    raise UsageError("give a prompt: --prompt TEXT or --prompt-file FILE")
  return prompts


def encode_all(prompts: list[str], context: int, tok=None) -> list[np.ndarray]:
  """Tokens of each prompt; ValueError naming the first one longer than the model's context (or
  empty: a tokenizer without BOS gives an empty prompt no tokens)."""
  encoded = [encode(p, tok) for p in prompts]
  what = "BOS and its UTF-8 bytes" if tok is None or tok.byte_level else f"by {tok.name}"
  for i, tokens in enumerate(encoded):
    if len(tokens) > context:
      raise ValueError(f"prompt {i + 1} ({prompts[i][:40]!r}...) has {len(tokens)} tokens "
                       f"({what}), more than the model's context train.seq_len={context}")
    if not len(tokens):
      raise ValueError(f"prompt {i + 1} is empty and the tokenizer has no BOS to start from")
  return encoded


# ----------------------------------------------------------------------------- generation


class Printer:
  """Streams each row's text to `out` in prompt order: the first unfinished row live, the
  others (buffered) once every row before them has finished; a newline ends each row."""

  def __init__(self, rows: int, out, tok=None):
    from moba_jax import tokenizer

    tok = tok or tokenizer.ByteTokenizer()
    self.out, self.shown = out, 0
    self.text = [""] * rows
    self.done = [False] * rows
    self.decoders = [tok.stream() for _ in range(rows)]

  def add(self, row: int, token: int | None, last: bool) -> None:
    self.text[row] += self.decoders[row](token, last)
    self.done[row] = last
    self._flush()

  def _flush(self) -> None:
    while self.shown < len(self.text):
      r = self.shown
      self.out.write(self.text[r])
      self.text[r] = ""
      if not self.done[r]:
        break
      self.out.write("\n")
      self.shown += 1
    self.out.flush()


def generate(model, prompts: list[np.ndarray], context: int, max_new: int, temperature: float,
             seed: int, out, tok=None) -> list[int]:
  """Continues every prompt (one batch), streaming text through a Printer (tok: the tokenizer,
  None = byte-level). Returns the rows that the model's context cut short (before EOS and
  max_new tokens)."""
  from moba_jax import decode

  stop_ids = tok.stop_ids if tok is not None else {data_lib.EOS}

  batch = len(prompts)
  lengths = np.array([len(p) for p in prompts], np.int32)
  tokens = np.zeros((batch, lengths.max()), np.int32)  # left-aligned, PAD after
  for row, p in enumerate(prompts):
    tokens[row, :len(p)] = p
  budget = np.minimum(max_new, context - lengths + 1)  # the last new token is never fed
  printer, produced = Printer(batch, out, tok), np.zeros(batch, np.int64)
  finished, cut = np.zeros(batch, bool), np.zeros(batch, bool)
  steps = decode.stream(decode.jit_decoding(model, context), tokens, lengths, int(budget.max()),
                        temperature=temperature, seed=seed)
  for nxt in steps:
    for row, token in enumerate(np.asarray(nxt).tolist()):
      if finished[row]:
        continue
      produced[row] += 1
      eos = token in stop_ids
      finished[row] = eos or produced[row] >= budget[row]
      cut[row] = finished[row] and not eos and budget[row] < max_new
      printer.add(row, None if eos else token, bool(finished[row]))  # a stop token is not text
    if finished.all():
      break
  steps.close()
  return np.flatnonzero(cut).tolist()


def check_text_model(cfg, tok=None) -> None:
  """ValueError unless the model's vocabulary holds the text tokens (byte-level, or `tok`'s); a
  note on stderr when it was trained on synthetic tokens (its text continuations will mean
  little)."""
  vocab, task = cfg.model.vocab_size, cfg.data.task
  if tok is not None and not tok.byte_level:
    if vocab < tok.vocab_size:
      raise ValueError(f"model.vocab_size={vocab} is smaller than the {tok.vocab_size} ids of "
                       f"the tokenizer {tok.name}")
    return
  if vocab < TEXT_VOCAB:
    raise ValueError(f"model.vocab_size={vocab} is smaller than the {TEXT_VOCAB} byte-level tokens "
                     f"text prompts need (this model was trained on data.task={task!r})")
  if task != "corpus":
    print(f"moba-jax generate: note: this model was trained on data.task={task!r} (synthetic "
          "tokens), not byte-level text", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
  from moba_jax import inspect as insp

  try:
    args = parser().parse_args(argv)
    prompts = read_prompts(args)
    ckpt_dir, run_dir = insp.resolve_dirs(args.checkpoint)
    latest_step(ckpt_dir)
    overrides = list(args.set)
    if args.tokenizer:  # checked first (errors name the flag); it replaces the config's
      load_tokenizer(args.tokenizer, None)
      overrides.append(f"data.tokenizer={args.tokenizer}")
    cfg = checkpoint_config(ckpt_dir, run_dir, args.config, overrides)
    tok = load_tokenizer(args.tokenizer, cfg)
    check_text_model(cfg, tok)
    encoded = encode_all(prompts, cfg.train.seq_len, tok)
    from moba_jax.train import check_attention_runs_here
    check_attention_runs_here(cfg)  # e.g. a GPU run's pallas_gpu, decoded on a CPU
    model, step = load_model(ckpt_dir, cfg)
  except (ValueError, OSError) as e:  # UsageError, FileNotFoundError included
    print(f"moba-jax generate: {e}", file=sys.stderr)
    return 2
  from moba_jax.train import attention_plan

  print(f"moba-jax generate: step {step} of {ckpt_dir}; attention: {attention_plan(cfg)}",
        file=sys.stderr, flush=True)
  for row in generate(model, encoded, cfg.train.seq_len, args.max_new_tokens, args.temperature,
                      args.seed, sys.stdout, tok):
    print(f"moba-jax generate: prompt {row + 1} stopped at the model's context "
          f"(train.seq_len={cfg.train.seq_len})", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
