"""`moba-jax generate` (moba_jax/generate.py) on a real one-step training run: greedy text equals
the full forward pass's argmax continuation, prompts batch and stream in order, errors are one line
with exit 2."""

import io
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moba_jax import data as data_lib
from moba_jax import decode
from moba_jax import generate as gen
from tests.helpers import train_tiny_text_model

CONTEXT = 32


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A tiny byte-level model (1 MoBA + 1 full layer) trained one step on a JSONL corpus."""
  root = tmp_path_factory.mktemp("generate")
  corpus = root / "corpus.jsonl"
  corpus.write_text("".join(json.dumps({"text": f"def f{i}(x):\n    return x + {i}\n"}) + "\n"
                            for i in range(40)))
  return train_tiny_text_model(root, corpus, context=CONTEXT, block_size=4)


def greedy_reference(run_dir, prompt: str, max_new: int, overrides=()) -> str:
  """The greedy continuation by full forward passes (no cache) over [1, CONTEXT] padded rows."""
  ckpt_dir = run_dir / "checkpoints"
  model, _ = gen.load_model(ckpt_dir, gen.checkpoint_config(ckpt_dir, run_dir, None, overrides))
  forward = nnx.jit(lambda m, t: m(t))
  tokens = list(gen.encode(prompt))
  out = []
  for _ in range(min(max_new, CONTEXT - len(tokens) + 1)):
    row = np.zeros((1, CONTEXT), np.int32)
    row[0, :len(tokens)] = tokens
    out.append(int(jnp.argmax(forward(model, jnp.asarray(row))[0, len(tokens) - 1])))
    if out[-1] == data_lib.EOS:
      break
    tokens.append(out[-1])
  return b"".join(gen.token_bytes(t) for t in out).decode("utf-8", "replace")


def test_greedy_streams_the_argmax_continuation_with_the_config_in_the_metadata(
    run_dir, tmp_path, capsys):
  bare = tmp_path / "bare"
  shutil.copytree(run_dir, bare)
  (bare / "config.toml").unlink()  # the step's metadata has the config too
  assert gen.main([str(bare), "--prompt", "def f1", "--max-new-tokens", "12"]) == 0
  out = capsys.readouterr().out
  assert out == greedy_reference(run_dir, "def f1", 12) + "\n"


def test_a_context_past_the_trained_one_is_noted(run_dir, capsys):
  """--set train.seq_len past the positions the model trained on runs, with a note (the model's
  RoPE positions beyond them are unseen); at or below them, no note."""
  for seq, noted in ((64, True), (32, False), (16, False)):
    gen.checkpoint_config(run_dir / "checkpoints", run_dir, None, [f"train.seq_len={seq}"])
    err = capsys.readouterr().err
    assert ("note: train.seq_len=64 is past the 32 positions" in err) == noted, (seq, err)


def test_a_batch_of_prompts_prints_in_order_and_stops_at_the_context(run_dir, tmp_path, capsys):
  prompts = ["x", "def f2(x):"]
  (tmp_path / "prompts.txt").write_text(prompts[1] + "\n")  # one prompt per line
  argv = [str(run_dir), "--prompt", prompts[0], "--prompt-file", str(tmp_path / "prompts.txt"),
          "--max-new-tokens", "40", "--set", "moba.topk=1"]
  assert gen.main(argv) == 0
  captured = capsys.readouterr()
  assert "prompt 2 stopped at the model's context (train.seq_len=32)" in captured.err
  assert "prompt 1 stopped" in captured.err
  texts = [greedy_reference(run_dir, p, 40, ["moba.topk=1"]) for p in prompts]
  assert captured.out == "".join(t + "\n" for t in texts)


@pytest.mark.parametrize("args, message", [
    (["--prompt", "a", "--temperature", "-1"], "--temperature: '-1' must be a finite number"),
    (["--prompt", "a", "--max-new-tokens", "x"], "--max-new-tokens: 'x' must be an integer"),
    (["--prompt", "a" * CONTEXT], f"has {CONTEXT + 1} tokens"),
    (["--prompt", "a", "--set", "model.d_model=8"], "model.d_model=8: that key fixes the shapes"),
    (["--prompt", "a", "--set", "moba.topk=0"], "moba.topk=0"),
    (["--prompt", "a", "--set", "moba.full_implementation=splash"],
     "moba.full_implementation='splash' compiles for tpu"),
    ([], "give a prompt"),
])
def test_errors_are_one_line_and_exit_2(run_dir, capsys, args, message):
  assert gen.main([str(run_dir), *args]) == 2
  err = capsys.readouterr().err.strip()
  assert message in err and len(err.splitlines()) == 1, err


def test_missing_checkpoint(tmp_path, capsys):
  assert gen.main([str(tmp_path / "nope"), "--prompt", "a"]) == 2
  assert "nope" in capsys.readouterr().err
  (tmp_path / "empty").mkdir()
  assert gen.main([str(tmp_path / "empty"), "--prompt", "a"]) == 2
  assert "no complete checkpoint step" in capsys.readouterr().err


@pytest.fixture()
def no_weights(monkeypatch):
  """Mistakes are reported before any weights are read."""
  monkeypatch.setattr(gen, "load_model", lambda *a: pytest.fail("read the weights"))


def one_line(capsys) -> str:
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  return err[0]


def test_a_bad_tokenizer_names_the_flag(run_dir, capsys, no_weights):
  assert gen.main([str(run_dir), "--prompt", "hi", "--tokenizer", "/nonexistent"]) == 2
  err = one_line(capsys)
  assert err.startswith("moba-jax generate: --tokenizer '/nonexistent': no such file"), err
  assert "data.tokenizer" not in err


@pytest.mark.parametrize("name, data", [
    ("config.toml", b"[model\nvocab = 1\n"),
    ("config.toml", b"model vocab_size = 1\n"),
    ("config.toml", b"\xff\xfe = 1\n"),
])
def test_a_corrupt_saved_config_is_named(run_dir, tmp_path, capsys, no_weights, name, data):
  run = tmp_path / "run"
  shutil.copytree(run_dir, run)
  (run / name).write_bytes(data)
  assert gen.main([str(run), "--prompt", "hi"]) == 2
  err = one_line(capsys)
  assert err.startswith(f"moba-jax generate: {run / name}: not valid TOML ("), err


def test_config_is_used_in_place_of_the_saved_one(run_dir, tmp_path, capsys, no_weights):
  """--config replaces the run's config.toml (the help says so); its mistakes name the flag."""
  assert "in place of" in gen.parser().format_help()
  config = tmp_path / "exp.toml"
  config.write_text((run_dir / "config.toml").read_text() + "\n")
  config.write_text(config.read_text().replace("topk = 2", "topk = 0"))
  assert "topk = 0" in config.read_text()
  assert gen.main([str(run_dir), "--prompt", "hi", "--config", str(config)]) == 2
  assert "moba.topk=0" in one_line(capsys)
  config.write_text("[model\n")
  assert gen.main([str(run_dir), "--prompt", "hi", "--config", str(config)]) == 2
  assert one_line(capsys).startswith(f"moba-jax generate: --config {str(config)!r}: not valid "
                                     "TOML (")
  assert gen.main([str(run_dir), "--prompt", "hi", "--config", str(tmp_path / "none.toml")]) == 2
  assert one_line(capsys) == (f"moba-jax generate: --config {str(tmp_path / 'none.toml')!r}: "
                              "No such file or directory")
  # another model shape: named against the run's own config (no step would restore it)
  import re
  saved = (run_dir / "config.toml").read_text()
  d_model = int(re.search(r"^d_model = (\d+)$", saved, re.M).group(1))
  config.write_text(saved.replace(f"d_model = {d_model}", f"d_model = {2 * d_model}"))
  assert gen.main([str(run_dir), "--prompt", "hi", "--config", str(config)]) == 2
  assert one_line(capsys) == (f"moba-jax generate: --config {str(config)!r} is another model "
                              f"shape than the checkpoint's (model.d_model: {d_model} there, "
                              f"{2 * d_model} now): give the config it was trained with")


def test_a_file_as_checkpoint_is_not_a_directory(tmp_path, capsys):
  (tmp_path / "afile").write_text("x\n")
  assert gen.main([str(tmp_path / "afile"), "--prompt", "a"]) == 2
  assert "is not a directory" in one_line(capsys)


def test_printer_keeps_prompt_order():
  out = io.StringIO()
  printer = gen.Printer(2, out)
  byte = lambda c: ord(c) + data_lib.BYTE_OFFSET
  printer.add(1, byte("b"), last=True)  # row 1 finishes first: held back
  assert out.getvalue() == ""
  printer.add(0, byte("a"), last=False)
  assert out.getvalue() == "a"  # row 0 streams live
  printer.add(0, data_lib.EOS, last=True)
  assert out.getvalue() == "a\nb\n"


def test_sample_is_argmax_at_temperature_0_and_seeded_otherwise():
  logits = jax.random.normal(jax.random.key(0), (64, 10))
  key = jax.random.key(1)
  np.testing.assert_array_equal(decode.sample(logits, key, 0.0), jnp.argmax(logits, -1))
  a, b = decode.sample(logits, key, 1.0), decode.sample(logits, key, 1.0)
  np.testing.assert_array_equal(a, b)
  assert (a != jnp.argmax(logits, -1)).any()


def _tokenizer_json(tmp_path, kind):
  """A small trained tokenizer.json: byte-level BPE (GPT-2 style) or Metaspace (SentencePiece
  style: a space marker that the decoder strips at the start of the text)."""
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import decoders, models, pre_tokenizers, trainers
  texts = ["naïve café: größer, 日本語の文章 ✓ déjà vu", "def f(x):\n    return x * 2 + 1\n",
           "the quick brown fox jumps over the lazy dog"] * 20
  tok = tokenizers.Tokenizer(models.BPE())
  if kind == "byte_level":
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
  else:
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    alphabet = []
  tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, initial_alphabet=alphabet,
                                                     special_tokens=["<s>", "</s>"]))
  tok.save(str(tmp_path / "tokenizer.json"))
  return tmp_path / "tokenizer.json"


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
def test_hf_stream_equals_the_full_decode_in_linear_work(tmp_path, kind):
  """Token by token, the streamed pieces join to the row's full decode (multi-byte characters
  split across tokens, random ids with broken UTF-8, a space marker at the start), and each call
  decodes a bounded window: the ids decoded in all are a small multiple of the row's length
  (decoding the whole row at each token would be quadratic)."""
  from moba_jax.tokenizer import HFTokenizer
  tok = HFTokenizer(_tokenizer_json(tmp_path, kind))
  full = lambda ids: tok.tok.decode(list(ids), skip_special_tokens=False)
  rng = np.random.default_rng(0)
  text = "naïve café ✓ 日本語の文章: größer déjà vu, the lazy dog " * 8
  rows = [tok.encode(text.encode()).tolist(),
          *(rng.integers(2, tok.vocab_size, 300).tolist() for _ in range(3))]
  real_decode, decoded = tok.tok.decode, []
  counting = lambda ids, **kw: (decoded.append(len(ids)), real_decode(ids, **kw))[1]
  for ids in rows:
    decoded.clear()
    tok.tok.decode = counting
    add = tok.stream()
    pieces = [add(t, i == len(ids) - 1) for i, t in enumerate(ids)]
    tok.tok.decode = real_decode
    assert "".join(pieces) == full(ids)
    assert sum(decoded) <= 8 * len(ids), (sum(decoded), len(ids))
  assert full(rows[0]) == text  # the first row's streamed pieces join to the text itself
