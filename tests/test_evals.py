"""`moba-jax eval` (moba_jax/evals.py): prompts have the requested length with the needle at the
requested depth, the scorer reads the answer tokens (oracle models score 1.0 and 0.0), forward and
decode modes agree on a real tiny model, results are written consistently, errors exit 2."""

import dataclasses
import json
import os
import re
import shutil

import numpy as np
import pytest

from moba_jax import data as data_lib
from moba_jax import evals
from moba_jax import generate as gen
from moba_jax.model import set_attention
from tests.helpers import train_tiny_text_model

CONTEXT = 128
DEPTHS = (0.0, 0.3, 0.5, 1.0)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp("evals_corpus") / "corpus.jsonl"
  path.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) + "\n"
                          for i in range(40)))
  return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus):
  """A tiny byte-level model (1 MoBA + 1 full layer, 8 blocks of 16) trained one step on a JSONL
  corpus (tests/helpers.train_tiny_text_model at a context of 128)."""
  return train_tiny_text_model(tmp_path_factory.mktemp("evals"), corpus, context=CONTEXT,
                               block_size=16)


@pytest.fixture(scope="module")
def model(run_dir):
  ckpt_dir = run_dir / "checkpoints"
  return gen.load_model(ckpt_dir, gen.checkpoint_config(ckpt_dir, run_dir, None, []))[0]


def text(tokens) -> str:
  return b"".join(gen.token_bytes(int(t)) for t in tokens).decode()


# ----------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("task", evals.TASKS)
@pytest.mark.parametrize("source", ["filler", "corpus"])
def test_the_needle_sits_at_the_depth_and_the_example_has_the_length(task, source, corpus):
  from moba_jax import corpus as corpus_lib

  hay = evals.FillerHaystack() if source == "filler" else evals.CorpusHaystack(
      corpus_lib.load(str(corpus)).splits["heldout"], "test corpus")
  prompts = evals.Prompts(task, hay, digits=5)
  for length in (prompts.min_length(), 200, 301):
    for sample in range(3):
      examples = prompts.examples(length, DEPTHS, sample, seed=7)
      hays = []
      for depth, e in zip(DEPTHS, examples):
        assert len(e.tokens) == length and e.tokens[0] == data_lib.BOS
        assert e.needle_at == 1 + round(depth * e.haystack_len)
        needle = text(e.tokens[e.needle_at:e.needle_at + e.needle_len])
        assert re.fullmatch(r"\n(The pass key is|The magic number for \w+ is) "
                            rf"{e.key}\.( Remember it\.)?\n", needle), needle
        assert text(e.answer) == e.key and re.fullmatch(r"\d{5}", e.key)
        assert text(e.prompt).endswith(" is ")
        assert e.key not in text(e.prompt[:e.needle_at])  # the needle is its only holder
        hays.append(np.concatenate([e.tokens[1:e.needle_at],
                                    e.tokens[e.needle_at + e.needle_len:][:e.haystack_len + 1 -
                                                                          e.needle_at]]))
      assert all(np.array_equal(h, hays[0]) for h in hays)  # one haystack for every depth
      assert len({e.key for e in examples}) == 1
  assert prompts.examples(200, DEPTHS, 0, seed=7)[0].key != prompts.examples(
      200, DEPTHS, 1, seed=7)[0].key


def test_a_synthetic_passkey_model_gets_its_task_tokens():
  from moba_jax.config import load_config

  cfg = load_config(None, ["data.task=passkey", "model.vocab_size=64", "data.passkey_len=4"])
  prompts = evals.Prompts("passkey", evals.MarkovHaystack(cfg), 4, synthetic_tokens=True)
  assert prompts.min_length() == 4 + 2 * 4  # BOS NEEDLE d.. QUERY ANS d..
  for depth, e in zip(DEPTHS, prompts.examples(64, DEPTHS, 0, seed=1)):
    t = e.tokens
    assert len(t) == 64 and e.needle_at == 1 + round(depth * e.haystack_len) == 1 + round(
        depth * (64 - 12))
    assert t[e.needle_at] == data_lib.NEEDLE
    np.testing.assert_array_equal(t[e.needle_at + 1:e.needle_at + 5], e.answer)
    np.testing.assert_array_equal(t[-6:-4], [data_lib.QUERY, data_lib.ANS])
    assert ((e.answer >= data_lib.DIGITS) & (e.answer < data_lib.DIGITS + 10)).all()
    hay = np.delete(t[1:-6], np.arange(e.needle_at - 1, e.needle_at + 4))
    assert (hay >= data_lib.CONTENT).all()


# ----------------------------------------------------------------------------- scoring


def retriever(shift: int = 0, digit_offset: int = 0, vocab: int = gen.TEXT_VOCAB):
  """A fake logits function that reads the key from the needle in its input and predicts it after
  the question (position shifted by `shift`, digits by `digit_offset`); PAD everywhere else."""
  def logits_fn(inputs):
    inputs = np.asarray(inputs)
    out = np.zeros((*inputs.shape, vocab), np.float32)
    out[..., data_lib.PAD] = 1.0
    for b, row in enumerate(inputs):
      s = text(row)
      key = re.search(r"pass key is (\d+)\.", s).group(1)
      start = s.rindex("The pass key is ") + len("The pass key is ")  # the question's end
      for j, d in enumerate(key):
        pos = start - 1 + j + shift  # BOS is token 0, so byte i of s is position i + 1
        if 0 <= pos + 1 < inputs.shape[1]:
          out[b, pos + 1] = 0.0
          out[b, pos + 1, ord(str((int(d) + digit_offset) % 10)) + data_lib.BYTE_OFFSET] = 5.0
    return out
  return logits_fn


def test_the_scorer_reads_the_answer_tokens():  # 12 prompts per length: the last batch padded
  prompts = evals.Prompts("passkey", evals.FillerHaystack(), digits=5)
  run = lambda fn: evals.evaluate(prompts, lambda t, a: evals.score_forward(fn, t, a),
                                  [100, 160], DEPTHS, samples=3, seed=0, batch_size=5)
  perfect = run(retriever())
  assert [c["accuracy"] for c in perfect] == [1.0] * 8
  assert all(c["token_accuracy"] == 1.0 and c["n"] == 3 and c["correct"] == 3 for c in perfect)
  nll = -np.log(np.exp(5.0) / (np.exp(5.0) + gen.TEXT_VOCAB - 1))  # one logit 5, the rest 0
  np.testing.assert_allclose([c["answer_nll"] for c in perfect], nll, rtol=1e-6)
  assert all(e["predicted"] == e["key"] for c in perfect for e in c["examples"])
  for fake in (retriever(digit_offset=1), retriever(shift=1), retriever(shift=-1)):
    assert [c["accuracy"] for c in run(fake)] == [0.0] * 8


def test_forward_and_decode_modes_agree_on_a_real_model(model):
  forward, decode = evals.scorer_for(model, "forward"), evals.scorer_for(model, "decode")
  prompts = evals.Prompts("passkey", evals.FillerHaystack(), digits=5)
  examples = [e for i in range(3) for e in prompts.examples(CONTEXT, DEPTHS, i, seed=0)]
  tokens = np.stack([e.tokens for e in examples])
  greedy = decode(tokens, 5)
  tf = forward(tokens, 5)
  np.testing.assert_allclose(greedy.nll, tf.nll, rtol=1e-4)  # the cache's forced rows
  np.testing.assert_array_equal(greedy.correct, tf.correct)
  # Answers that the model does produce: every row gets its greedy text (right in both modes),
  # rows 6-8 with one token changed (wrong in both: the forced prefix is still the greedy one).
  tokens[:, -5:] = greedy.predicted
  changed = [(6, -1), (7, -3), (8, -5)]  # (row, answer token): another byte
  for row, col in changed:
    tokens[row, col] = data_lib.BYTE_OFFSET + (tokens[row, col] - data_lib.BYTE_OFFSET + 1) % 256
  got = {name: score(tokens, 5) for name, score in (("forward", forward), ("decode", decode))}
  expected = ~np.isin(np.arange(len(tokens)), [row for row, _ in changed])
  for s in got.values():
    np.testing.assert_array_equal(s.correct, expected)
  np.testing.assert_array_equal(got["forward"].predicted[expected], greedy.predicted[expected])
  np.testing.assert_array_equal(got["decode"].predicted, greedy.predicted)  # its own tokens
  np.testing.assert_allclose(got["forward"].nll, got["decode"].nll, rtol=1e-4)
  # Cells through evaluate() (other keys; the shapes compiled above): exact matches and NLL the
  # same in both modes. Answer tokens right need not be: after its first wrong token the greedy
  # decode goes on from its own tokens, teacher forcing from the answer's.
  cells = {name: evals.evaluate(prompts, score, [CONTEXT], DEPTHS, 3, seed=1, batch_size=12)
           for name, score in (("forward", forward), ("decode", decode))}
  for a, b in zip(cells["forward"], cells["decode"]):
    assert a["accuracy"] == b["accuracy"]
    np.testing.assert_allclose(a["answer_nll"], b["answer_nll"], rtol=1e-4)


# ----------------------------------------------------------------------------- the command


def md_table(md: str, title: str) -> dict:
  """{(depth, length): value} of one table of retrieval.md."""
  after = md.split(f"\n{title}", 1)[1].split("\n\n")
  block = next(b for b in after if b.startswith("|")).splitlines()
  lengths = [int(x) for x in block[0].strip("|").split("|")[1:]]
  out = {}
  for line in block[2:]:
    cells = [x.strip() for x in line.strip("|").split("|")]
    if cells[0] != "mean":
      out.update({(float(cells[0]), n): float(v) for n, v in zip(lengths, cells[1:])})
  return out


def test_eval_writes_json_md_png_that_agree(run_dir, corpus, tmp_path, capsys):
  out = tmp_path / "out"
  argv = [str(run_dir), "--lengths", "96,128", "--depths", "0,0.5,1", "--samples", "3",
          "--batch-size", "4", "--out", str(out)]
  assert evals.main(argv) == 0
  captured = capsys.readouterr()
  doc = json.loads((out / "retrieval.json").read_text())
  md = (out / "retrieval.md").read_text()
  assert captured.out == md and "length 128: 9 prompts" in captured.err
  assert (out / "retrieval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert doc["step"] == 1 and doc["task"] == "passkey" and doc["mode"] == "forward"
  assert doc["lengths"] == [96, 128] and doc["depths"] == [0.0, 0.5, 1.0] and len(doc["cells"]) == 6
  assert doc["attention"] == "MoBA block 16, top-2; last 1 of 2 layers full"
  assert str(corpus) in doc["haystack"] and doc["config"]["train"]["seq_len"] == CONTEXT
  for title, key in (("Accuracy", "accuracy"), ("Mean answer-token NLL", "answer_nll"),
                     ("Answer tokens right", "token_accuracy")):
    table = md_table(md, title)
    assert table == {(c["depth"], c["length"]): round(c[key], 3) for c in doc["cells"]}
  assert all(c["accuracy"] == c["correct"] / c["n"] for c in doc["cells"])
  assert doc["accuracy"] == sum(c["correct"] for c in doc["cells"]) / 18
  assert not list(out.glob(".tmp-*"))


def test_a_signal_while_the_results_are_written_waits_for_all_three(run_dir, tmp_path,
                                                                    monkeypatch, capsys):
  """SIGTERM after the first of retrieval.{json,md,png} is written: the other two are written
  too (never files of two evaluations side by side), and the signal is named."""
  import os
  import signal

  from moba_jax import rundir
  out = tmp_path / "out"
  argv = [str(run_dir), "--lengths", "96", "--depths", "0.5", "--samples", "1", "--haystack",
          "synthetic", "--out", str(out)]
  real, calls = rundir.atomic_write, []

  def interrupted(path, data):
    calls.append(path)
    if len(calls) == 1:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(path, data)
  monkeypatch.setattr(rundir, "atomic_write", interrupted)
  assert evals.main(argv) == 0
  assert sorted(p.name for p in out.iterdir()) == ["retrieval.json", "retrieval.md",
                                                   "retrieval.png"]
  assert "received SIGTERM while writing the results" in capsys.readouterr().err


def test_full_attention_of_the_same_weights_in_decode_mode_goes_to_the_run_dir(run_dir, capsys):
  """--set moba.hybrid_full_layers=all: the results (in the run dir) say full attention, and
  their numbers are those of the checkpoint's weights with every layer switched to full
  attention (set_attention), not those of the trained hybrid (1 MoBA + 1 full layer)."""
  argv = [str(run_dir), "--task", "needle", "--lengths", "128", "--depths", "0.25", "--samples",
          "2", "--mode", "decode", "--haystack", "synthetic", "--set",
          "moba.hybrid_full_layers=all"]
  assert evals.main(argv) == 0
  doc = json.loads((run_dir / "eval_needle" / "retrieval.json").read_text())
  assert doc["attention"] == "full attention" and doc["mode"] == "decode"
  assert doc["overrides"] == ["moba.hybrid_full_layers=all"] and doc["haystack"].startswith(
      "synthetic")
  assert "layers 0-1: full" in doc["attention_plan"]
  assert capsys.readouterr().out == (run_dir / "eval_needle" / "retrieval.md").read_text()
  # the same prompts scored directly: the hybrid as trained, then its layers all switched to full
  ckpt_dir = run_dir / "checkpoints"
  cfg = gen.checkpoint_config(ckpt_dir, run_dir, None, [])
  model = gen.load_model(ckpt_dir, cfg)[0]
  prompts = evals.Prompts("needle", evals.FillerHaystack(), digits=doc["digits"])
  cells = lambda: evals.evaluate(prompts, evals.scorer_for(model, "decode"), [128], [0.25], 2,
                                 seed=doc["seed"], batch_size=16)
  hybrid = cells()
  set_attention(model, dataclasses.replace(cfg.moba, hybrid_full_layers="all"))
  assert model.layer_kinds == ("full", "full")
  full = cells()
  (got,), (want,), (other,) = doc["cells"], full, hybrid
  np.testing.assert_allclose(got["answer_nll"], want["answer_nll"], rtol=1e-6)
  assert got["examples"] == want["examples"] and got["correct"] == want["correct"]
  # ... which the hybrid's differ from (greedy answers and NLL)
  assert other["examples"] != want["examples"], (got, other)
  assert not np.isclose(got["answer_nll"], other["answer_nll"], rtol=1e-3), (got, other)


@pytest.mark.parametrize("args, message", [
    (["--lengths", "96,4096"], "--lengths: 4096 is longer than the model's context "
                               f"train.seq_len={CONTEXT}"),
    (["--lengths", "50"], "--lengths: 50 is shorter than the 82 tokens"),
    (["--lengths", "64,x"], "--lengths: '64,x' must be comma-separated integers"),
    (["--lengths", "96,96"], "--lengths: 96,96 repeats a length"),
    (["--depths", "0,1.5"], "--depths: 1.5 is not in [0, 1]"),
    (["--depths", "nan"], "--depths: nan is not in [0, 1]"),
    (["--samples", "0"], "--samples: '0' must be an integer >= 1"),
    (["--mode", "beam"], "--mode: invalid choice: 'beam'"),
    (["--haystack", "/nonexistent/corpus"], "/nonexistent/corpus"),
    (["--set", "moba.topk=0"], "moba.topk=0"),
    (["--set", "moba.full_implementation=splash"], "moba.full_implementation='splash' compiles for"),
])
def test_errors_are_one_line_and_exit_2(run_dir, capsys, args, message):
  assert evals.main([str(run_dir), *args]) == 2
  err = capsys.readouterr().err.strip()
  assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("lines, args, message", [
    (['[model]', 'vocab_size = 128', '[data]', 'task = "lm"'], [],
     "model.vocab_size=128 is smaller than the 259 byte-level tokens"),
    (['[model]', 'vocab_size = 128', '[data]', 'task = "passkey"'], ["--task", "needle"],
     "--task needle needs byte-level text"),
])
def test_models_without_byte_level_text(run_dir, tmp_path, capsys, lines, args, message):
  """The config (as --config gives it) is checked before any weights are read. --config must
  be of the checkpoint's model shape: the run's saved config says the same here."""
  run = tmp_path / "run"
  shutil.copytree(run_dir, run)
  config = run / "config.toml"
  config.write_text("\n".join(lines) + "\n")
  assert evals.main([str(run), "--config", str(config), *args]) == 2
  err = capsys.readouterr().err.strip()
  assert message in err and len(err.splitlines()) == 1, err


@pytest.fixture()
def nothing_runs(monkeypatch):
  """Mistakes are reported before any weights are read or any prompt is scored."""
  monkeypatch.setattr(gen, "load_model", lambda *a: pytest.fail("read the weights"))
  monkeypatch.setattr(evals, "evaluate", lambda *a, **k: pytest.fail("evaluated"))


def one_line(capsys) -> str:
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  return err[0]


@pytest.mark.parametrize("out, message", [
    ("afile", "--out 'afile': 'afile' is not a directory"),
    ("afile/sub", "--out 'afile/sub': 'afile' is not a directory"),
    ("afile/sub/deeper", "--out 'afile/sub/deeper': 'afile' is not a directory"),
    # a filesystem that takes no file, though os.access grants root everything
    pytest.param("/proc/moba_eval", "--out '/proc/moba_eval': '/proc' is not writable",
                 marks=pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="no /proc")),
])
def test_a_bad_out_is_named_before_anything_runs(run_dir, tmp_path, capsys, monkeypatch,
                                                 nothing_runs, out, message):
  (tmp_path / "afile").write_text("keep\n")
  monkeypatch.chdir(tmp_path)
  argv = [str(run_dir), "--samples", "1", "--lengths", "128", "--depths", "0.5", "--haystack",
          "synthetic", "--out", out]
  assert evals.main(argv) == 2
  assert one_line(capsys).startswith(f"moba-jax eval: {message}")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
  assert (tmp_path / "afile").read_text() == "keep\n"


def test_a_bad_default_out_is_named(run_dir, tmp_path, capsys, nothing_runs):
  run = tmp_path / "run"
  shutil.copytree(run_dir, run)
  (run / "eval_passkey").write_text("a file\n")
  assert evals.main([str(run), "--haystack", "synthetic"]) == 2
  where = repr(str(run / 'eval_passkey'))
  assert one_line(capsys) == (f"moba-jax eval: the default --out {where}: {where} is not a "
                              "directory (the results are files in it)")


@pytest.mark.parametrize("haystack, why", [
    ("nope", "no such file or directory"),
    ("nope.jsonl", "no such file or directory"),
    ("adir", "not a corpus directory (no manifest.json in it)"),
    ("afile.txt", "a file not ending in .jsonl"),
])
def test_a_bad_haystack_lists_the_accepted_forms(run_dir, tmp_path, capsys, monkeypatch,
                                                 nothing_runs, haystack, why):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "adir").mkdir()
  (tmp_path / "afile.txt").write_text("text\n")
  assert evals.main([str(run_dir), "--haystack", haystack]) == 2
  err = one_line(capsys)
  assert err.startswith(f"moba-jax eval: --haystack {haystack!r}: {why}; it takes "), err
  for form in ("corpus", "synthetic", "a corpus directory", "a .jsonl file"):
    assert form in err


def test_a_corrupt_saved_config_is_named(run_dir, tmp_path, capsys, nothing_runs):
  run = tmp_path / "run"
  shutil.copytree(run_dir, run)
  (run / "config.toml").write_text("model vocab_size = 1\n")
  assert evals.main([str(run), "--haystack", "synthetic"]) == 2
  assert one_line(capsys).startswith(f"moba-jax eval: {run / 'config.toml'}: not valid TOML (")


def test_config_help_says_it_replaces_the_saved_config():
  assert "in place of" in evals.parser().format_help()


def test_missing_checkpoint(tmp_path, capsys):
  assert evals.main([str(tmp_path / "nope")]) == 2
  assert "nope" in capsys.readouterr().err
  (tmp_path / "empty").mkdir()
  assert evals.main([str(tmp_path / "empty")]) == 2
  assert "no complete checkpoint step" in capsys.readouterr().err
