"""Real-text corpora: deterministic builds, dedup, skips, a split by name, exact read-back, the
`moba-jax data` CLI and its FILE:LINE errors; corpus rows (windows, stream) against the documents;
a tiny corpus grid through the worker pool against the sequential grid."""

import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from moba_jax import config as C
from moba_jax import corpus, data_cli, grid, grid_pool, report
from moba_jax import data as D


def heldout(name, frac):
  """The documented rule: held out when sha256(name), as a 64-bit fraction, is below frac."""
  return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") < frac * 2 ** 64


def names_by_split(frac, n_train, n_heldout, pattern):
  """The first names pattern.format(i) that fall n_train in train and n_heldout in heldout."""
  out = {"train": [], "heldout": []}
  i = 0
  while len(out["train"]) < n_train or len(out["heldout"]) < n_heldout:
    name = pattern.format(i)
    split = "heldout" if heldout(f"src/{name}", frac) else "train"
    if len(out[split]) < (n_train if split == "train" else n_heldout):
      out[split].append(name)
    i += 1
  return out


def text(seed, n_bytes):
  """Random words (some multi-byte UTF-8) of about n_bytes bytes: no long repeats."""
  rng = np.random.default_rng(seed)
  words = ["alpha", "beta", "délta", "λambda", "x", "y_2", "import", "def", "—", "0x1f"]
  out, size = [], 0
  while size < n_bytes:
    out.append(words[int(rng.integers(len(words)))] + str(int(rng.integers(1000))))
    size += len(out[-1].encode()) + 1
  return " ".join(out).encode()


def ascii_text(seed, n_bytes):
  """Exactly n_bytes of random lowercase letters and spaces (ASCII: any cut is valid UTF-8)."""
  rng = np.random.default_rng(seed)
  chars = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ", np.uint8)
  return bytes(chars[rng.integers(len(chars), size=n_bytes)])


FRAC = 0.3


@pytest.fixture()
def src(tmp_path):
  """A source tree 'src' with 8 distinct modules (both splits), a duplicate, non-UTF-8 and empty
  files, a file of another extension and a __pycache__ file. -> (root, {name: bytes kept})."""
  root = tmp_path / "src"
  (root / "pkg").mkdir(parents=True)
  (root / "__pycache__").mkdir()
  picked = names_by_split(FRAC, 5, 3, "pkg/m{:02d}.py")
  kept = {}
  for i, name in enumerate(picked["train"] + picked["heldout"]):
    data = f"# module {i}\nX = {i}\n".encode() + text(i, 200)
    (root / name).write_bytes(data)
    kept[f"src/{name}"] = data
  first = sorted(kept)[0]
  (root / "pkg" / "zz_copy.py").write_bytes(kept[first])  # sorts after its original: dropped
  (root / "bad.py").write_bytes(b"x = '\xff\xfe'\n")
  (root / "empty.py").write_bytes(b"")
  (root / "blank.py").write_bytes(b"  \n\t\n")
  (root / "notes.txt").write_bytes(b"not a .py file\n")
  (root / "__pycache__" / "cached.py").write_bytes(b"skipped dir\n")
  return root, kept


def read_back(path):
  """{name: bytes} of every document of a corpus directory, and {name: split}."""
  c = corpus.open_dir(path)
  docs, split_of = {}, {}
  for s, sp in c.splits.items():
    assert len(sp) == len(sp.names) == len(sp.sizes)
    for i, name in enumerate(sp.names):
      docs[str(name)] = sp[i]
      split_of[str(name)] = s
      assert sp.sizes[i] == len(sp[i]) and sp.prompt_bytes[i] == -1
  return c, docs, split_of


# ----------------------------------------------------------------------------- building


def test_code_corpus_dedups_skips_and_reads_back_exactly(src, tmp_path):
  root, kept = src
  m = corpus.build_code(tmp_path / "out", sources=[root], heldout_frac=FRAC)
  assert m["duplicates_dropped"] == 1
  assert m["skipped"] == {"not_utf8": 1, "empty": 2}
  assert m["documents"] == len(kept) and m["bytes"] == sum(map(len, kept.values()))
  c, docs, split_of = read_back(tmp_path / "out")
  assert docs == kept  # every document's exact bytes, the duplicate's first name kept
  assert split_of == {n: "heldout" if heldout(n, FRAC) else "train" for n in kept}
  assert c.fingerprint == m["fingerprint"]
  assert c.manifest == json.loads((tmp_path / "out" / corpus.MANIFEST).read_text())
  for s in corpus.SPLITS:
    assert m["splits"][s]["documents"] == list(split_of.values()).count(s)
    assert m["splits"][s]["bytes"] == sum(len(kept[n]) for n in kept if split_of[n] == s)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary left


def test_fingerprint_is_deterministic_and_tracks_content(src, tmp_path):
  root, kept = src
  a = corpus.build_code(tmp_path / "a", sources=[root], heldout_frac=FRAC)
  b = corpus.build_code(tmp_path / "b", sources=[root], heldout_frac=FRAC)
  assert a["fingerprint"] == b["fingerprint"] and a["splits"] == b["splits"]
  name = sorted(kept)[3]
  (root.parent / name).write_bytes(kept[name] + b"# one more line\n")
  c = corpus.build_code(tmp_path / "c", sources=[root], heldout_frac=FRAC)
  assert c["fingerprint"] != a["fingerprint"] and c["documents"] == a["documents"]


def test_split_depends_only_on_the_name(src, tmp_path):
  root, kept = src
  corpus.build_code(tmp_path / "all", sources=[root], heldout_frac=FRAC)
  _, _, full = read_back(tmp_path / "all")
  subset = [n for n in sorted(kept) if full[n] == "train"][:2]
  subset += [n for n in sorted(kept) if full[n] == "heldout"][:1]
  small = tmp_path / "other" / "src"  # same root name, fewer files
  for n in subset:  # n = "src/pkg/mNN.py"
    (small.parent / n).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(root.parent / n, small.parent / n)
  corpus.build_code(tmp_path / "few", sources=[small], heldout_frac=FRAC)
  _, docs, part = read_back(tmp_path / "few")
  assert sorted(docs) == subset and all(part[n] == full[n] for n in subset)


def test_refuses_to_overwrite_and_failed_builds_leave_nothing(src, tmp_path):
  root, kept = src
  out = tmp_path / "out"
  first = corpus.build_code(out, sources=[root], heldout_frac=FRAC)
  with pytest.raises(corpus.CorpusError, match="exists; pass --force"):
    corpus.build_code(out, sources=[root], heldout_frac=FRAC)
  empty = tmp_path / "nothing"
  empty.mkdir()
  (empty / "e.py").write_bytes(b"\n")
  with pytest.raises(corpus.CorpusError, match=r"split is empty \(no documents were found\); "
                                               "check the input"):
    corpus.build_code(out, sources=[empty], heldout_frac=FRAC, force=True)
  with pytest.raises(corpus.CorpusError, match="split is empty"):
    corpus.build_code(tmp_path / "new", sources=[empty], heldout_frac=FRAC)
  lines = empty / "same.jsonl"  # one document 50 times: the duplicates are named
  lines.write_text('{"text": "the same line"}\n' * 50)
  with pytest.raises(corpus.CorpusError, match=r"split is empty \(1 distinct documents in all, "
                                               r"49 duplicates dropped\); give more documents$"):
    corpus.build_jsonl(lines, tmp_path / "same", heldout_frac=0.5)
  assert not (tmp_path / "new").exists()
  assert corpus.open_dir(out).fingerprint == first["fingerprint"]  # the old corpus survives
  name = sorted(kept)[0]
  (root.parent / name).write_bytes(b"changed = True\n")
  again = corpus.build_code(out, sources=[root], heldout_frac=FRAC, force=True)
  assert again["fingerprint"] != first["fingerprint"]
  assert read_back(out)[1][name] == b"changed = True\n"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["nothing", "out", "src"]


def test_open_dir_errors(tmp_path):
  with pytest.raises(corpus.CorpusError, match="no such directory"):
    corpus.open_dir(tmp_path / "missing")
  (tmp_path / "d").mkdir()
  with pytest.raises(corpus.CorpusError, match="no manifest.json in it"):
    corpus.open_dir(tmp_path / "d")
  with pytest.raises(corpus.CorpusError, match="is not a directory"):
    corpus.build_code(tmp_path / "out", sources=[tmp_path / "missing"])


# ----------------------------------------------------------------------------- CLI


def test_cli_code_and_info(src, tmp_path, capsys):
  root, kept = src
  out = tmp_path / "out"
  assert data_cli.main(["code", str(out), "--source", str(root), "--heldout", str(FRAC)]) == 0
  manifest = json.loads((out / corpus.MANIFEST).read_text())
  printed = capsys.readouterr().out
  assert f"fingerprint {manifest['fingerprint']}" in printed and "1 duplicates dropped" in printed
  assert data_cli.main(["info", str(out)]) == 0
  assert json.loads(capsys.readouterr().out) == manifest
  assert data_cli.main(["code", str(out), "--source", str(root)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and str(out) in err[0] and "--force" in err[0]
  assert data_cli.main(["info", str(tmp_path / "none")]) == 2
  assert "no such directory" in capsys.readouterr().err
  assert data_cli.main(["code", str(tmp_path / "txt"), "--source", str(root), "--ext", ".txt",
                        "--heldout", "0.5", "--force"]) == 2  # one .txt file: a split is empty
  capsys.readouterr()


def test_cli_jsonl_builds_text_and_sft(tmp_path, capsys):
  path = tmp_path / "d.jsonl"
  lines = [{"prompt": f"Q{i}: ", "response": f"réponse {i}"} for i in range(30)]
  lines += [{"text": f"plain {i}"} for i in range(30)] + [lines[0]]  # the last one: a duplicate
  path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
  assert data_cli.main(["jsonl", str(path), str(tmp_path / "out"), "--heldout", "0.3"]) == 0
  c = corpus.open_dir(tmp_path / "out")
  assert c.manifest["duplicates_dropped"] == 1 and c.manifest["documents"] == 60
  seen = set()
  for sp in c.splits.values():
    for i, name in enumerate(sp.names):
      lineno = int(str(name).rsplit(":", 1)[1])
      seen.add(lineno)
      x = lines[lineno - 1]
      if "text" in x:
        assert sp[i] == x["text"].encode() and sp.prompt_bytes[i] == -1
      else:
        assert sp[i] == (x["prompt"] + x["response"]).encode()
        assert sp.prompt_bytes[i] == len(x["prompt"].encode())
  assert seen == set(range(1, 61))
  capsys.readouterr()


def test_the_same_bytes_split_elsewhere_are_other_examples(tmp_path, capsys):
  """Deduplication keys on the content and where the prompt ends: a text line and two examples
  of the same bytes are three documents (built and read in memory alike); a repeat is dropped."""
  lines = [{"prompt": "ab", "response": "c"}, {"prompt": "a", "response": "bc"}, {"text": "abc"},
           {"prompt": "a", "response": "bc"}]
  lines += [{"text": f"filler {i}"} for i in range(40)]  # both splits get a document
  path = tmp_path / "d.jsonl"
  path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
  assert data_cli.main(["jsonl", str(path), str(tmp_path / "out"), "--heldout", "0.3"]) == 0
  for c in (corpus.open_dir(tmp_path / "out"), corpus.open_jsonl(path, 0.3)):
    kept = sorted((bytes(sp[i]), int(sp.prompt_bytes[i])) for sp in c.splits.values()
                  for i in range(len(sp)) if bytes(sp[i]) == b"abc")
    assert kept == [(b"abc", -1), (b"abc", 1), (b"abc", 2)]
    assert c.manifest["documents"] == 43
  capsys.readouterr()


def test_a_jsonl_file_without_a_held_out_line_says_so_once(tmp_path, capsys):
  """A file too small for a held-out line is scored on its training lines, with one warning
  naming the file (not each time it is opened); its document count is its distinct lines."""
  path = tmp_path / "small.jsonl"
  assert not any(heldout(f"small.jsonl:{i}", 0.05) for i in range(1, 4))  # names: FILE:LINE
  path.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(3)))
  for _ in range(2):
    c = corpus.open_jsonl(path)
    assert len(c.splits["train"]) == len(c.splits["heldout"]) == 3
    assert c.manifest["documents"] == 3
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"WARNING: data.path={str(path)!r}: no line of 3 "
                                             "falls in the heldout split"), err


BAD_LINES = [
    (b"3", "a line must be a JSON object, got int"),
    (b'{"text": 5}', "'text' must be a non-empty string"),
    (b'{"text": "unterminated', "not valid JSON"),
    (b'{"text": "caf\xe9"}', "not UTF-8"),
    (b'{"prompt": "p"}', "needs 'text' or 'prompt' and 'response'"),
    (b'{"prompt": "p", "response": 3}', "'prompt' and 'response' must be strings"),
    (b'{"prompt": "p", "response": ""}', "'response' is empty"),
]


@pytest.mark.parametrize("bad, needle", BAD_LINES)
def test_cli_jsonl_errors_name_file_and_line(tmp_path, capsys, bad, needle):
  path = tmp_path / "in.jsonl"
  path.write_bytes(b'{"text": "fine"}\n\n{"prompt": "a", "response": "b"}\n' + bad
                   + b'\n{"text": "after"}\n')
  out = tmp_path / "out"
  assert data_cli.main(["jsonl", str(path), str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"moba-jax data: {path}:4: ") and needle in err[0]
  assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


def test_cli_jsonl_missing_file(tmp_path, capsys):
  assert data_cli.main(["jsonl", str(tmp_path / "nope.jsonl"), str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "nope.jsonl" in err[0] and "no such file" in err[0]
  assert data_cli.main(["jsonl", str(tmp_path), str(tmp_path / "out")]) == 2
  assert "is a directory" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()


def _jsonl(tmp_path):
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(20)))
  return path


def test_cli_force_replaces_only_a_corpus_directory(tmp_path, capsys, monkeypatch):
  """--force on a directory that is not a corpus: one line, exit 2, nothing read or deleted."""
  path = _jsonl(tmp_path)
  precious = tmp_path / "precious"
  precious.mkdir()
  (precious / "notes.txt").write_text("keep me\n")
  read = []
  monkeypatch.setattr(corpus, "_write_docs", lambda *a: read.append(a))  # nothing is built
  for force in (["--force"], []):
    assert data_cli.main(["jsonl", str(path), str(precious), *force]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"moba-jax data: {str(precious)!r} is not a "
                                               "corpus directory (no manifest.json"), err
  assert not read and [p.name for p in precious.iterdir()] == ["notes.txt"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "precious"]
  monkeypatch.undo()
  out = tmp_path / "out"
  assert data_cli.main(["jsonl", str(path), str(out), "--heldout", "0.3"]) == 0
  first = corpus.open_dir(out).fingerprint
  path.write_text(path.read_text() + json.dumps({"text": "one more"}) + "\n")
  assert data_cli.main(["jsonl", str(path), str(out), "--heldout", "0.3", "--force"]) == 0
  assert corpus.open_dir(out).fingerprint != first  # a corpus directory is still replaced
  (tmp_path / "empty").mkdir()
  assert data_cli.main(["jsonl", str(path), str(tmp_path / "empty"), "--heldout", "0.3",
                        "--force"]) == 0
  capsys.readouterr()


@pytest.mark.parametrize("out, force, message", [
    ("afile/sub", [], "'afile/sub': 'afile' is not a directory"),
    ("afile/sub/deeper", ["--force"], "'afile/sub/deeper': 'afile' is not a directory"),
    ("afile", ["--force"], "'afile' is not a directory"),
    ("afile", [], "'afile' is not a directory"),
])
def test_cli_out_under_a_file_is_named_before_building(tmp_path, capsys, monkeypatch, out, force,
                                                       message):
  path = _jsonl(tmp_path)
  (tmp_path / "afile").write_text("a file\n")
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(corpus, "_write_docs", lambda *a: pytest.fail("built a corpus"))
  assert data_cli.main(["jsonl", str(path), out, *force]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f"moba-jax data: {message}; give a new path for the corpus directory"
                 if out == "afile" else f"moba-jax data: {message}"], err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "docs.jsonl"]
  assert (tmp_path / "afile").read_text() == "a file\n"


def test_cli_info_names_the_path_as_given(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "afile").write_text("x\n")
  for given, why in (("./nope/", "no such directory"), ("afile", "not a directory")):
    assert data_cli.main(["info", given]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"moba-jax data: {given!r}: {why} ("), err
    assert "data.path" not in err[0]


def test_default_code_corpus_rebuilds_its_own_broken_cache_entry(tmp_path, monkeypatch, capsys):
  """The cache's corpus without a manifest (an old broken build) is rebuilt, not refused."""
  std = tmp_path / "std"
  std.mkdir()
  names = [f"m{i:03d}.py" for i in range(60)]
  assert any(heldout(f"stdlib/{n}", 0.05) for n in names)  # both splits have a document
  for i, name in enumerate(names):
    (std / name).write_text(f"X = {i}\n")
  monkeypatch.setattr(corpus, "stdlib_dir", lambda: std)
  monkeypatch.setenv("MOBA_JAX_CACHE", str(tmp_path / "cache"))
  broken = tmp_path / "cache" / "corpora" / f"python{sys.version.split()[0]}-stdlib"
  broken.mkdir(parents=True)
  (broken / "train.array_record").write_bytes(b"half")
  assert corpus.default_code_corpus() == broken
  assert corpus.open_dir(broken).manifest["documents"] == 60
  assert "building the code corpus" in capsys.readouterr().err


def test_default_code_corpus_is_built_once_by_concurrent_callers(tmp_path, monkeypatch):
  """Callers starting at once (a grid's workers) build the cache's corpus once, and none of them
  deletes the corpus another one built (each sees it whole)."""
  import threading
  import time

  std = tmp_path / "std"
  std.mkdir()
  for i in range(60):
    (std / f"m{i:03d}.py").write_text(f"X = {i}\n")
  monkeypatch.setattr(corpus, "stdlib_dir", lambda: std)
  monkeypatch.setenv("MOBA_JAX_CACHE", str(tmp_path / "cache"))
  builds, real_build = [], corpus.build_code

  def slow_build(out, *a, **k):
    builds.append(out)
    time.sleep(0.5)  # the others arrive while this build runs
    return real_build(out, *a, **k)

  monkeypatch.setattr(corpus, "build_code", slow_build)
  got, errors = [], []

  def call():
    try:
      path = corpus.default_code_corpus()
      got.append((path, corpus.open_dir(path).manifest["documents"]))
    except Exception as e:  # noqa: BLE001 - reported below
      errors.append(e)

  threads = [threading.Thread(target=call) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors
  assert len(builds) == 1
  assert len(got) == 4 and all(docs == 60 for _, docs in got)
  assert len({p for p, _ in got}) == 1


def test_default_code_corpus_names_a_cache_it_cannot_build_in(tmp_path, monkeypatch):
  """A cache path under a file: a CorpusError naming the place and MOBA_JAX_CACHE, before any
  lock file or document."""
  (tmp_path / "afile").write_text("x")
  monkeypatch.setenv("MOBA_JAX_CACHE", str(tmp_path / "afile" / "cache"))
  with pytest.raises(corpus.CorpusError, match=r"cannot be built in .*afile/cache/corpora: "
                                               r"'.*afile' is not a directory; set MOBA_JAX_CACHE"):
    corpus.default_code_corpus()


def test_jsonl_split_does_not_depend_on_the_file_location(tmp_path):
  lines = "".join(json.dumps({"text": f"line {i} " * 4}) + "\n" for i in range(60))
  splits, prints = [], []
  for d in ("a", "b"):
    (tmp_path / d).mkdir()
    (tmp_path / d / "data.jsonl").write_text(lines)
    c = corpus.open_jsonl(tmp_path / d / "data.jsonl", 0.3)
    splits.append([str(n).rsplit(":", 1)[1] for n in c.splits["heldout"].names])
    prints.append(c.fingerprint)
  assert splits[0] == splits[1] and prints[0] == prints[1]


# ----------------------------------------------------------------------------- rows

SEQ, R = 96, 16


def doc_tokens(data):
  return np.concatenate([[D.BOS], np.frombuffer(data, np.uint8).astype(np.int64) + D.BYTE_OFFSET,
                         [D.EOS]])


def find(haystack, needle):
  """Start positions of needle in haystack (1-D int arrays)."""
  if len(needle) > len(haystack):
    return []
  win = np.lib.stride_tricks.sliding_window_view(haystack, len(needle))
  return list(np.flatnonzero((win == needle).all(axis=1)))


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
  """Training documents of 2500, 40, 4000, 60 and 1200 bytes (in this order), held-out ones of
  1500 and 900 bytes. -> (dir, {split: [bytes in corpus order]})."""
  base = tmp_path_factory.mktemp("textcorpus")
  root = base / "src"
  root.mkdir()
  picked = names_by_split(0.3, 5, 2, "doc{:02d}.py")
  sizes = dict(zip(picked["train"] + picked["heldout"], (2500, 40, 4000, 60, 1200, 1500, 900)))
  for i, (name, n) in enumerate(sizes.items()):
    (root / name).write_bytes(text(100 + i, n))
  corpus.build_code(base / "corpus", sources=[root], heldout_frac=0.3)
  c = corpus.open_dir(base / "corpus")
  docs = {s: [c.splits[s][i] for i in range(len(c.splits[s]))] for s in corpus.SPLITS}
  assert [len(d) < 100 for d in docs["train"]] == [False, True, False, True, False]
  assert len(docs["heldout"]) == 2
  return base / "corpus", docs


def corpus_cfg(path, *extra):
  return C.load_config(None, ["data.task=corpus", f"data.path={path}", "model.vocab_size=259",
                              f"train.seq_len={SEQ}", "eval.trailing_tokens=16", "data.prefetch=0",
                              *extra])


def whole(row):
  return np.concatenate([row["inputs"], row["targets"][-1:]]).astype(np.int64)


def check_window(row, docs):
  """A windows row: one segment, positions 0..T-1, a slice of exactly one of these documents,
  and the targets are the next inputs. -> the document's index."""
  assert all(row[k].shape == (SEQ,) for k in D.FIELDS)
  assert np.all(row["segment_ids"] == 1) and np.array_equal(row["positions"], np.arange(SEQ))
  assert np.array_equal(row["targets"][:-1], row["inputs"][1:])
  hits = [i for i, d in enumerate(docs) if find(doc_tokens(d), whole(row))]
  assert len(hits) == 1
  return hits[0]


def test_windows_rows_are_slices_of_one_document_with_the_last_r_targets(text_corpus):
  path, docs = text_corpus
  cfg = corpus_cfg(path, f"data.response_tokens={R}")
  train, evals = D.RowSource(cfg, "train"), D.RowSource(cfg, "eval")
  assert train.rows.kind == "windows" and train.fingerprint == corpus.open_dir(path).fingerprint
  expect = np.zeros(SEQ, np.float32)
  expect[-R:] = 1
  used = set()
  for r in range(30):
    row = train[r]
    used.add(check_window(row, docs["train"]))
    assert np.array_equal(row["mask"], expect) and row["mask"].dtype == np.float32
    ev = evals[r]
    check_window(ev, docs["heldout"])  # held-out rows come from held-out documents only
    assert np.array_equal(ev["mask"], expect)
  assert used == {0, 2, 4}  # long documents only: the 40- and 60-byte ones have no window


def test_windows_reach_both_ends_of_a_document(tmp_path):
  """Documents of seq+1 and seq+2 tokens have 1 and 2 windows (BOS first, EOS last); one of seq
  tokens has none: every row is one of those 3 windows, and all 3 occur."""
  root = tmp_path / "src"
  root.mkdir()
  picked = names_by_split(0.3, 3, 1, "w{:02d}.py")
  lens = dict(zip(picked["train"], (SEQ - 1, SEQ, SEQ - 2)))  # bytes: tokens = bytes + 2
  lens[picked["heldout"][0]] = SEQ
  for i, (name, n) in enumerate(lens.items()):
    (root / name).write_bytes(ascii_text(200 + i, n))
  corpus.build_code(tmp_path / "c", sources=[root], heldout_frac=0.3)
  c = corpus.open_dir(tmp_path / "c")
  toks = {str(c.splits["train"].names[i]).split("/")[-1]: doc_tokens(c.splits["train"][i])
          for i in range(3)}
  a, b = toks[picked["train"][0]], toks[picked["train"][1]]
  windows = {tuple(a), tuple(b[:SEQ + 1]), tuple(b[1:])}
  src = D.RowSource(corpus_cfg(tmp_path / "c", f"data.response_tokens={R}"))
  seen = {tuple(whole(src[r])) for r in range(60)}
  assert seen == windows
  with pytest.raises(ValueError, match=r"train.seq_len \+ 1 = 99"):
    D.RowSource(corpus_cfg(tmp_path / "c", f"data.response_tokens={R}", "train.seq_len=98"))


def test_stream_rows_follow_the_joined_documents(text_corpus):
  path, docs = text_corpus
  src = D.RowSource(corpus_cfg(path))
  assert src.rows.kind == "stream"
  stream = np.concatenate([doc_tokens(d) for d in docs["train"]])
  doc_of = np.concatenate([np.full(len(d) + 2, i) for i, d in enumerate(docs["train"])])

  def check(row):
    at = find(stream, whole(row))
    assert len(at) == 1  # a slice of BOS doc EOS BOS doc EOS ...
    ids = doc_of[at[0]:at[0] + SEQ + 1]
    assert np.array_equal(row["segment_ids"], ids[:-1] - ids[0] + 1)
    assert np.array_equal(row["mask"], (ids[:-1] == ids[1:]).astype(np.float32))
    assert np.all(row["mask"][row["targets"] == D.BOS] == 0)  # no target across documents
    starts = np.flatnonzero(np.diff(row["segment_ids"], prepend=0))
    for s, e in zip(starts, np.append(starts[1:], SEQ)):
      assert np.array_equal(row["positions"][s:e], np.arange(e - s))

  for r in range(10):
    check(src[r])
  # Rows that cross one boundary, and rows that hold a whole short document (3 segments).
  by_segments = {}
  for r in range(3000):
    row = src[r]
    by_segments.setdefault(int(row["segment_ids"].max()), row)
    if len(by_segments) == 3:
      break
  assert sorted(by_segments) == [1, 2, 3]
  for row in by_segments.values():
    check(row)
  with pytest.raises(ValueError, match=r"fewer than train.seq_len \+ 1"):
    D.RowSource(corpus_cfg(path, "train.seq_len=8000"))


def test_loss_on_all_weighs_training_rows_only(text_corpus):
  path, _ = text_corpus
  cfg = corpus_cfg(path, f"data.response_tokens={R}", "data.loss_on=all")
  train, evals = D.RowSource(cfg, "train"), D.RowSource(cfg, "eval")
  for r in range(5):
    assert np.all(train[r]["mask"] == 1)
    ev = evals[r]
    assert ev["mask"].sum() == R and np.all(ev["mask"][-R:] == 1)
  answer = D.RowSource(corpus_cfg(path, f"data.response_tokens={R}", "data.loss_on=answer"))
  assert answer[0]["mask"].sum() == R
  # The rows themselves do not depend on loss_on.
  plain = D.RowSource(corpus_cfg(path, f"data.response_tokens={R}"))
  assert np.array_equal(plain[2]["inputs"], train[2]["inputs"])


def test_corpus_rows_are_deterministic_and_seeded(text_corpus):
  path, _ = text_corpus
  for extra in ([f"data.response_tokens={R}"], []):
    s0 = corpus_cfg(path, *extra)
    s1 = corpus_cfg(path, *extra, "train.seed=1")
    a, b = D.RowSource(s0), D.RowSource(s1)
    first, again = a[3], D.RowSource(s0)[3]
    assert all(np.array_equal(first[k], again[k]) for k in D.FIELDS)
    differ = sum(not np.array_equal(a[r]["inputs"], b[r]["inputs"]) for r in range(4))
    assert differ >= 3
    for r in range(3):
      ea, eb = D.RowSource(s0, "eval")[r], D.RowSource(s1, "eval")[r]
      assert all(np.array_equal(ea[k], eb[k]) for k in D.FIELDS)
    other = D.RowSource(corpus_cfg(path, *extra, "data.seed=5"), "eval")
    assert not np.array_equal(other[0]["inputs"], D.RowSource(s0, "eval")[0]["inputs"])


def test_corpus_batches_through_grain(text_corpus):
  path, _ = text_corpus
  cfg = corpus_cfg(path, f"data.response_tokens={R}", "train.batch_size=4")
  src = D.RowSource(cfg)
  batch = next(iter(D.train_dataset(cfg)))
  for k in D.FIELDS:
    assert batch[k].shape == (4, SEQ)
    assert np.array_equal(batch[k], np.stack([src[i][k] for i in range(4)]))


def test_sft_response_longer_than_the_row_names_its_line(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # names "sft.jsonl:N": lines 1-3 all fall in train (split by name)
  assert not any(heldout(f"sft.jsonl:{i}", 0.05) for i in (1, 2, 3))
  lines = [{"prompt": "p" * 500, "response": "r" * (SEQ - 2)},  # fits: SEQ - 1 tokens with EOS
           {"text": "t" * 300},
           {"prompt": "p", "response": "r" * (SEQ - 1)}]  # one token too many
  Path("sft.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  for split in ("train", "eval"):  # a held-out split of train lines only: it uses them too
    with pytest.raises(ValueError, match=r"(^|/)sft\.jsonl:3: the response has 96 tokens with "
                       "its EOS, more than fit after BOS in train.seq_len=96$"):
      D.RowSource(corpus_cfg("sft.jsonl"), split)
  Path("sft.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines[:2]))
  resp = D.BYTE_OFFSET + ord("r")
  kinds = set()
  for r in range(8):  # eval rows: one example each, cut to the row (SFT: its end; text: its start)
    row = D.RowSource(corpus_cfg("sft.jsonl"), "eval")[r]
    assert np.all(row["segment_ids"] == 1)
    if np.any(row["targets"] == resp):
      assert np.array_equal(row["mask"] == 1, (row["targets"] == resp) | (row["targets"] == D.EOS))
      assert row["mask"].sum() == SEQ - 1 and row["targets"][-1] == D.EOS
      kinds.add("sft")
    else:
      assert row["inputs"][0] == D.BOS and np.all(row["mask"] == 1)
      kinds.add("text")
  assert kinds == {"sft", "text"}
  with pytest.raises(ValueError, match="applies to plain-text corpora"):
    D.RowSource(corpus_cfg("sft.jsonl", "data.response_tokens=8"))


def test_eval_rows_of_an_sft_corpus_are_examples(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  held = [i for i in range(1, 31) if heldout(f"mixed.jsonl:{i}", 0.05)]
  assert held == [27]
  lines = [{"text": "t" * 300} if i in held else {"prompt": f"q{i} ", "response": f"a{i}"}
           for i in range(1, 31)]
  Path("mixed.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  train, evals = D.RowSource(corpus_cfg("mixed.jsonl")), D.RowSource(corpus_cfg("mixed.jsonl"),
                                                                      "eval")
  assert train.rows.kind == "examples"
  assert evals.rows.kind == "examples"
  row = evals[0]
  assert row["inputs"][0] == D.BOS and np.all(row["mask"] == 1)  # the text line from its start


def test_response_tokens_checked_by_config(tmp_path):
  from moba_jax.train import validate
  with pytest.raises(ValueError, match=f"data.response_tokens={SEQ} .* < train.seq_len={SEQ}"):
    validate(corpus_cfg(tmp_path / "x", f"data.response_tokens={SEQ}"))
  with pytest.raises(ValueError, match="applies to data.task='corpus'"):
    validate(C.load_config(None, ["data.task=lm", "data.response_tokens=8"]))
  cfg = validate(corpus_cfg(tmp_path / "x", f"data.response_tokens={SEQ - 1}"))
  assert cfg.data.response_tokens == 95


# ----------------------------------------------------------------------------- grid worker pool


def test_worker_env_spreads_workers_over_gpus(monkeypatch):
  monkeypatch.setenv("MOBA_TEST_KEEP", "1")
  envs = [grid_pool.worker_env(s, 4, ["3", "7"]) for s in range(4)]
  assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["3", "7", "3", "7"]
  assert {float(e["XLA_PYTHON_CLIENT_MEM_FRACTION"]) for e in envs} == {0.45}
  assert all(e["MOBA_TEST_KEEP"] == "1" for e in envs)
  one = [grid_pool.worker_env(s, 3, ["0"]) for s in range(3)]
  assert [e["CUDA_VISIBLE_DEVICES"] for e in one] == ["0"] * 3
  assert all(float(e["XLA_PYTHON_CLIENT_MEM_FRACTION"]) == pytest.approx(0.3, abs=1e-3)
             for e in one)
  alone = grid_pool.worker_env(1, 2, ["0", "1", "2"])
  assert alone["CUDA_VISIBLE_DEVICES"] == "1" and float(alone["XLA_PYTHON_CLIENT_MEM_FRACTION"]) \
      == pytest.approx(0.9)
  # Uneven: no GPU's workers together ask for more than 0.9 of it.
  uneven = [grid_pool.worker_env(s, 5, ["0", "1"]) for s in range(5)]
  for gpu in ("0", "1"):
    share = [float(e["XLA_PYTHON_CLIENT_MEM_FRACTION"]) for e in uneven
             if e["CUDA_VISIBLE_DEVICES"] == gpu]
    assert 0 < sum(share) <= 0.9 + 1e-9
  before = dict(grid_pool.os.environ)
  assert grid_pool.worker_env(0, 2, []) == before  # CPU: nothing changes
  assert dict(grid_pool.os.environ) == before  # and the parent's environment is untouched


def test_visible_gpus_from_cuda_visible_devices(monkeypatch):
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
  assert grid_pool.visible_gpus() == ["2", "5"]
  for value in ("", "-1"):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert grid_pool.visible_gpus() == []


POOL_GRID = """
run_dir = "unused"
[model]
vocab_size = 259
d_model = 16
n_layers = 2
n_heads = 2
n_kv_heads = 1
head_dim = 8
mlp_dim = 32
[moba]
block_size = 16
topk = 2
[train]
steps = 2
batch_size = 2
seq_len = 64
warmup_steps = 1
[data]
task = "corpus"
path = "{corpus}"
response_tokens = 16
prefetch = 0
[eval]
batches = 1
trailing_tokens = 16
[checkpoint]
every = 0
[log]
every = 1
[mesh]
data = 1
[grid]
seeds = [0, 1]
variants = [0]
jax_cache = false
[grid.pretrain.data]
response_tokens = 0
"""


@pytest.fixture(scope="module")
def pool_grids(text_corpus, tmp_path_factory):
  """The same corpus grid (LM stream pretraining, SFT windows for seeds 0 and 1) run in this
  process and through a pool of 2 worker processes. -> (toml, sequential out, pool out)."""
  path, _ = text_corpus
  base = tmp_path_factory.mktemp("poolgrid")
  toml = base / "tiny.toml"
  toml.write_text(POOL_GRID.format(corpus=path))
  seq_out, pool_out = base / "seq", base / "pool"
  assert grid.main([str(toml), f"out_dir={seq_out}", "--no-progress"]) == 0
  # The workers share a persistent compilation cache (in their processes only): stage 1 compiles.
  assert grid.main([str(toml), f"out_dir={pool_out}", "workers=2", "grid.jax_cache=true",
                    "--no-progress"]) == 0
  return toml, seq_out, pool_out


RUNS = ("pretrain", "sft/moba/seed0", "sft/moba/seed1")


def test_pool_grid_matches_the_sequential_grid(pool_grids):
  _, seq_out, pool_out = pool_grids
  for name in report.RESULT_FILES:
    assert (pool_out / name).is_file()
  rows = json.loads((pool_out / "results.json").read_text())["rows"]
  assert [(r["variant"], r["status"], r["n_seeds"]) for r in rows] == [("moba", "done", 2)]
  fp = corpus.open_dir(json.loads((pool_out / "experiment.json").read_text())["config"]["data"]
                       ["path"]).fingerprint
  assert json.loads((pool_out / "experiment.json").read_text())["corpus_fingerprint"] == \
      {"pretrain": fp, "sft": fp}
  summaries = {}
  for run in RUNS:
    assert (pool_out / run / "worker.log").is_file() and not (seq_out / run / "worker.log").exists()
    assert json.loads((pool_out / run / report.RUN_FILE).read_text())["status"] == "done"
    a, b = (json.loads((out / run / "summary.json").read_text()) for out in (seq_out, pool_out))
    assert a["status"] == b["status"] == "done" and a["step"] == b["step"] == 2
    for key in ("final_train_loss", "eval_loss", "trailing_loss"):
      assert math.isfinite(a[key]) and b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-6)
    steps = [[json.loads(x)["loss"] for x in (out / run / "metrics.jsonl").read_text().splitlines()]
             for out in (seq_out, pool_out)]
    assert len(steps[0]) == 2 and np.allclose(steps[0], steps[1], rtol=1e-6, atol=1e-6)
    summaries[run] = a
  # The seeds really differ (the workers did not all run one seed).
  assert summaries[RUNS[1]]["final_train_loss"] != summaries[RUNS[2]]["final_train_loss"]


def test_pool_runs_stage_one_alone_then_the_seeds_side_by_side(pool_grids):
  _, _, pool_out = pool_grids
  rec = {run: json.loads((pool_out / run / report.RUN_FILE).read_text()) for run in RUNS}
  pre, s0, s1 = (rec[r] for r in RUNS)
  assert pre["finished"] <= min(s0["started"], s1["started"])
  assert s0["started"] < s1["finished"] and s1["started"] < s0["finished"]  # 2 at a time
  sft_cfg = C.load_config(str(pool_out / RUNS[1] / "config.toml"))
  assert sft_cfg.train.init_from == str(pool_out / "pretrain")
  assert "[grid" not in (pool_out / RUNS[1] / "config.toml").read_text()  # a run's config only


def test_worker_argv_selects_one_run():
  argv = grid_pool.worker_argv("exp.toml", ["out_dir=/o", "workers=2"], "sft", "all", 3)
  assert argv[1:5] == ["-m", "moba_jax.cli", "grid", "exp.toml"]
  assert argv.index("workers=2") < argv.index("grid.workers=1")  # the worker runs one at a time
  assert {"--stage=sft", "--worker", "--variant=all", "--seed=3"} <= set(argv)
  assert "--variant=None" not in grid_pool.worker_argv("exp.toml", [], "pretrain")
