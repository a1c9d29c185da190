"""Real-text corpora on disk: documents in Grain's ArrayRecord, a train / held-out split, a manifest.

  moba-jax data code OUT [--source DIR ...]    Python source (default: this interpreter's stdlib)
  moba-jax data jsonl IN.jsonl OUT             a user's {"text"} / {"prompt", "response"} lines
  moba-jax data info DIR                       print a corpus's manifest

A corpus directory holds, per split ("train", "heldout"):
  <split>.array_record   one record per document: its UTF-8 bytes (prompt then response for SFT lines)
  <split>.index.npz      per document: bytes, prompt_bytes (-1 = plain text), name
and manifest.json (sources, counts, bytes, and `fingerprint`: the sha256 of every document's split,
name, prompt length and content sha256, so two results are compared only on the same data).

Everything is deterministic: documents are read in sorted order, exact duplicates (same content
sha256) are dropped keeping the first name, and a document is held out when the sha256 of its *name*
(its path relative to the source root, or FILE:LINE) falls below `heldout_frac`, so the split of a file
does not depend on which other files exist (the same module is held out on every Python version).
Only the index is read into memory; documents are read by random access, so a corpus may be larger
than memory. `load(path)` also takes a .jsonl file, read into memory by the same rules.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from moba_jax import rundir

SPLITS = ("train", "heldout")
VERSION = 1
MANIFEST = "manifest.json"
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


class CorpusError(ValueError):
  """Bad corpus input: the message names the file (and line)."""


@dataclasses.dataclass(frozen=True)
class Doc:
  name: str
  data: bytes  # UTF-8 text; for an SFT example, prompt bytes then response bytes
  prompt_bytes: int = -1  # -1: plain text


def _is_heldout(name: str, frac: float) -> bool:
  h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
  return h < frac * 2.0 ** 64


# ----------------------------------------------------------------------------- sources


def stdlib_dir() -> Path:
  return Path(sysconfig.get_paths()["stdlib"])


def code_docs(sources: list[Path], exts: tuple[str, ...], skipped: dict) -> Iterator[Doc]:
  """Source files under each root, sorted; named '<label>/<relative path>' (label 'stdlib' for the
  interpreter's standard library). Files that are not valid UTF-8 are skipped and counted."""
  std = stdlib_dir().resolve()
  for root in sources:
    root = Path(root)
    if not root.is_dir():
      raise CorpusError(f"--source {str(root)!r} is not a directory")
    label = "stdlib" if root.resolve() == std else root.resolve().name
    for path in sorted(_walk(root, exts)):
      data = path.read_bytes()
      try:
        data.decode("utf-8")
      except UnicodeDecodeError:
        skipped["not_utf8"] = skipped.get("not_utf8", 0) + 1
        continue
      if not data.strip():
        skipped["empty"] = skipped.get("empty", 0) + 1
        continue
      yield Doc(f"{label}/{path.relative_to(root).as_posix()}", data)


def _walk(root: Path, exts: tuple[str, ...]) -> Iterator[Path]:
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
    for f in filenames:
      if f.endswith(exts):
        yield Path(dirpath, f)


def _utf8(raw: bytes, where: str) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise CorpusError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None


def jsonl_docs(path: str | os.PathLike) -> Iterator[Doc]:
  """One document per non-blank line: {"text": str} or {"prompt": str, "response": str}, named
  FILENAME:LINE (without the directory, so that the split does not depend on where the file is);
  errors name the whole path."""
  path = Path(path)
  if not path.is_file():
    raise CorpusError(f"{str(path)!r}: no such file" if not path.exists()
                      else f"{str(path)!r} is a directory, not a JSONL file")
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      where = f"{path}:{lineno}"
      line = _utf8(raw, where)
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except ValueError as e:
        raise CorpusError(f"{where}: not valid JSON ({e})") from None
      yield _line_doc(obj, where, f"{path.name}:{lineno}")


def _line_doc(obj, where: str, name: str) -> Doc:
  if not isinstance(obj, dict):
    raise CorpusError(f"{where}: a line must be a JSON object, got {type(obj).__name__}")
  if "text" in obj:
    if not isinstance(obj["text"], str) or not obj["text"]:
      raise CorpusError(f"{where}: 'text' must be a non-empty string")
    return Doc(name, obj["text"].encode())
  if "prompt" in obj and "response" in obj:
    if not (isinstance(obj["prompt"], str) and isinstance(obj["response"], str)):
      raise CorpusError(f"{where}: 'prompt' and 'response' must be strings")
    if not obj["response"]:
      raise CorpusError(f"{where}: 'response' is empty (it carries the SFT loss)")
    prompt = obj["prompt"].encode()
    return Doc(name, prompt + obj["response"].encode(), len(prompt))
  raise CorpusError(f"{where}: a line needs 'text' or 'prompt' and 'response', got keys "
                    f"{sorted(obj)}")


# ----------------------------------------------------------------------------- writing


class _SplitWriter:

  def __init__(self, directory: Path, split: str):
    from array_record.python.array_record_module import ArrayRecordWriter

    self.path = directory / f"{split}.array_record"
    self.writer = ArrayRecordWriter(str(self.path), "group_size:1")
    self.names, self.sizes, self.prompts = [], [], []

  def add(self, doc: Doc) -> None:
    self.writer.write(doc.data)
    self.names.append(doc.name)
    self.sizes.append(len(doc.data))
    self.prompts.append(doc.prompt_bytes)

  def close(self) -> dict:
    self.writer.close()
    index = self.path.with_name(self.path.name.replace(".array_record", ".index.npz"))
    with open(index, "wb") as f:
      np.savez(f, bytes=np.asarray(self.sizes, np.int64),
               prompt_bytes=np.asarray(self.prompts, np.int64),
               name=np.asarray(self.names, dtype=np.str_))
    return {"documents": len(self.names), "bytes": int(sum(self.sizes)),
            "sft_examples": int(sum(p >= 0 for p in self.prompts))}


def check_out(out: str | os.PathLike, force: bool = False) -> None:
  """CorpusError naming `out` (as given) unless a corpus directory can be written there: a new path
  under a directory, or with `force` an existing corpus directory (one holding its manifest) or
  empty directory. Any other directory is never replaced: --force deletes corpora only."""
  given = os.fspath(out)
  out = Path(out)
  if out.exists():
    if not out.is_dir():
      raise CorpusError(f"{given!r} is not a directory; give a new path for the corpus directory")
    if not (out / MANIFEST).is_file() and any(out.iterdir()):
      raise CorpusError(f"{given!r} is not a corpus directory (no {MANIFEST} in it) and not "
                        "empty; --force replaces only a corpus directory: give a new path")
    if not force:
      raise CorpusError(f"{given!r} exists; pass --force to replace it")
    return
  why = rundir.why_unwritable(out, directory=True)
  if why:
    raise CorpusError(f"{given!r}: {why}")


def write(out: str | os.PathLike, docs: Iterable[Doc], meta: dict, heldout_frac: float,
          force: bool = False) -> dict:
  """Writes a corpus directory atomically (a temporary directory renamed at the end); returns the
  manifest. Drops exact duplicates; raises CorpusError if no document is left in a split, and
  before reading any document when `out` cannot take the corpus (check_out)."""
  if not 0 < heldout_frac < 1:
    raise CorpusError(f"heldout fraction {heldout_frac!r} must be in (0, 1)")
  given = os.fspath(out)
  out = Path(out)
  check_out(given, force)
  tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir(parents=True)
  try:
    manifest = _write_docs(tmp, docs, meta, heldout_frac)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if out.exists() and force:
      check_out(given, force)  # still a corpus directory: nothing else is ever deleted
      shutil.rmtree(out)
    try:
      os.replace(tmp, out)
    except OSError:
      if force or not (out / MANIFEST).is_file():
        raise
      return json.loads((out / MANIFEST).read_text())  # a concurrent build finished first
  except OSError as e:
    rundir.name_target_in_error(e, tmp, given)  # the corpus asked for, not the temporary one
    raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return manifest


def _write_docs(tmp: Path, docs: Iterable[Doc], meta: dict, heldout_frac: float) -> dict:
  writers = {s: _SplitWriter(tmp, s) for s in SPLITS}
  fingerprint = hashlib.sha256()
  seen, duplicates = set(), 0
  for doc in docs:
    digest = hashlib.sha256(doc.data).hexdigest()
    if (doc.prompt_bytes, digest) in seen:  # the same bytes split elsewhere are another example
      duplicates += 1
      continue
    seen.add((doc.prompt_bytes, digest))
    split = "heldout" if _is_heldout(doc.name, heldout_frac) else "train"
    writers[split].add(doc)
    fingerprint.update(f"{split}\t{doc.name}\t{doc.prompt_bytes}\t{digest}\n".encode())
  splits = {s: w.close() for s, w in writers.items()}
  total = sum(x["documents"] for x in splits.values())
  for s, info in splits.items():
    if not info["documents"]:
      found = "no documents were found" if not total + duplicates else (
          f"{total} distinct documents in all"
          + (f", {duplicates} duplicates dropped" if duplicates else ""))
      advice = ("check the input" if not total else
                "give more documents" if total == 1 else "give more documents or change --heldout")
      raise CorpusError(f"the {s} split is empty ({found}); {advice}")
  return {"version": VERSION, **meta, "heldout_frac": heldout_frac,
          "duplicates_dropped": duplicates, "splits": splits,
          "documents": sum(x["documents"] for x in splits.values()),
          "bytes": sum(x["bytes"] for x in splits.values()),
          "fingerprint": fingerprint.hexdigest()}


def build_code(out, sources=(), exts=(".py",), heldout_frac=0.05, force=False) -> dict:
  """The code corpus: source files under `sources` (default: this interpreter's stdlib)."""
  roots = [Path(s) for s in sources] or [stdlib_dir()]
  skipped: dict = {}
  meta = {"kind": "code", "sources": [str(r) for r in roots], "extensions": list(exts),
          "python": sys.version.split()[0], "skipped": skipped}
  return write(out, code_docs(roots, tuple(exts), skipped), meta, heldout_frac, force)


def build_jsonl(path, out, heldout_frac=0.05, force=False) -> dict:
  meta = {"kind": "jsonl", "sources": [str(Path(path).resolve())]}
  return write(out, jsonl_docs(path), meta, heldout_frac, force)


# ----------------------------------------------------------------------------- reading


class Split:
  """One split: per-document sizes in memory, documents read on demand."""

  def __init__(self, sizes, prompt_bytes, names, reader, where: str, base: str | None = None):
    self.sizes = np.asarray(sizes, np.int64)
    self.prompt_bytes = np.asarray(prompt_bytes, np.int64)
    self.names = names
    self._reader = reader
    self.where = where  # for messages: the corpus and split
    self._base = base  # a JSONL file's directory: names are FILE:LINE beside it

  def __len__(self) -> int:
    return len(self.sizes)

  def locate(self, i: int) -> str:
    """Where document i comes from, for messages: PATH:LINE of a JSONL line, else its name."""
    name = str(self.names[i])
    return os.path.join(self._base, name) if self._base is not None else f"{self.where}: {name}"

  def __getitem__(self, i: int) -> bytes:
    return self._reader(int(i))


@dataclasses.dataclass
class Corpus:
  path: str
  manifest: dict
  splits: dict

  @property
  def fingerprint(self) -> str:
    return self.manifest["fingerprint"]


def _array_record_reader(path: Path):
  import grain

  source = grain.sources.ArrayRecordDataSource([str(path)])
  return lambda i: source[i]


def open_dir(path: str | os.PathLike, what: str | None = None) -> Corpus:
  """A corpus directory written by `write`; `what` names the path in messages (default
  data.path=PATH)."""
  what = what or f"data.path={os.fspath(path)!r}"
  path = Path(path)
  mpath = path / MANIFEST
  if not mpath.is_file():
    why = ("no such directory" if not path.exists() else "not a directory" if not path.is_dir()
           else f"no {MANIFEST} in it")
    raise CorpusError(f"{what}: {why} (build one with `moba-jax data code OUT` or "
                      "`moba-jax data jsonl IN.jsonl OUT`)")
  try:
    manifest = json.loads(mpath.read_text())
  except ValueError as e:
    raise CorpusError(f"{mpath}: not valid JSON ({e})") from None
  if manifest.get("version") != VERSION:
    raise CorpusError(f"{mpath}: corpus version {manifest.get('version')!r}, expected {VERSION}")
  splits = {}
  for s in SPLITS:
    with np.load(path / f"{s}.index.npz") as index:
      splits[s] = Split(index["bytes"], index["prompt_bytes"], index["name"],
                        _array_record_reader(path / f"{s}.array_record"), f"{path} ({s})")
  return Corpus(str(path), manifest, splits)


def open_jsonl(path: str | os.PathLike, heldout_frac: float = 0.05) -> Corpus:
  """A JSONL file read into memory, split and deduplicated by the same rules as `write`."""
  fingerprint = hashlib.sha256()
  docs = {s: [] for s in SPLITS}
  seen = set()
  for doc in jsonl_docs(path):
    digest = hashlib.sha256(doc.data).hexdigest()
    if (doc.prompt_bytes, digest) in seen:
      continue
    seen.add((doc.prompt_bytes, digest))
    split = "heldout" if _is_heldout(doc.name, heldout_frac) else "train"
    docs[split].append(doc)
    fingerprint.update(f"{split}\t{doc.name}\t{doc.prompt_bytes}\t{digest}\n".encode())
  if not docs["train"] and not docs["heldout"]:
    raise CorpusError(f"data.path={str(path)!r} has no examples")
  if not docs["heldout"] or not docs["train"]:  # tiny files: score on the training lines
    empty = "heldout" if not docs["heldout"] else "train"
    if str(path) not in _WARNED_EMPTY:
      _WARNED_EMPTY.add(str(path))
      print(f"WARNING: data.path={str(path)!r}: no line of {len(seen)} falls in the {empty} split "
            f"(held-out fraction {heldout_frac}): both splits are the same lines, so held-out "
            "scores are of training lines", file=sys.stderr, flush=True)
    docs["heldout"] = docs["heldout"] or docs["train"]
    docs["train"] = docs["train"] or docs["heldout"]
  splits = {s: Split([len(d.data) for d in ds], [d.prompt_bytes for d in ds],
                     [d.name for d in ds], lambda i, ds=ds: ds[i].data, f"{path} ({s})",
                     base=os.path.dirname(str(path)))
            for s, ds in docs.items()}
  manifest = {"version": VERSION, "kind": "jsonl", "sources": [str(path)],
              "fingerprint": fingerprint.hexdigest(),
              "documents": len(seen)}
  return Corpus(str(path), manifest, splits)


_WARNED_EMPTY: set[str] = set()  # JSONL files warned about an empty split, once a process


def cache_dir() -> Path:
  base = os.environ.get("MOBA_JAX_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "moba_jax")
  return Path(base)


def default_code_corpus() -> Path:
  """The code corpus of this interpreter's stdlib, built once into the cache directory. Processes
  starting at once (a grid's workers, two grids) build it once: the others wait on its lock."""
  out = cache_dir() / "corpora" / f"python{sys.version.split()[0]}-stdlib"
  if (out / MANIFEST).is_file():
    return out
  if why := rundir.why_unwritable(out.parent, directory=True):
    raise CorpusError(f"the default code corpus cannot be built in {out.parent}: {why}; set "
                      "MOBA_JAX_CACHE to a writable directory, or data.path to a corpus")
  with rundir.waiting_lock(out.parent / f".{out.name}.lock"):
    if not (out / MANIFEST).is_file():  # not built by a process that held the lock before us
      print(f"building the code corpus of {stdlib_dir()} in {out} (once)", file=sys.stderr,
            flush=True)
      if out.exists():  # our own cache entry without a manifest: a broken build
        shutil.rmtree(out)
      build_code(out)
  return out


def load(path: str) -> Corpus:
  """data.path: a corpus directory, a .jsonl file, or '' for the default code corpus."""
  if not path:
    return open_dir(default_code_corpus())
  if str(path).endswith(".jsonl"):
    return open_jsonl(path)
  return open_dir(path)
