"""Text <-> token ids for the corpus task (moba_jax/data.py) and `moba-jax generate`.

Byte-level (the default, data.tokenizer = ""): BOS, each UTF-8 byte + 3, EOS. A Hugging Face
tokenizer (data.tokenizer = a local tokenizer.json or the directory holding it; needs the optional
`tokenizers` package: pip install 'moba-jax[tokenizer]'): its ids, without the special tokens its
post-processor would add; BOS and EOS are the ones the model's files beside it name
(tokenizer_config.json's bos_token / eos_token, else config.json's bos_token_id / eos_token_id),
and generation also stops at generation_config.json's eos_token_id. A model without a BOS (Qwen2)
gets none.
"""

from __future__ import annotations

import codecs
import functools
import json
from pathlib import Path
from typing import Callable

import numpy as np

from moba_jax.data import BOS, BYTE_OFFSET, EOS


class ByteTokenizer:
  """The byte-level tokens: BOS=1, EOS=2, a UTF-8 byte b is b + 3."""

  byte_level = True
  name = "byte-level"
  vocab_size = 256 + BYTE_OFFSET
  bos, eos = BOS, EOS
  stop_ids = frozenset({EOS})

  def encode(self, text: bytes) -> np.ndarray:
    return np.frombuffer(text, np.uint8).astype(np.int32) + BYTE_OFFSET

  def stream(self) -> Callable[[int | None, bool], str]:
    """A decoder of one row: (token, last) -> the text it completes (bytes of a split UTF-8
    character wait for the rest; token None adds nothing: the row ended on a stop token)."""
    dec = codecs.getincrementaldecoder("utf-8")("replace")

    def add(token: int | None, last: bool) -> str:
      byte = -1 if token is None else token - BYTE_OFFSET
      return dec.decode(bytes([byte]) if 0 <= byte < 256 else b"", final=last)
    return add


def _read_json(path: Path) -> dict:
  try:
    return json.loads(path.read_text()) if path.is_file() else {}
  except ValueError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None


def _ids(value) -> list[int]:
  return [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int)]


class HFTokenizer:
  """A local Hugging Face tokenizer.json (the `tokenizers` library)."""

  byte_level = False

  def __init__(self, path: Path):
    try:
      from tokenizers import Tokenizer
    except ImportError:
      raise ValueError(f"data.tokenizer={str(path)!r} needs the tokenizers package: pip install "
                       "'moba-jax[tokenizer]'") from None
    self.name = str(path)
    try:
      self.tok = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - the library raises its own exception types
      raise ValueError(f"data.tokenizer={str(path)!r} does not load ({e})") from None
    self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
    here = path.parent
    tcfg, mcfg = _read_json(here / "tokenizer_config.json"), _read_json(here / "config.json")
    gen = _read_json(here / "generation_config.json")
    self.bos = self._special(tcfg, mcfg, "bos")
    self.eos = self._special(tcfg, mcfg, "eos")
    if tcfg.get("add_bos_token") is False:
      self.bos = None
    ids = {self.eos} | set(_ids(mcfg.get("eos_token_id"))) | set(_ids(gen.get("eos_token_id")))
    self.stop_ids = frozenset(i for i in ids if i is not None)

  def _special(self, tcfg: dict, mcfg: dict, kind: str) -> int | None:
    token = tcfg.get(f"{kind}_token")
    token = token.get("content") if isinstance(token, dict) else token
    if isinstance(token, str):
      return self.tok.token_to_id(token)
    if tcfg:
      return None
    ids = _ids(mcfg.get(f"{kind}_token_id"))
    return ids[0] if ids else None

  def encode(self, text: bytes) -> np.ndarray:
    ids = self.tok.encode(text.decode("utf-8"), add_special_tokens=False).ids
    return np.asarray(ids, np.int32)

  def stream(self) -> Callable[[int | None, bool], str]:
    """A decoder of one row: (token, last) -> the new text; token None adds nothing (the row
    ended on a stop token, whose text is never shown). Pieces merge across tokens (a space
    marker, bytes of one character), so each call decodes a window: the tokens since the
    emission before last, with and without the ones not yet shown, and returns the difference
    (both start at the same token, so the decoder treats their start alike). A window ending in
    a partial character waits for the rest. O(window) per token, not O(row). The pieces join to
    the row's full decode, except that a byte-fallback tokenizer's invalid byte run, which the
    full decode replaces byte by byte, may be replaced where the stream cuts it."""
    ids, start, shown = [], [0], [0]  # window ids[start:]; ids[start:shown] are on screen

    def add(token: int | None, last: bool) -> str:
      if token is not None:
        ids.append(token)
      before = self.tok.decode(ids[start[0]:shown[0]], skip_special_tokens=False)
      text = self.tok.decode(ids[start[0]:], skip_special_tokens=False)
      if not last and (text.endswith("\ufffd") or len(text) <= len(before)):
        return ""
      start[0], shown[0] = shown[0], len(ids)
      return text[len(before):]
    return add


@functools.lru_cache(maxsize=8)
def load(path: str) -> ByteTokenizer | HFTokenizer:
  """data.tokenizer's tokenizer: "" = byte-level, else a tokenizer.json or a dir holding one."""
  if not path:
    return ByteTokenizer()
  p = Path(path)
  if p.is_dir():
    p = p / "tokenizer.json"
  if not p.is_file():
    raise ValueError(f"data.tokenizer={path!r}: no such file (a Hugging Face tokenizer.json or "
                     "the directory holding it)")
  return HFTokenizer(p)


def with_specials(tok, ids: np.ndarray, bos: bool = True, eos: bool = True) -> np.ndarray:
  """[BOS] + ids + [EOS], each only where the tokenizer has it."""
  head = [tok.bos] if bos and tok.bos is not None else []
  tail = [tok.eos] if eos and tok.eos is not None else []
  return np.concatenate([head, ids, tail]).astype(np.int32)
