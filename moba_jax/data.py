"""Grain data pipelines: real-text corpora, synthetic long-context SFT tasks, a synthetic LM stream.

Every row is a dict of [T] arrays (T = train.seq_len):
  inputs, targets (next tokens), mask (float32 loss weight of each target: answer 1, prompt 0),
  segment_ids (1, 2, ... per packed example; padding gets its own id), positions (restart per example);
  held-out rows also lm_mask (1 on every real target: not padding, not across documents).

Rows are a pure function of (data.seed, split, row index), so any row can be produced in any order
(Grain MapDataset random access), the pipeline is deterministic, and the iterator state is a single
index that Orbax checkpoints through Grain's handler. Process p of P reads, for global batch b, the rows
b * B + p * B/P ... (b * B + (p + 1) * B/P - 1): the global batch is the same for any process count.

Tasks (docs/training.md has examples):
  kv_retrieval  BOS (KEY k.. VAL v.. | filler)* then num_queries x (QUERY k.. ANS v..) EOS; loss on the
                answer values. Keys are distinct; a value is only in its pair, far back in the prompt,
                so answering needs attention to one specific distant block.
  passkey       BOS haystack NEEDLE d.. haystack QUERY ANS d.. EOS, loss on the digits d.
  lm            Markov-chain text with long-range copied spans (induction), loss on every token.
  corpus        real text (moba_jax/corpus.py: a built corpus directory, a JSONL file, or '' for the
                code corpus of this interpreter's stdlib), byte-level tokens (id = byte + 3) or
                those of data.tokenizer (moba_jax/tokenizer.py): LM windows, SFT windows whose last
                data.response_tokens carry the loss, or packed {"prompt", "response"} examples
                (CorpusRows).
"""

from __future__ import annotations

import functools
import math

import grain
import numpy as np

PAD, BOS, EOS, KEY, VAL, QUERY, ANS, NEEDLE = range(8)
DIGITS = 8  # 10 digit tokens 8..17 for passkeys
CONTENT = 18  # first ordinary token; keys, values and text use [CONTENT, vocab_size)
BYTE_OFFSET = 3  # corpus: token = byte + 3 (PAD, BOS, EOS first)
MIN_VOCAB = {"lm": CONTENT + 8, "kv_retrieval": CONTENT + 8, "passkey": CONTENT + 8,
             "corpus": 256 + BYTE_OFFSET}
FIELDS = ("inputs", "targets", "mask", "segment_ids", "positions")
_SPLITS = {"train": 0, "eval": 1}


# ----------------------------------------------------------------------------- examples


def min_example_len(dcfg) -> int:
  """Smallest piece length (tokens - 1) an example of this task can have."""
  if dcfg.task == "kv_retrieval":  # every example holds kv_pairs pairs (0: num_queries or more)
    pair = 2 + dcfg.key_len + dcfg.value_len
    return max(2 * dcfg.num_queries, dcfg.kv_pairs + dcfg.num_queries) * pair + 1
  if dcfg.task == "passkey":
    return 2 * dcfg.passkey_len + 4
  return 1


def check_config(cfg) -> None:
  """Cross-checks data settings against the model and sequence length (called by Config)."""
  d, seq, vocab = cfg.data, cfg.train.seq_len, cfg.model.vocab_size
  if d.path and d.task != "corpus":
    raise ValueError(f"data.path={d.path!r} applies to data.task='corpus', not {d.task!r} (a "
                     "synthetic task reads no files)")
  if d.tokenizer:
    from moba_jax import tokenizer

    if d.task != "corpus":
      raise ValueError(f"data.tokenizer={d.tokenizer!r} applies to data.task='corpus', not "
                       f"{d.task!r}")
    need = tokenizer.load(d.tokenizer).vocab_size
    if vocab < need:
      raise ValueError(f"model.vocab_size={vocab} must be >= the {need} ids of data.tokenizer="
                       f"{d.tokenizer!r}")
  elif vocab < MIN_VOCAB[d.task]:
    raise ValueError(f"model.vocab_size={vocab} must be >= {MIN_VOCAB[d.task]} for "
                     f"data.task={d.task!r}")
  need = min_example_len(d)
  if seq < need:
    raise ValueError(f"train.seq_len={seq} must be >= {need} for data.task={d.task!r} with "
                     f"these kv_pairs/key_len/value_len/num_queries/passkey_len")
  if d.response_tokens and (d.task != "corpus" or d.response_tokens >= seq):
    raise ValueError(f"data.response_tokens={d.response_tokens} applies to data.task='corpus' "
                     f"and must be < train.seq_len={seq}")
  if d.task == "kv_retrieval" and d.kv_pairs and d.kv_pairs < d.num_queries:
    raise ValueError(f"data.kv_pairs={d.kv_pairs} must be 0 (as many as fit) or >= "
                     f"data.num_queries={d.num_queries}")


class MarkovText:
  """A fixed random 'language': 4 likely successors per token, generated as phrases from a bank of
  Markov-chain runs (fixed by the data seed; vectorised), with spans copied from far back."""

  def __init__(self, seed: int, vocab: int, branching: int = 4, bank: int = 2048,
               phrase: int = 64):
    rng = np.random.default_rng([seed, 99])
    n = vocab - CONTENT
    succ = rng.integers(0, n, size=(n, branching))
    cum = np.cumsum(rng.dirichlet(np.ones(branching) * 0.5, size=n), axis=1)
    tok = rng.integers(0, n, size=bank)
    u = rng.random((phrase, bank))
    runs = np.empty((bank, phrase), np.int32)
    for t in range(phrase):  # all bank rows advance together
      choice = np.minimum((u[t][:, None] > cum[tok]).sum(axis=1), branching - 1)
      tok = succ[tok, choice]
      runs[:, t] = tok
    self.runs = runs + CONTENT
    self.n_content = n

  def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
    out = np.empty(n, np.int32)
    t = 0
    while t < n:
      if t >= 64 and rng.random() < 0.3:  # copy an earlier span (long-range dependency)
        span = min(int(rng.integers(8, 33)), n - t)
        start = int(rng.integers(0, t - span + 1))
        out[t:t + span] = out[start:start + span]
      else:
        span = min(int(rng.integers(16, self.runs.shape[1] + 1)), n - t)
        out[t:t + span] = self.runs[int(rng.integers(len(self.runs))), :span]
      t += span
    return out


def lm_example(rng, n, dcfg, text: MarkovText):
  tokens = np.concatenate([[BOS], text.sample(rng, n)]).astype(np.int32)
  return tokens, np.ones(n + 1, np.float32)


def _distinct_keys(rng, count, key_len, vocab):
  n_content = vocab - CONTENT
  codes = rng.choice(n_content ** key_len, size=count, replace=False) if \
      n_content ** key_len < 2 ** 62 else rng.integers(0, 2 ** 62, size=count)
  digits = [(codes // n_content ** j) % n_content for j in range(key_len)]
  return np.stack(digits, axis=1).astype(np.int32) + CONTENT  # [count, key_len]


def kv_example(rng, n, dcfg, text: MarkovText):
  """n + 1 tokens: BOS, pairs with filler between them, then queries and answers, EOS."""
  kl, vl, nq = dcfg.key_len, dcfg.value_len, dcfg.num_queries
  vocab = text.n_content + CONTENT
  pair = 2 + kl + vl
  room = n + 1 - 2 - nq * pair  # tokens for pairs and filler
  fit = room // pair
  n_pairs = min(dcfg.kv_pairs, fit) if dcfg.kv_pairs else max(nq, int(room * (1 - dcfg.filler))
                                                               // pair)
  n_pairs = max(min(n_pairs, fit), nq)
  keys = _distinct_keys(rng, n_pairs, kl, vocab)
  values = rng.integers(CONTENT, vocab, size=(n_pairs, vl)).astype(np.int32)
  records = [np.concatenate([[KEY], keys[i], [VAL], values[i]]) for i in range(n_pairs)]
  filler = text.sample(rng, room - n_pairs * pair)
  cuts = np.sort(rng.integers(0, len(filler) + 1, size=n_pairs))
  prompt = [[BOS]]
  prev = 0
  for cut, rec in zip(cuts, records):
    prompt += [filler[prev:cut], rec]
    prev = cut
  prompt.append(filler[prev:])
  asked = rng.choice(n_pairs, size=nq, replace=False)
  qa = [np.concatenate([[QUERY], keys[i], [ANS], values[i]]) for i in asked]
  tokens = np.concatenate(prompt + qa + [[EOS]]).astype(np.int32)
  mask = np.zeros(n + 1, np.float32)
  ends = len(tokens) - 1 - np.arange(nq)[::-1] * pair  # one past each answer
  for e in ends:
    mask[e - vl:e] = 1.0
  return tokens, mask


def passkey_example(rng, n, dcfg, text: MarkovText):
  """n + 1 tokens: BOS, haystack with NEEDLE d.. at a random depth, QUERY ANS d.. EOS."""
  pl = dcfg.passkey_len
  key = rng.integers(DIGITS, DIGITS + 10, size=pl).astype(np.int32)
  hay = text.sample(rng, n + 1 - 2 - (1 + pl) - (2 + pl))
  depth = int(rng.integers(0, len(hay) + 1))
  tokens = np.concatenate([[BOS], hay[:depth], [NEEDLE], key, hay[depth:], [QUERY, ANS], key,
                           [EOS]]).astype(np.int32)
  mask = np.zeros(n + 1, np.float32)
  mask[-1 - pl:-1] = 1.0
  return tokens, mask


_GENERATORS = {"lm": lm_example, "kv_retrieval": kv_example, "passkey": passkey_example}


# ----------------------------------------------------------------------------- real text


def text_tokens(data: bytes, start: int = 0, stop: int | None = None) -> np.ndarray:
  """Tokens [start, stop) of BOS, bytes + BYTE_OFFSET, EOS (only that slice is converted)."""
  n = len(data) + 2
  stop = n if stop is None else min(stop, n)
  body = np.frombuffer(data, np.uint8)[max(start - 1, 0):max(stop - 1, 0)]
  head = [BOS] if start == 0 and stop > 0 else []
  tail = [EOS] if stop == n and start < n else []
  return np.concatenate([head, body.astype(np.int32) + BYTE_OFFSET, tail]).astype(np.int32)


class CorpusRows:
  """Rows of a real-text corpus (moba_jax/corpus.py), one of three kinds by its content:

  windows   plain text, data.response_tokens R > 0: a row is seq + 1 consecutive tokens of one
            document (a start uniform over all such windows, so long files weigh by length) whose
            last R targets are the response: the paper's "last 2K of 32K" SFT, prompt masked.
  stream    plain text, R = 0: the documents joined (BOS text EOS ...) and cut at a uniform random
            start, each piece its own segment; loss on every token (LM pretraining).
  examples  {"prompt", "response"} lines (and {"text"} lines among them): whole examples packed
            while the next fits (RowSource.pack_examples), loss on the response and its EOS (all
            tokens of a text line).
  """

  def __init__(self, docs, seq: int, response_tokens: int, examples: bool, tokenizer=None):
    """examples: the corpus holds prompt/response examples (in any split: the kind is the
    corpus's, so that train and eval rows are of one kind). tokenizer: moba_jax.tokenizer's
    (None = byte-level)."""
    self.docs, self.seq, self.r = docs, seq, response_tokens
    self.tokens = DocTokens(docs, tokenizer)
    n_tokens = self.tokens.lengths
    if examples:
      self.kind = "examples"
      self._check_examples()
    elif response_tokens:
      self.kind = "windows"
      starts = np.maximum(n_tokens - seq, 0)  # windows of seq + 1 tokens per document
      if not starts.any():
        raise ValueError(f"{docs.where}: no document has the train.seq_len + 1 = {seq + 1} tokens "
                         f"a window needs (longest: {int(n_tokens.max())}); lower "
                         "train.seq_len or use longer documents")
      self.cum = np.cumsum(starts)
    else:
      self.kind = "stream"
      self.cum = np.cumsum(n_tokens)
      if self.cum[-1] < seq + 1:
        raise ValueError(f"{docs.where}: {int(self.cum[-1])} tokens in all, fewer than "
                         f"train.seq_len + 1 = {seq + 1}")

  def _check_examples(self):
    d = self.docs
    if self.r:
      raise ValueError(f"data.response_tokens={self.r} applies to plain-text corpora; "
                       f"{d.where} holds prompt/response examples (set it to 0)")
    short = np.flatnonzero(self.tokens.lengths < 2)
    if len(short):  # no target: a row could never fill
      i = int(short[0])
      raise ValueError(f"{d.locate(i)}: encodes to {int(self.tokens.lengths[i])} token(s), "
                       "fewer than the 2 an example needs (an input and its target)")
    resp = self.tokens.response_lengths()
    bad = np.flatnonzero(resp > self.seq - 1)
    if len(bad):
      i = int(bad[0])
      raise ValueError(f"{d.locate(i)}: the response has {int(resp[i])} tokens with its EOS, "
                       f"more than fit after BOS in train.seq_len={self.seq}")

  def example(self, rng):
    """A random example whole: (tokens, mask); the mask is 0 on BOS and the prompt."""
    i = int(rng.integers(len(self.docs)))
    tokens = self.tokens(i)
    mask = np.ones(len(tokens), np.float32)
    if self.docs.prompt_bytes[i] >= 0:
      mask[:self.tokens.prompt_length(i)] = 0.0  # BOS and the prompt
    return tokens, mask

  def fit(self, tokens, mask, n: int):
    """An example cut to n + 1 tokens where it is longer: a prompt/response example loses its
    prompt's start (the response fits after BOS: _check_examples), a text line its end."""
    if len(tokens) <= n + 1:
      return tokens, mask
    if mask[0] == 0.0:  # a prompt/response example
      return tokens[-n - 1:], mask[-n - 1:]
    return tokens[:n + 1], mask[:n + 1]

  def window(self, rng) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [seq + 1], segment of each token) of a windows/stream row."""
    u = int(rng.integers(self.cum[-1] - (self.seq if self.kind == "stream" else 0)))
    i = int(np.searchsorted(self.cum, u, side="right"))
    offset = u - (int(self.cum[i - 1]) if i else 0)
    if self.kind == "windows":
      tokens = self.tokens(i, offset, offset + self.seq + 1)
      return tokens, np.ones(self.seq + 1, np.int32)
    pieces, segs, need, seg = [], [], self.seq + 1, 1
    while need:
      piece = self.tokens(i, offset, offset + need)
      pieces.append(piece)
      segs.append(np.full(len(piece), seg, np.int32))
      need -= len(piece)
      i, offset, seg = i + 1, 0, seg + 1
    return np.concatenate(pieces), np.concatenate(segs)


class DocTokens:
  """Token ids of a split's documents: BOS, the text's tokens, EOS. Byte-level ones come from the
  bytes asked for (no document is converted whole); a tokenizer's are counted once at start
  (every document encoded) and the last documents read are kept encoded. A prompt/response
  document's prompt and response are encoded apart, so the loss mask falls between tokens."""

  def __init__(self, docs, tokenizer=None):
    self.docs, self.tok = docs, tokenizer
    self.encoded = functools.lru_cache(maxsize=16)(self._encode)  # this instance's documents
    if tokenizer is None or tokenizer.byte_level:
      self.tok, self.lengths = None, docs.sizes + 2
    else:
      self.lengths = np.array([len(self.encoded(i)) for i in range(len(docs))], np.int64)

  def __call__(self, i: int, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Tokens [start, stop) of document i."""
    if self.tok is None:
      return text_tokens(self.docs[i], start, stop)
    return self.encoded(i)[start:stop]

  def _encode(self, i: int) -> np.ndarray:
    """Document i's token ids (`encoded` is this, cached)."""
    from moba_jax.tokenizer import with_specials

    data, p = self.docs[i], int(self.docs.prompt_bytes[i])
    if p < 0:
      return with_specials(self.tok, self.tok.encode(data))
    ids = [self.tok.encode(data[:p]), self.tok.encode(data[p:])]
    return with_specials(self.tok, np.concatenate(ids).astype(np.int32))

  def prompt_length(self, i: int) -> int:
    """Tokens before prompt/response document i's response: BOS and the prompt."""
    p = int(self.docs.prompt_bytes[i])
    if self.tok is None:
      return 1 + p
    return (self.tok.bos is not None) + len(self.tok.encode(self.docs[i][:p]))

  def response_lengths(self) -> np.ndarray:
    """Tokens of each document's response and EOS; 0 for plain text."""
    sft = np.flatnonzero(self.docs.prompt_bytes >= 0)
    out = np.zeros(len(self.docs), np.int64)
    out[sft] = [self.lengths[i] - self.prompt_length(i) for i in sft]
    return out


# ----------------------------------------------------------------------------- rows


class RowSource:
  """Random-access rows (a Grain data source): row r of `split` is a pure function of (seed, r).

  Training rows also depend on train.seed (so seeds of one experiment see different training
  rows); eval rows and the filler text depend on data.seed alone (every seed is scored on the same
  held-out rows).
  """

  def __init__(self, cfg, split: str = "train"):
    self.d, self.seq, self.split = cfg.data, cfg.train.seq_len, split
    self.row_seed = ([self.d.seed, _SPLITS[split]]
                     + ([cfg.train.seed] if split == "train" and cfg.train.seed else []))
    # loss_on shapes the training loss only: held-out scores always count the answers.
    loss_on = "answer" if self.d.loss_on == "auto" or split != "train" else self.d.loss_on
    self.loss_on_all = loss_on == "all"
    self.text = MarkovText(self.d.seed, cfg.model.vocab_size)
    self.corpus = self.rows = None
    if self.d.task == "corpus":
      from moba_jax import corpus as corpus_lib

      from moba_jax import tokenizer

      self.corpus = corpus_lib.load(self.d.path)
      docs = self.corpus.splits["train" if split == "train" else "heldout"]
      examples = any((s.prompt_bytes >= 0).any() for s in self.corpus.splits.values())
      self.rows = CorpusRows(docs, self.seq, self.d.response_tokens, examples,
                             tokenizer.load(self.d.tokenizer))
    packed = self.d.pack and split == "train"
    self.min_len = min(self.seq, max(min_example_len(self.d),
                                     math.ceil(self.d.min_len_frac * self.seq))) if packed \
        else self.seq

  @property
  def fingerprint(self) -> str | None:
    """sha256 of the corpus's content (None for synthetic tasks)."""
    return self.corpus.fingerprint if self.corpus is not None else None

  def __len__(self) -> int:
    return 2 ** 40

  def __getitem__(self, r: int) -> dict:
    """Row r: FIELDS, and on held-out splits `lm_mask`, 1 on every real target (not padding,
    not across documents): what eval's all-token losses weigh."""
    rng = np.random.default_rng([*self.row_seed, int(r)])
    if self.rows is None:
      row = self.pack(rng)
    elif self.rows.kind == "examples":
      row = self.pack_examples(rng)
    else:
      row = self.window_row(rng)
    if self.split == "train":
      del row["lm_mask"]
    return row

  def example(self, rng, n: int):
    """A synthetic task's example of exactly n + 1 tokens: (tokens, mask)."""
    return _GENERATORS[self.d.task](rng, n, self.d, self.text)

  def window_row(self, rng) -> dict:
    """A corpus window (CorpusRows): the last data.response_tokens targets carry the loss, or
    every target inside a document for the LM stream."""
    tokens, seg = self.rows.window(rng)
    seq = self.seq
    segment_ids = seg[:-1]
    starts = np.flatnonzero(np.diff(segment_ids, prepend=0))
    positions = np.arange(seq) - np.repeat(starts, np.diff(np.append(starts, seq)))
    lm_mask = (seg[:-1] == seg[1:]).astype(np.float32)  # no target across documents
    if self.rows.kind == "stream" or self.loss_on_all:
      mask = lm_mask
    else:
      mask = np.zeros(seq, np.float32)
      mask[seq - self.rows.r:] = 1.0
    return {"inputs": tokens[:-1], "targets": tokens[1:], "mask": mask,
            "segment_ids": segment_ids, "positions": positions.astype(np.int32),
            "lm_mask": lm_mask}

  def pack(self, rng) -> dict:
    """A synthetic task's row: examples of lengths uniform in [min_len, seq] (packed) or one of
    seq (unpacked), the last absorbing the tail."""
    seq, min_len = self.seq, self.min_len
    row, used = self._empty_row(), 0
    while seq - used >= min_len:
      n = min(int(rng.integers(min_len, seq + 1)), seq - used)
      if seq - used - n < min_len:
        n = seq - used  # the last example absorbs the tail
      used = self._place(row, used, *self.example(rng, n))
    return self._pad(row, used)

  def pack_examples(self, rng) -> dict:
    """A prompt/response corpus's row: whole examples in drawn order while the next fits (packed;
    unpacked: one), the rest padding. An example longer than the row fills it, cut by
    CorpusRows.fit."""
    seq, row, used = self.seq, self._empty_row(), 0
    while used < seq:
      tokens, mask = self.rows.example(rng)
      if used and len(tokens) - 1 > seq - used:
        break  # does not fit what is left: padding
      used = self._place(row, used, *self.rows.fit(tokens, mask, seq - used))
      if not self.d.pack or self.split != "train":
        break
    return self._pad(row, used)

  def _empty_row(self) -> dict:
    row = {k: np.zeros(self.seq, np.float32 if k == "mask" else np.int32) for k in FIELDS}
    row["lm_mask"] = np.zeros(self.seq, np.float32)
    return row

  @staticmethod
  def _last_segment(row, used: int) -> int:
    return int(row["segment_ids"][used - 1]) if used else 0

  def _place(self, row, used: int, tokens, mask) -> int:
    """Writes one example of len(tokens) - 1 targets at `used` as the next segment."""
    m = len(tokens) - 1
    sl = slice(used, used + m)
    row["inputs"][sl], row["targets"][sl] = tokens[:-1], tokens[1:]
    row["mask"][sl] = 1.0 if self.loss_on_all else mask[1:]
    row["segment_ids"][sl] = self._last_segment(row, used) + 1
    row["positions"][sl] = np.arange(m)
    row["lm_mask"][sl] = 1.0
    return used + m

  def _pad(self, row, used: int) -> dict:
    """Padding after `used`: its own segment, no loss."""
    if used < self.seq:
      row["segment_ids"][used:] = self._last_segment(row, used) + 1
      row["positions"][used:] = np.arange(self.seq - used)
    return row


def _stack(rows):
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def _local_rows(batch_size: int, process_index: int, process_count: int) -> int:
  if batch_size % process_count:
    raise ValueError(f"train.batch_size={batch_size} must be divisible by the process count "
                     f"{process_count}")
  return batch_size // process_count


def train_dataset(cfg, process_index: int = 0, process_count: int = 1,
                  source: RowSource | None = None) -> grain.IterDataset:
  """This process's share of each global training batch, as a checkpointable Grain IterDataset
  (over `source`, default RowSource(cfg, "train"))."""
  gb = cfg.train.batch_size
  lb = _local_rows(gb, process_index, process_count)
  source = source or RowSource(cfg, "train")

  def row(i):
    return source[(i // lb) * gb + process_index * lb + i % lb]

  ds = grain.MapDataset.range(0, len(source)).map(row).batch(lb, batch_fn=_stack)
  prefetch = cfg.data.prefetch
  options = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
  return ds.to_iter_dataset(options)


def eval_batches(cfg, process_index: int = 0, process_count: int = 1) -> list[dict]:
  """eval.batches held-out batches (this process's rows), unpacked: one example a row (a
  synthetic task's full-length; a prompt/response corpus's whole, then padding), or a corpus
  window; with `lm_mask`."""
  gb = cfg.train.batch_size
  lb = _local_rows(gb, process_index, process_count)
  source = RowSource(cfg, "eval")
  return [_stack([source[b * gb + process_index * lb + j] for j in range(lb)])
          for b in range(cfg.eval.batches)]
