"""`moba-jax eval CHECKPOINT`: long-context retrieval (passkey, needle in a haystack) at inference.

For every context length L (--lengths) and needle depth d in [0, 1] (--depths), --samples prompts:
a haystack with a needle holding a random --digits-digit key at relative depth d, then a question
whose answer is the key. Each example has exactly L tokens, answer included:

  BOS haystack[:a] NEEDLE haystack[a:] QUESTION ANSWER      a = round(d * haystack tokens)

  passkey  NEEDLE  "\\nThe pass key is 48213. Remember it.\\n"
           QUESTION "\\nWhat is the pass key? The pass key is "            ANSWER "48213"
  needle   NEEDLE  "\\nThe magic number for falcon is 48213.\\n"         (the word varies too)
           QUESTION "\\nWhat is the magic number for falcon? The magic number for falcon is "
                                                                        ANSWER "48213"

Text is byte-level (moba_jax/data.py: BOS, then each UTF-8 byte + 3). The haystack (--haystack) is
`corpus` (default): the held-out split of the checkpoint's own corpus (data.path), else the default
code corpus, else the synthetic filler; a corpus directory or .jsonl file; or `synthetic`, the
classic passkey filler ("The grass is green. ..."). Every depth of one (length, sample) shares its
key and haystack, so depths are compared on the same text. A model trained on the synthetic
`passkey` task (data.task=passkey) is scored in that task's own tokens instead: BOS, its Markov
filler around NEEDLE d.., then QUERY ANS d.. (data.passkey_example without the EOS).

Scoring is exact match of the answer. --mode forward (default) scores teacher-forced argmax over
the answer tokens in one forward pass; --mode decode generates the answer greedily with the KV
cache (moba_jax/decode.py). The two agree exactly: greedy decoding gets every answer token right
iff each teacher-forced argmax is right. Both report the mean answer-token NLL (teacher-forced; in
decode mode through the cache, from rows fed the true answer beside the greedy ones).

--set changes the attention of the same weights: `--set moba.hybrid_full_layers=all` scores the
checkpoint with full attention, `--set moba.topk=4` with another MoBA gate. Results go to --out
(default RUN_DIR/eval_<task>): retrieval.json (settings, checkpoint step, per-cell accuracy, n and
mean answer NLL), retrieval.md (the tables, also printed) and retrieval.png (a depth x length
heatmap), each written atomically; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Sequence

import numpy as np

from moba_jax import data as data_lib
from moba_jax import generate as gen
from moba_jax.cli import OneLineParser, UsageError, number_arg
from moba_jax import rundir

TASKS = ("passkey", "needle")
MODES = ("forward", "decode")
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
FILLER = (b"The grass is green. The sky is blue. The sun is yellow. Here we go. "
          b"There and back again. ")
WORDS = ("falcon", "harbor", "violet", "copper", "meadow", "lantern", "glacier", "pepper",
         "orchid", "thunder", "marble", "willow", "saddle", "comet", "tundra", "juniper")
RESULT = "retrieval"  # retrieval.json, retrieval.md, retrieval.png
PROG = "moba-jax eval"
HAYSTACKS = ("corpus (the checkpoint's held-out text), synthetic, a corpus directory (`moba-jax "
             "data`) or a .jsonl file")



# ----------------------------------------------------------------------------- command line


def _csv(kind, what: str):
  """An argparse type: comma-separated values of `kind` (argparse names the flag on error)."""
  def parse(text):
    try:
      values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
      values = None
    if not values:
      raise argparse.ArgumentTypeError(f"{text!r} must be comma-separated {what}")
    return values
  return parse


def parser() -> argparse.ArgumentParser:
  p = OneLineParser(prog=PROG, description=__doc__.splitlines()[0])
  p.add_argument("checkpoint", help="a run dir or its checkpoints/ dir")
  p.add_argument("--task", choices=TASKS, default="passkey")
  p.add_argument("--lengths", type=_csv(int, "integers"), default=None,
                 help="example lengths in tokens, answer included (default: train.seq_len and "
                      "its halvings, at most 4, that fit the prompt)")
  p.add_argument("--depths", type=_csv(float, "numbers in [0, 1]"), default=list(DEFAULT_DEPTHS),
                 help="relative needle depths in the haystack (default 0,0.25,0.5,0.75,1)")
  p.add_argument("--samples", type=number_arg(int, 1), default=10, help="prompts per cell")
  p.add_argument("--seed", type=number_arg(int, 0), default=0)
  p.add_argument("--digits", type=number_arg(int, 1), default=None,
                 help="digits of the key (default: the config's data.passkey_len)")
  p.add_argument("--haystack", default="corpus",
                 help="corpus (default: the checkpoint's held-out text), synthetic, a corpus "
                      "dir or a .jsonl file")
  p.add_argument("--mode", choices=MODES, default="forward")
  p.add_argument("--batch-size", type=number_arg(int, 1), default=16,
                 help="prompts per forward pass")
  p.add_argument("--out", default=None, help="output dir (default: RUN_DIR/eval_<task>)")
  p.add_argument("--config", help=gen.CONFIG_HELP)
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a config override (moba.hybrid_full_layers=all); repeatable")
  return p


def check_depths(depths: Sequence[float]) -> list[float]:
  for d in depths:
    if not (math.isfinite(d) and 0.0 <= d <= 1.0):
      raise UsageError(f"--depths: {d!r} is not in [0, 1]")
  if len(set(depths)) != len(depths):
    raise UsageError(f"--depths: {','.join(map(str, depths))} repeats a depth")
  return list(depths)


def check_lengths(lengths: Sequence[int] | None, min_len: int, context: int) -> list[int]:
  """The lengths to score (default: `context` and its halvings down to min_len, at most 4);
  UsageError naming a length that is too short for the prompt or longer than the context."""
  if min_len > context:
    raise UsageError(f"the shortest prompt ({min_len} tokens with no haystack) does not fit the "
                     f"model's context train.seq_len={context}")
  if lengths is None:
    lengths, n = [], context
    while n >= min_len and len(lengths) < 4:
      lengths.insert(0, n)
      n //= 2
    return lengths
  for n in lengths:
    if n > context:
      raise UsageError(f"--lengths: {n} is longer than the model's context "
                       f"train.seq_len={context}")
    if n < min_len:
      raise UsageError(f"--lengths: {n} is shorter than the {min_len} tokens the prompt takes "
                       "with no haystack")
  if len(set(lengths)) != len(lengths):
    raise UsageError(f"--lengths: {','.join(map(str, lengths))} repeats a length")
  return list(lengths)


# ----------------------------------------------------------------------------- haystacks


def _byte_tokens(data: bytes) -> np.ndarray:
  """The tokens of the bytes alone (no BOS, no EOS)."""
  return data_lib.text_tokens(data, 1, len(data) + 1)


class FillerHaystack:
  """The classic passkey filler sentences, repeated (the same text for every sample)."""

  description = "synthetic filler ('The grass is green. ...')"

  def tokens(self, rng, n: int) -> np.ndarray:
    del rng
    return _byte_tokens((FILLER * (n // len(FILLER) + 1))[:n])


class CorpusHaystack:
  """Text of one corpus split: from a random line start of a random document on, the following
  documents joined by newlines, cut at n bytes."""

  def __init__(self, split, description: str):
    if not len(split) or not int(np.asarray(split.sizes).sum()):
      raise ValueError(f"{description} holds no text")
    self.split, self.description = split, description

  def tokens(self, rng, n: int) -> np.ndarray:
    split = self.split
    i = int(rng.integers(len(split)))
    doc = split[i]
    cut = int(rng.integers(len(doc)))
    start = doc.rfind(b"\n", 0, cut) + 1  # a line start (0 when none)
    parts, have = [doc[start:]], len(doc) - start
    while have < n:
      i = (i + 1) % len(split)
      parts.append(b"\n" + split[i])
      have += len(parts[-1])
    return _byte_tokens(b"".join(parts)[:n])


class MarkovHaystack:
  """The synthetic tasks' Markov filler (data.MarkovText of the checkpoint's data.seed)."""

  def __init__(self, cfg):
    self.text = data_lib.MarkovText(cfg.data.seed, cfg.model.vocab_size)
    self.description = f"the passkey task's Markov filler (data.seed={cfg.data.seed})"

  def tokens(self, rng, n: int) -> np.ndarray:
    return self.text.sample(rng, n) if n else np.zeros(0, np.int32)


def _corpus_split(path: str):
  from moba_jax import corpus as corpus_lib

  c = corpus_lib.load(path)
  return c.splits["heldout"], c.path


def check_haystack(choice: str) -> None:
  """UsageError naming --haystack unless it is one of HAYSTACKS (a path that exists as one)."""
  from moba_jax import corpus as corpus_lib

  if choice in ("corpus", "synthetic"):
    return
  path = Path(choice)
  jsonl = choice.endswith(".jsonl")  # corpus.load's rule: a .jsonl path is read as a JSONL file
  if (path.is_file() if jsonl else (path / corpus_lib.MANIFEST).is_file()):
    return
  if not path.exists():
    why = "no such file or directory"
  elif jsonl:
    why = "a directory, not a .jsonl file"
  elif path.is_dir():
    why = f"not a corpus directory (no {corpus_lib.MANIFEST} in it)"
  else:
    why = "a file not ending in .jsonl"
  raise UsageError(f"--haystack {choice!r}: {why}; it takes {HAYSTACKS}")


def text_haystack(choice: str, cfg, note: Callable[[str], None]):
  """The haystack that --haystack names (see the module doc); `note` reports fallbacks."""
  if choice == "synthetic":
    return FillerHaystack()
  if choice != "corpus":
    check_haystack(choice)
    try:
      split, where = _corpus_split(choice)
    except (ValueError, OSError) as e:
      raise ValueError(f"--haystack {choice!r}: {e}") from None
    return CorpusHaystack(split, f"held-out split of {where}")
  if cfg.data.task == "corpus" and cfg.data.path:
    try:
      split, where = _corpus_split(cfg.data.path)
      return CorpusHaystack(split, f"held-out split of {where} (the checkpoint's corpus)")
    except (ValueError, OSError) as e:
      note(f"the checkpoint's corpus is not readable ({e}); using the default code corpus")
  try:
    split, where = _corpus_split("")
    return CorpusHaystack(split, f"held-out split of {where} (the default code corpus)")
  except (ValueError, OSError) as e:
    note(f"the default code corpus is not readable ({e}); using the synthetic filler")
    return FillerHaystack()


# ----------------------------------------------------------------------------- prompts


@dataclasses.dataclass(frozen=True)
class Example:
  """One scored example: tokens [L] = the prompt, then the answer's answer_len tokens."""

  tokens: np.ndarray
  answer_len: int
  needle_at: int  # index in tokens of the needle's first token
  needle_len: int
  haystack_len: int  # haystack tokens (before and after the needle)
  key: str  # the answer as text

  @property
  def prompt(self) -> np.ndarray:
    return self.tokens[:-self.answer_len]

  @property
  def answer(self) -> np.ndarray:
    return self.tokens[-self.answer_len:]


@dataclasses.dataclass(frozen=True)
class Pieces:
  """A sample's needle, question and answer tokens (shared by all its depths)."""

  needle: np.ndarray
  question: np.ndarray
  answer: np.ndarray
  key: str


class Prompts:
  """Builds the examples of one task, format and haystack (the module doc gives the layouts)."""

  def __init__(self, task: str, haystack, digits: int, synthetic_tokens: bool = False):
    if synthetic_tokens and task != "passkey":
      raise UsageError(f"--task {task} needs byte-level text; this model was trained on the "
                       "synthetic passkey task (only --task passkey fits it)")
    self.task, self.haystack, self.digits = task, haystack, digits
    self.synthetic_tokens = synthetic_tokens

  @property
  def format(self) -> str:
    return "passkey task tokens" if self.synthetic_tokens else "byte-level text"

  def pieces(self, rng, word: str | None = None) -> Pieces:
    digits = rng.integers(0, 10, size=self.digits)
    key = "".join(map(str, digits.tolist()))
    if self.synthetic_tokens:
      key_tokens = (digits + data_lib.DIGITS).astype(np.int32)
      return Pieces(np.concatenate([[data_lib.NEEDLE], key_tokens]).astype(np.int32),
                    np.array([data_lib.QUERY, data_lib.ANS], np.int32), key_tokens, key)
    word = word or WORDS[int(rng.integers(len(WORDS)))]
    if self.task == "passkey":
      needle = f"\nThe pass key is {key}. Remember it.\n"
      question = "\nWhat is the pass key? The pass key is "
    else:
      needle = f"\nThe magic number for {word} is {key}.\n"
      question = f"\nWhat is the magic number for {word}? The magic number for {word} is "
    return Pieces(*(_byte_tokens(t.encode()) for t in (needle, question, key)), key)

  def overhead(self, pieces: Pieces) -> int:
    return 1 + len(pieces.needle) + len(pieces.question) + len(pieces.answer)

  def min_length(self) -> int:
    """The shortest example (no haystack) over every needle word."""
    rng = np.random.default_rng(0)
    words = [None] if self.synthetic_tokens or self.task == "passkey" else WORDS
    return max(self.overhead(self.pieces(rng, w)) for w in words)

  def examples(self, length: int, depths: Sequence[float], sample: int, seed: int) -> list:
    """The examples of one (length, sample) at every depth: one key, one haystack."""
    rng = np.random.default_rng([seed, length, sample])
    pieces = self.pieces(rng)
    n_hay = length - self.overhead(pieces)
    if n_hay < 0:
      raise UsageError(f"--lengths: {length} is shorter than the {self.overhead(pieces)} tokens "
                       "the prompt takes with no haystack")
    hay = self.haystack.tokens(rng, n_hay)
    return [place(pieces, hay, d) for d in depths]


def place(pieces: Pieces, hay: np.ndarray, depth: float) -> Example:
  """BOS hay[:a] needle hay[a:] question answer, a = round(depth * len(hay))."""
  at = int(round(depth * len(hay)))
  tokens = np.concatenate([[data_lib.BOS], hay[:at], pieces.needle, hay[at:], pieces.question,
                           pieces.answer]).astype(np.int32)
  return Example(tokens, len(pieces.answer), 1 + at, len(pieces.needle), len(hay), pieces.key)


def make_prompts(cfg, args, note: Callable[[str], None]) -> Prompts:
  """The prompt builder for this checkpoint: its task's tokens for a synthetic-passkey model,
  else byte-level text (ValueError when the vocabulary cannot hold it)."""
  digits = args.digits or cfg.data.passkey_len
  if cfg.data.task == "passkey":
    if args.haystack != "corpus":
      raise UsageError(f"--haystack {args.haystack}: this model was trained on the synthetic "
                       "passkey task, so its haystack is that task's own filler (leave "
                       "--haystack out)")
    return Prompts(args.task, MarkovHaystack(cfg), digits, synthetic_tokens=True)
  vocab = cfg.model.vocab_size
  if vocab < gen.TEXT_VOCAB:
    raise UsageError(f"model.vocab_size={vocab} is smaller than the {gen.TEXT_VOCAB} byte-level "
                     f"tokens the prompts need (this model was trained on "
                     f"data.task={cfg.data.task!r})")
  return Prompts(args.task, text_haystack(args.haystack, cfg, note), digits)


# ----------------------------------------------------------------------------- scoring


@dataclasses.dataclass
class Scores:
  """Per example: whether every answer token was right, mean answer-token NLL, predicted tokens."""

  correct: np.ndarray  # [B] bool
  nll: np.ndarray  # [B] float64 nats per answer token
  predicted: np.ndarray  # [B, A] int


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _nll(logits, targets) -> np.ndarray:
  """Mean over the last target axis of -log softmax(logits)[target]. logits [B, A, V]."""
  logp = _log_softmax(logits)
  return -np.take_along_axis(logp, np.asarray(targets)[..., None], axis=-1)[..., 0].mean(axis=-1)


def score_forward(logits_fn: Callable, tokens: np.ndarray, answer_len: int) -> Scores:
  """Teacher-forced scoring of examples tokens [B, L] whose last answer_len tokens are the answer:
  logits_fn(tokens[:, :-1]) -> logits [B, L - 1, V]; answer token j is predicted at position
  L - answer_len - 1 + j."""
  length = tokens.shape[1]
  first = length - answer_len - 1  # the position that predicts the first answer token
  logits = np.asarray(logits_fn(tokens[:, :-1]))[:, first:length - 1]  # [B, A, V]
  targets = tokens[:, length - answer_len:]
  predicted = logits.argmax(axis=-1)
  return Scores((predicted == targets).all(axis=-1), _nll(logits, targets), predicted)


def score_decode(decoding, tokens: np.ndarray, answer_len: int) -> Scores:
  """Greedy generation of the answer through the KV cache (a decode.Decoding with max_len >= L):
  prefill the prompts tokens[:, :L - A], then A tokens. Beside each greedy row runs a copy of its
  cache fed the true answer, whose logits give the teacher-forced NLL."""
  import jax
  import jax.numpy as jnp

  batch, length = tokens.shape
  prompt = length - answer_len
  targets = tokens[:, prompt:]
  logits, cache = decoding.prefill(jnp.asarray(tokens[:, :prompt]),
                                   jnp.full((batch,), prompt, jnp.int32))
  last = jnp.concatenate([logits[:, prompt - 1]] * 2)  # [2B, V]: greedy rows, then forced rows
  cache = jax.tree.map(lambda x: jnp.concatenate([x, x]), cache)
  generated, forced = [], []
  for j in range(answer_len):
    step = np.asarray(last)
    generated.append(step[:batch].argmax(axis=-1))
    forced.append(step[batch:])
    if j + 1 < answer_len:
      feed = np.concatenate([generated[-1], targets[:, j]]).astype(np.int32)
      last, cache = decoding.step(cache, jnp.asarray(feed))
  predicted = np.stack(generated, axis=1)
  return Scores((predicted == targets).all(axis=-1), _nll(np.stack(forced, axis=1), targets),
                predicted)


def forward_logits_fn(model) -> Callable:
  """tokens [B, T] -> logits [B, T, V] by the model's full forward pass (jitted per shape)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
  return lambda tokens: forward(state, jnp.asarray(tokens))


def scorer_for(model, mode: str) -> Callable[[np.ndarray, int], Scores]:
  """(tokens [B, L], answer_len) -> Scores for the model in `mode`."""
  if mode == "forward":
    logits_fn = forward_logits_fn(model)
    return lambda tokens, answer_len: score_forward(logits_fn, tokens, answer_len)
  from moba_jax import decode

  decodings: dict = {}

  def score(tokens, answer_len):
    length = tokens.shape[1]
    if length not in decodings:  # a cache of L tokens: the last answer token is never fed
      decodings[length] = decode.jit_decoding(model, length)
    return score_decode(decodings[length], tokens, answer_len)
  return score


def _batched(score, examples: list[Example], batch_size: int) -> Scores:
  """Scores of `examples` (one length) in batches of batch_size; the last batch is padded with
  copies of its first row so that every call has one shape."""
  answer_len = examples[0].answer_len
  tokens = np.stack([e.tokens for e in examples])
  parts = []
  for start in range(0, len(tokens), batch_size):
    chunk = tokens[start:start + batch_size]
    n = len(chunk)
    if n < batch_size and len(tokens) > batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[:1], batch_size - n, axis=0)])
    s = score(chunk, answer_len)
    parts.append(Scores(s.correct[:n], s.nll[:n], s.predicted[:n]))
  return Scores(*(np.concatenate([getattr(p, f.name) for p in parts])
                  for f in dataclasses.fields(Scores)))


def _answer_text(tokens, synthetic: bool) -> str:
  if synthetic:
    return "".join(str(t - data_lib.DIGITS) if 0 <= t - data_lib.DIGITS < 10 else f"<{t}>"
                   for t in tokens)
  return "".join(chr(int(t) - data_lib.BYTE_OFFSET) if data_lib.BYTE_OFFSET <= t < 128 +
                 data_lib.BYTE_OFFSET else f"<{int(t)}>" for t in tokens)  # ASCII, else the id


def evaluate(prompts: Prompts, score, lengths: Sequence[int], depths: Sequence[float],
             samples: int, seed: int, batch_size: int = 16, log=None, keep: int = 3) -> list:
  """Per (length, depth) cell: {length, depth, n, correct, accuracy (exact match), token_accuracy
  (answer tokens right), answer_nll, examples} (the first `keep` examples' key and predicted
  answer: teacher-forced argmax per token in forward mode, the greedy generation in decode
  mode). `score(tokens [B, L], answer_len) -> Scores`."""
  cells = []
  for length in lengths:
    t0 = time.time()
    per_sample = [prompts.examples(length, depths, i, seed) for i in range(samples)]
    flat = [per_sample[i][j] for j in range(len(depths)) for i in range(samples)]
    s = _batched(score, flat, batch_size)
    row = []
    for j, depth in enumerate(depths):
      sl = slice(j * samples, (j + 1) * samples)
      correct, nll = s.correct[sl], s.nll[sl]
      shown = [{"key": flat[j * samples + i].key,
                "predicted": _answer_text(s.predicted[j * samples + i], prompts.synthetic_tokens)}
               for i in range(min(keep, samples))]
      digits = (s.predicted[sl] == np.stack([e.answer for e in flat[sl]])).mean()
      row.append({"length": int(length), "depth": float(depth), "n": int(samples),
                  "correct": int(correct.sum()), "accuracy": float(correct.mean()),
                  "token_accuracy": float(digits), "answer_nll": float(nll.mean()),
                  "examples": shown})
    cells += row
    if log:
      acc = np.mean([c["accuracy"] for c in row])
      log(f"length {length}: {len(flat)} prompts in {time.time() - t0:.1f} s, accuracy "
          f"{acc:.3f}")
  return cells


# ----------------------------------------------------------------------------- results


def attention_label(cfg) -> str:
  """'MoBA block 64, top-2', 'full attention' or the hybrid, e.g. 'MoBA block 64, top-2; last 3
  of 12 layers full'."""
  from moba_jax.config import layer_kinds

  n = cfg.model.n_layers
  n_full = layer_kinds(n, cfg.moba.hybrid_full_layers).count("full")
  moba = f"MoBA block {cfg.moba.block_size}, top-{cfg.moba.topk}"
  if n_full == 0:
    return moba
  if n_full == n:
    return "full attention"
  return f"{moba}; last {n_full} of {n} layers full"


def checkpoint_name(ckpt_dir: Path, run_dir: Path | None) -> str:
  """The run dir's last two path components (e.g. stage1/layerwise_hybrid_cpu, moba/seed0)."""
  base = run_dir if run_dir is not None else ckpt_dir
  return "/".join(base.parts[-2:])


def grid(doc: dict, key: str) -> np.ndarray:
  """[depths, lengths] of one cell field."""
  at = {(c["depth"], c["length"]): c[key] for c in doc["cells"]}
  return np.array([[at[(d, n)] for n in doc["lengths"]] for d in doc["depths"]], np.float64)


def format_md(doc: dict) -> str:
  acc, tok, nll = (grid(doc, k) for k in ("accuracy", "token_accuracy", "answer_nll"))
  head = "| depth \\ length | " + " | ".join(str(n) for n in doc["lengths"]) + " |"
  rule = "|---" * (len(doc["lengths"]) + 1) + "|"

  def table(values, fmt):
    lines = [head, rule]
    for d, row in zip(doc["depths"], values):
      lines.append(f"| {d:g} | " + " | ".join(fmt(v) for v in row) + " |")
    lines.append("| mean | " + " | ".join(fmt(v) for v in values.mean(axis=0)) + " |")
    return lines

  lines = [f"# {doc['task']} retrieval: {doc['name']} step {doc['step']}", "",
           f"- attention: {doc['attention']} ({doc['attention_plan']})",
           f"- mode: {doc['mode']}; {doc['samples']} prompts per cell, seed {doc['seed']}; "
           f"{doc['digits']}-digit keys; {doc['format']}",
           f"- haystack: {doc['haystack']}",
           f"- overrides: {' '.join(doc['overrides']) or 'none'}",
           f"- overall accuracy: {doc['accuracy']:.3f}", "",
           "Accuracy (exact match of the answer):", ""]
  lines += table(acc, lambda v: f"{v:.3f}")
  lines += ["", "Answer tokens right (fraction of all answer tokens):", ""]
  lines += table(tok, lambda v: f"{v:.3f}")
  lines += ["", "Mean answer-token NLL (nats, teacher-forced):", ""]
  lines += table(nll, lambda v: f"{v:.3f}")
  return "\n".join(lines) + "\n"


def plot(doc: dict) -> bytes:
  """The depth x length accuracy heatmap as PNG bytes."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  acc = grid(doc, "accuracy")
  fig, ax = plt.subplots(figsize=(1.2 * len(doc["lengths"]) + 2.5,
                                  0.55 * len(doc["depths"]) + 1.8), constrained_layout=True)
  image = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
  for (i, j), v in np.ndenumerate(acc):
    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=9,
            color="white" if v < 0.2 or v > 0.85 else "black")
  ax.set_xticks(range(len(doc["lengths"])), [str(n) for n in doc["lengths"]])
  ax.set_yticks(range(len(doc["depths"])), [f"{d:.0%}" for d in doc["depths"]])
  ax.set_xlabel("context length (tokens)")
  ax.set_ylabel("needle depth")
  ax.set_title(f"{doc['task']}: {doc['name']} step {doc['step']}\n{doc['attention']}; "
               f"{doc['mode']}, n={doc['samples']}/cell", fontsize=9)
  fig.colorbar(image, ax=ax, label="accuracy")
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=120)
  plt.close(fig)
  return buf.getvalue()


def check_out_dir(path: Path, what: str) -> Path:
  """UsageError naming `what` and `path` unless the results can be written there
  (rundir.why_unwritable; nothing created)."""
  why = rundir.why_unwritable(path, directory=True)
  if why:
    raise UsageError(f"{what} {str(path)!r}: {why} (the results are files in it)")
  return path


def write_results(out_dir: Path, doc: dict) -> str:
  """retrieval.{json,md,png} in out_dir, each atomically and the three together: every byte is
  made first, then written with SIGTERM / SIGINT deferred (a signal waits for all three; landing
  between two it would leave files of two evaluations); returns the markdown."""
  from moba_jax.signals import SignalFlag

  files = {"json": json.dumps(doc, indent=2) + "\n", "md": format_md(doc), "png": plot(doc)}
  with SignalFlag() as sig:
    for ext, data in files.items():
      rundir.atomic_write(out_dir / f"{RESULT}.{ext}", data)
  if sig.received:
    print(f"{PROG}: received {sig.received} while writing the results; they are complete",
          file=sys.stderr, flush=True)
  return files["md"]


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
  from moba_jax import inspect as insp

  log = lambda msg: print(f"{PROG}: {msg}", file=sys.stderr, flush=True)
  try:
    args = parser().parse_args(argv)
    depths = check_depths(args.depths)
    ckpt_dir, run_dir = insp.resolve_dirs(args.checkpoint)
    if args.out:
      out_dir = check_out_dir(Path(args.out), "--out")
    else:
      out_dir = check_out_dir((run_dir or ckpt_dir.parent) / f"eval_{args.task}",
                              "the default --out")
    gen.latest_step(ckpt_dir)
    cfg = gen.checkpoint_config(ckpt_dir, run_dir, args.config, args.set)
    if cfg.data.tokenizer:  # the prompts below are byte-level token ids
      raise UsageError(f"the model reads data.tokenizer={cfg.data.tokenizer!r}'s tokens; eval's "
                       "prompts are byte-level (models trained with data.task=corpus and no "
                       "tokenizer, or the synthetic tasks): a tokenizer's prompts are not built "
                       "yet")
    prompts = make_prompts(cfg, args, lambda msg: log(f"note: {msg}"))
    lengths = check_lengths(args.lengths, prompts.min_length(), cfg.train.seq_len)
    from moba_jax.train import check_attention_runs_here
    check_attention_runs_here(cfg)  # e.g. a GPU run's pallas_gpu, scored on a CPU
    model, step = gen.load_model(ckpt_dir, cfg)
  except (ValueError, OSError) as e:  # UsageError, CorpusError, FileNotFoundError included
    print(f"{PROG}: {e}", file=sys.stderr)
    return 2
  from moba_jax.config import config_to_dict
  from moba_jax.train import attention_plan

  # the implementation each layer resolves to at the shapes scored here
  # (a stand-in config: attention_plan reads model, moba and these two train fields only)
  shapes = SimpleNamespace(batch_size=args.batch_size, seq_len=max(lengths))
  plan = attention_plan(SimpleNamespace(model=cfg.model, moba=cfg.moba, train=shapes))
  log(f"step {step} of {ckpt_dir}; attention: {plan}; {len(lengths)} lengths x {len(depths)} "
      f"depths x {args.samples} prompts, {args.mode} mode; haystack: "
      f"{prompts.haystack.description}")
  cells = evaluate(prompts, scorer_for(model, args.mode), lengths, depths, args.samples,
                   args.seed, args.batch_size, log)
  total = sum(c["n"] for c in cells)
  doc = {"task": args.task, "mode": args.mode, "name": checkpoint_name(ckpt_dir, run_dir),
         "checkpoint": str(ckpt_dir), "step": int(step), "attention": attention_label(cfg),
         "attention_plan": plan, "overrides": list(args.set), "format": prompts.format,
         "haystack": prompts.haystack.description, "lengths": lengths, "depths": depths,
         "samples": args.samples, "seed": args.seed, "digits": prompts.digits,
         "accuracy": sum(c["correct"] for c in cells) / total,
         "answer_nll": sum(c["answer_nll"] * c["n"] for c in cells) / total,
         "cells": cells, "config": config_to_dict(cfg)}
  try:
    md = write_results(out_dir, doc)
  except OSError as e:  # checked writable up front; a disk that fills meanwhile
    sys.stdout.write(format_md(doc))  # the scores are not lost
    log(f"could not write the results into {str(out_dir)!r} ({e.strerror or e}); the table "
        "above is the evaluation")
    return 1
  sys.stdout.write(md)
  log(f"wrote {out_dir}/{RESULT}.{{json,md,png}}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
