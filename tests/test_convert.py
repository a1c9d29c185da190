"""`moba-jax convert` (moba_jax/convert.py) against transformers (CPU, float32) as the oracle:
converted Llama (GQA, llama3 RoPE, head_dim != d_model / heads) and Qwen2 (q/k/v biases, tied
embeddings, linear RoPE) models give transformers' logits, hf -> orbax -> hf is bit-exact, a native
tied model exports to transformers' logits, the run dir serves generate (with a tokenizer.json) and
train.init_from, and moba.full_from_step equals stopping and continuing with full attention."""

import json
import os

import numpy as np
import pytest

from tests import helpers

torch = pytest.importorskip("torch")
helpers.import_installed("kernels")  # before transformers, which imports Hugging Face's `kernels`
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from moba_jax import checkpoint as ckpt  # noqa: E402
from moba_jax import convert  # noqa: E402
from moba_jax import generate as gen  # noqa: E402
from moba_jax import inspect as insp  # noqa: E402
from tests.helpers import rel_err  # noqa: E402

COMMON = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              max_position_embeddings=128, bos_token_id=0, eos_token_id=1)
LLAMA = dict(COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
             rms_norm_eps=1e-5, tie_word_embeddings=False,
             rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 32})
QWEN2 = dict(COMMON, num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-6,
             tie_word_embeddings=True,
             rope_parameters={"rope_type": "linear", "rope_theta": 1e5, "factor": 2.0})
TEXTS = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(40)]


def hf_model(kind: str, seed: int = 0):
  """A transformers model with random weights of O(1) activations (norm scales and biases too)."""
  cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
         "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
  model = cls[1](cls[0](**(LLAMA if kind == "llama" else QWEN2)))
  gen_ = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen_)
      if name.endswith("norm.weight"):
        p.copy_(1 + 0.2 * noise)
      elif p.ndim == 1:  # q/k/v biases
        p.copy_(0.5 * noise)
      else:
        p.copy_(noise * (1.0 if "embed" in name else p.shape[1] ** -0.5))
  return model.eval()


def write_tokenizer(directory):
  """A byte-level BPE tokenizer.json trained on TEXTS, with <s> / </s> as BOS / EOS (ids 0, 1)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=290, special_tokens=["<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(TEXTS, trainer)
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>",
                                                               "eos_token": "</s>"}))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """{kind: (transformers model, HF dir, converted run dir)}; the Llama dir has a tokenizer."""
  root, out = tmp_path_factory.mktemp("convert"), {}
  for kind in ("llama", "qwen2"):
    model = hf_model(kind)
    model.save_pretrained(root / f"hf_{kind}")
    if kind == "llama":
      write_tokenizer(root / f"hf_{kind}")
    assert convert.main(["hf-to-orbax", str(root / f"hf_{kind}"), str(root / kind)]) == 0
    out[kind] = (model, root / f"hf_{kind}", root / kind)
  return out


def our_model(run_dir, overrides=()):
  ckpt_dir = run_dir / "checkpoints"
  cfg = gen.checkpoint_config(ckpt_dir, run_dir, None, overrides)
  return gen.load_model(ckpt_dir, cfg)[0], cfg


def logits(model, tokens):
  """Our float32 logits at float32 matmul precision, as transformers computes them on the CPU (a
  GPU's default for float32 is TF32: 7e-4 off transformers' compiled on an H100, run 42)."""
  import jax
  from flax import nnx

  with jax.default_matmul_precision("highest"):
    return np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_logits_equal_transformers(converted, kind):
  model, _, run_dir = converted[kind]
  ours, cfg = our_model(run_dir)
  assert cfg.moba.hybrid_full_layers == "all" and cfg.model.qkv_bias == (kind == "qwen2")
  tokens = np.random.default_rng(1).integers(0, 300, (2, 96))
  with torch.no_grad():
    expected = model(torch.tensor(tokens)).logits.numpy()
  assert rel_err(logits(ours, tokens), expected) < 1e-5


def safetensors_dir(path) -> dict:
  from safetensors.numpy import load_file

  return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_round_trip_is_bit_exact_through_shards(tmp_path, capsys):
  model = hf_model("qwen2", seed=3).to(torch.bfloat16)
  model.save_pretrained(tmp_path / "hf", max_shard_size="40KB")  # sharded, with an index
  assert (tmp_path / "hf" / convert.INDEX).is_file()
  assert convert.main(["hf-to-orbax", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
  assert insp.main([str(tmp_path / "run")]) == 0
  assert "params" in capsys.readouterr().out
  assert convert.main(["orbax-to-hf", str(tmp_path / "run"), str(tmp_path / "back"),
                       "--shard-gb", "0.00003"]) == 0
  assert (tmp_path / "back" / convert.INDEX).is_file()
  mask = os.umask(0o022)
  os.umask(mask)
  for f in (tmp_path / "back").iterdir():  # every file readable as the umask allows (not 0600)
    assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f.name
  before, after = safetensors_dir(tmp_path / "hf"), safetensors_dir(tmp_path / "back")
  assert sorted(before) == sorted(after)
  for name, x in before.items():
    assert after[name].dtype == x.dtype and after[name].shape == x.shape, name
    assert after[name].tobytes() == x.tobytes(), name
  config = json.loads((tmp_path / "back" / "config.json").read_text())
  original = json.loads((tmp_path / "hf" / "config.json").read_text())
  legacy = {"rope_theta": original["rope_parameters"]["rope_theta"],
            "rope_scaling": {"rope_type": "linear", "factor": 2.0}}
  assert config == {**original, "head_dim": 16, **legacy}  # our config names head_dim always


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_exported_config_has_the_same_rope_in_the_older_keys(converted, tmp_path, kind):
  """config.json also carries rope_theta and rope_scaling (transformers < 5 and other readers know
  only those): read without rope_parameters it is the same model."""
  _, _, run_dir = converted[kind]
  assert convert.main(["orbax-to-hf", str(run_dir), str(tmp_path / "hf")]) == 0
  config = json.loads((tmp_path / "hf" / "config.json").read_text())
  older = {k: v for k, v in config.items() if k != "rope_parameters"}
  assert convert.model_config(older) == convert.model_config(config)
  assert convert.model_config(config).rope_scaling == {"llama": "llama3", "qwen2": "linear"}[kind]


def test_native_tied_model_exports_to_transformers_logits(converted, tmp_path):
  """A model of ours with our tied head (scaled by d_model ** -0.5) and no HF config to start
  from exports with the scale folded into the final norm: transformers' logits equal ours."""
  import dataclasses

  from flax import nnx

  from moba_jax.config import save_config

  model, cfg = our_model(converted["qwen2"][2], ["model.tied_head_scale=rsqrt_d_model"])
  native = tmp_path / "native"
  ckpt.save_params(str(native), nnx.to_pure_dict(nnx.state(model, nnx.Param)), {"step": 0})
  save_config(dataclasses.replace(cfg, run_dir=str(native)), str(native / "config.toml"))
  assert convert.main(["orbax-to-hf", str(native), str(tmp_path / "hf")]) == 0
  hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
  tokens = np.random.default_rng(2).integers(0, 300, (2, 40))
  with torch.no_grad():
    expected = hf(torch.tensor(tokens)).logits.numpy()
  assert rel_err(logits(model, tokens), expected) < 1e-5
  # our token ids (moba_jax/data.py): transformers' generate stops at our EOS
  assert (hf.config.bos_token_id, hf.config.eos_token_id, hf.config.pad_token_id) == (1, 2, 0)


def test_generate_with_the_tokenizer_matches_transformers_greedy(converted, capsys):
  model, hf_dir, run_dir = converted["llama"]
  tok = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
  prompt = "def f3(x):\n    return"
  ids = [0] + tok.encode(prompt, add_special_tokens=False).ids  # BOS <s>, as tokenizer_config
  with torch.no_grad():
    out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=1,
                         pad_token_id=1)
  new = [t for t in out[0, len(ids):].tolist() if t != 1]
  assert gen.main([str(run_dir), "--prompt", prompt, "--max-new-tokens", "8"]) == 0
  assert capsys.readouterr().out == tok.decode(new, skip_special_tokens=False) + "\n"


def test_generate_stops_at_eos_without_printing_it(converted, monkeypatch):
  """A row that ends on the tokenizer's EOS shows the text before it, never the stop token's own
  text (the HF decoder would spell it '</s>')."""
  import io

  from moba_jax import decode, tokenizer

  _, hf_dir, _ = converted["llama"]
  tok = tokenizer.load(str(hf_dir))
  body = tok.encode(b"def f3(x):").tolist()
  steps = [[t, t] for t in body[:3]] + [[tok.eos, body[3]]] + [[t, t] for t in body[4:]]
  monkeypatch.setattr(decode, "jit_decoding", lambda model, context: None)
  monkeypatch.setattr(decode, "stream", lambda *a, **k: (s for s in np.asarray(steps)))
  out = io.StringIO()
  gen.generate(None, [np.array([1]), np.array([1])], context=64, max_new=len(body),
               temperature=0.0, seed=0, out=out, tok=tok)
  first = tok.tok.decode(body[:3], skip_special_tokens=False)
  assert out.getvalue() == first + "\n" + "def f3(x):\n"
  assert tok.tok.decode([tok.eos], skip_special_tokens=False)  # EOS has text to leak


@pytest.mark.parametrize("edit, message", [
    ({"architectures": ["GPT2LMHeadModel"]}, "architecture 'GPT2LMHeadModel' is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn'"),
    ({"attention_bias": True}, "attention_bias=True is not supported"),
    ({"hidden_size": "64"}, "hidden_size='64' must be an integer"),
])
def test_unsupported_configs_are_one_line_errors(converted, tmp_path, capsys, edit, message):
  hf_dir = tmp_path / "hf"
  hf_dir.mkdir()
  config = json.loads((converted["llama"][1] / "config.json").read_text())
  (hf_dir / "config.json").write_text(json.dumps({**config, **edit}))
  assert convert.main(["hf-to-orbax", str(hf_dir), str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err.strip()
  assert message in err and len(err.splitlines()) == 1, err
  assert not (tmp_path / "out").exists()


def test_an_interrupted_conversion_leaves_no_out_and_a_moved_run_dir_loads(converted, tmp_path,
                                                                          monkeypatch, capsys):
  """Both directions build OUT beside it and rename it at the end: a conversion that stops
  half-way (here: after one of two weight files) leaves no OUT, and the next one, which removes
  what a kill would leave, succeeds. A converted run dir names its tokenizer relative to itself:
  moved, it loads."""
  import shutil
  run_dir = converted["llama"][2]
  real = convert.write_safetensors

  def cut(out, tensors, max_bytes):
    real(out, tensors[:1], max_bytes)
    raise OSError("the disk filled")
  monkeypatch.setattr(convert, "write_safetensors", cut)
  assert convert.main(["orbax-to-hf", str(run_dir), str(tmp_path / "hf")]) == 2
  assert "the disk filled" in capsys.readouterr().err
  assert sorted(p.name for p in tmp_path.iterdir()) == []
  monkeypatch.setattr(convert, "write_safetensors", real)
  (tmp_path / ".hf.partial").mkdir()  # what a kill -9 leaves
  (tmp_path / ".hf.partial" / "model.safetensors").write_text("half")
  assert convert.main(["orbax-to-hf", str(run_dir), str(tmp_path / "hf")]) == 0
  assert "(step 0)" in capsys.readouterr().out
  assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
  assert (tmp_path / "hf" / "tokenizer.json").is_file()
  moved = tmp_path / "moved"
  shutil.copytree(run_dir, moved)
  assert 'tokenizer = "hf/tokenizer.json"' in (moved / "config.toml").read_text()
  cfg = gen.checkpoint_config(moved / "checkpoints", moved, None, [])
  assert cfg.data.tokenizer == str(moved / "hf" / "tokenizer.json")


def test_an_export_past_a_corrupt_newest_step_says_so_once(tmp_path):
  """`moba-jax convert orbax-to-hf` of a run whose newest step fails its checksums: one WARNING
  line naming CKPT and the step (not Python's warning as well, not train.init_from), the older
  step exported and named, and the run's MoBA layers noted."""
  import subprocess
  import sys

  from moba_jax import train
  from moba_jax.config import load_config
  run = tmp_path / "run"
  train.run(load_config(None, [
      f"run_dir={run}", "model.n_layers=2", "model.d_model=32", "model.mlp_dim=64",
      "model.n_heads=2", "model.n_kv_heads=1", "model.head_dim=16", "train.steps=2",
      "train.batch_size=2", "train.seq_len=64", "moba.block_size=16", "checkpoint.every=1",
      "checkpoint.async_save=false", "eval.batches=0", "log.progress=false"]), progress=False)
  from tests.helpers import flip_a_params_byte
  flip_a_params_byte(run / "checkpoints" / "2")
  proc = subprocess.run([sys.executable, "-m", "moba_jax.cli", "convert", "orbax-to-hf",
                         str(run), str(tmp_path / "hf")], capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip().endswith("(step 1)")
  lines = proc.stderr.splitlines()
  assert [ln for ln in lines if "could not be restored" in ln] == [
      next(ln for ln in lines if ln.startswith("WARNING: CKPT: step 2 in "))]
  assert "CheckpointWarning" not in proc.stderr and "init_from" not in proc.stderr
  assert any("exporting step 1: the newest, 2, did not restore" in ln for ln in lines)
  assert any("2 of 2 layers are MoBA" in ln for ln in lines)


@pytest.mark.parametrize("args, message", [
    (["hf-to-orbax", "{tmp}/nope", "{tmp}/out"], "no such directory"),
    (["hf-to-orbax", "{llama}", "{tmp}/out", "model.d_model=32"], "model.d_model: config.json"),
    (["hf-to-orbax", "{llama}", "{qwen2_run}"], "exists and is not an empty directory"),
    (["orbax-to-hf", "{tmp}", "{tmp}/out"], "no complete checkpoint step"),
    (["orbax-to-hf", "{qwen2_run}", "{tmp}/out", "--like", "{tmp}/nope"],
     "--like '{tmp}/nope': no such directory"),
    (["hf-to-orbax", "{bad_index}", "{tmp}/out"], "model.safetensors.index.json: not a "
     "safetensors index"),
    (["hf-to-orbax", "{truncated}", "{tmp}/out"], "model.safetensors: not a readable safetensors"),
    (["sideways", "a", "b"], "invalid choice: 'sideways'"),
    (["orbax-to-hf", "{qwen2_run}", "{tmp}/afile/sub"], "'{tmp}/afile' is not a directory"),
])
def test_command_line_mistakes_are_one_line_errors(converted, tmp_path, capsys, args, message):
  import shutil

  llama = converted["llama"][1]
  names = {"tmp": tmp_path, "llama": llama, "qwen2_run": converted["qwen2"][2],
           "bad_index": tmp_path / "bad_index", "truncated": tmp_path / "truncated"}
  (tmp_path / "afile").write_text("in the way\n")
  for name in ("bad_index", "truncated"):
    names[name].mkdir()
    shutil.copy(llama / "config.json", names[name] / "config.json")
  (names["bad_index"] / convert.INDEX).write_text('{"metadata": {}}')
  weights = (llama / "model.safetensors").read_bytes()
  (names["truncated"] / "model.safetensors").write_bytes(weights[:len(weights) // 2])
  assert convert.main([a.format(**names) for a in args]) == 2
  err = capsys.readouterr().err.strip()
  assert message.format(**names) in err and len(err.splitlines()) == 1, err


def test_training_in_the_converted_dir_is_refused_and_keeps_its_weights(converted, capsys):
  """`moba-jax train OUT/config.toml` would resume OUT's parameters-only step 0, fail to find an
  optimizer state, set the converted weights aside and start from random ones: it is one line
  naming train.init_from instead, with or without --fresh, and OUT is untouched."""
  from moba_jax import rundir, train

  _, _, run_dir = converted["qwen2"]
  files = lambda: sorted(p.relative_to(run_dir) for p in run_dir.rglob("*") if p.name != rundir.LOCK)
  before = files()
  assert ckpt.params_only(str(run_dir)) == [0]
  for extra in ([], ["--fresh"]):
    assert train.main([str(run_dir / "config.toml"), "train.steps=1", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert f"train.init_from={run_dir}" in err and len(err.splitlines()) == 1, err
  assert files() == before


def test_corpus_rows_use_the_tokenizer(converted, tmp_path):
  """data.tokenizer: a JSONL corpus's rows are the tokenizer's ids of each document (BOS, text,
  EOS), and a prompt/response example's loss covers exactly its response's tokens and EOS."""
  from moba_jax import data as data_lib
  from moba_jax.config import load_config

  hf_dir = converted["llama"][1]
  tok = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
  corpus = tmp_path / "sft.jsonl"
  corpus.write_text(json.dumps({"prompt": "def f1(x):", "response": " return x"}) + "\n")
  cfg = load_config(None, [f"run_dir={tmp_path}", "model.vocab_size=300", "data.task=corpus",
                           f"data.path={corpus}", f"data.tokenizer={hf_dir}", "data.pack=false",
                           "train.seq_len=64", "eval.trailing_tokens=8"])
  data_lib.check_config(cfg)
  row = data_lib.RowSource(cfg, "eval")[0]
  enc = lambda s: tok.encode(s, add_special_tokens=False).ids
  expected = [0, *enc("def f1(x):"), *enc(" return x"), 1]
  n = len(expected) - 1
  assert row["inputs"][:n].tolist() == expected[:-1]
  assert row["targets"][:n].tolist() == expected[1:]
  assert row["mask"][:n].tolist() == [0.0] * len(enc("def f1(x):")) + [1.0] * (len(
      enc(" return x")) + 1)
  small = load_config(None, ["model.vocab_size=260", "data.task=corpus",
                             f"data.tokenizer={hf_dir}"])
  with pytest.raises(ValueError, match="model.vocab_size=260 must be >= the 290 ids"):
    data_lib.check_config(small)


def test_full_from_step_switches_every_layer_from_that_step(converted):
  """moba.full_from_step=3: steps 1-2 run the config's attention, steps 3.. every layer full; the
  switch changes the model definition only. (The training loop's use of it: the slow test below.)"""
  from types import SimpleNamespace

  from flax import nnx

  from moba_jax import train
  from moba_jax.model import Decoder

  run_dir = converted["llama"][2]
  cfg = gen.checkpoint_config(run_dir / "checkpoints", run_dir, None,
                              ["moba.hybrid_full_layers=0", "moba.full_from_step=3"])
  assert train.attention_at(cfg, 1) == train.attention_at(cfg, 2) == cfg.moba
  full = train.attention_at(cfg, 3)
  assert full.hybrid_full_layers == "all" and train.attention_at(cfg, 1000) == full
  abstract = nnx.eval_shape(lambda: Decoder(cfg.model, cfg.moba, rngs=nnx.Rngs(0)))
  model_def, params = nnx.split(abstract, nnx.Param)
  state = SimpleNamespace(model_def=model_def, params=params)
  train.set_state_attention(state, full)
  assert nnx.merge(model_def, params).layer_kinds == ("moba", "moba")
  assert nnx.merge(state.model_def, params).layer_kinds == ("full", "full")
  assert state.params is params


@pytest.mark.slow
def test_full_from_step_equals_stopping_and_continuing_with_full_attention(converted, tmp_path):
  """Continued training of the converted Llama with MoBA on the tokenized corpus:
  moba.full_from_step=3 of 4 steps gives the parameters of 2 MoBA steps, then a rerun with every
  layer full (about a minute on 2 CPU cores: four compilations). Bit-equal on a GPU too with
  train.deterministic (XLA's scatter-adds otherwise add in a varying order)."""
  import jax
  from flax import nnx

  from moba_jax import train
  from moba_jax.config import load_config

  _, hf_dir, run_dir = converted["llama"]
  corpus = tmp_path / "docs.jsonl"
  corpus.write_text("".join(json.dumps({"text": "".join(TEXTS[i:i + 6])}) + "\n"
                            for i in range(0, 40, 4)))
  common = [f"train.init_from={run_dir}", "data.task=corpus", f"data.path={corpus}",
            f"data.tokenizer={hf_dir / 'tokenizer.json'}", "data.prefetch=0", "train.steps=4",
            "train.batch_size=2", "train.seq_len=32", "train.warmup_steps=0", "train.lr=1e-3",
            "moba.block_size=4", "moba.topk=2", "moba.hybrid_full_layers=0", "eval.batches=0",
            "eval.trailing_tokens=8", "checkpoint.async_save=false", "log.progress=false",
            "mesh.data=1", "train.deterministic=true"]
  cfg = lambda name, *more: load_config(str(run_dir / "config.toml"),
                                        [f"run_dir={tmp_path / name}", *common, *more])
  # The split run keeps moba.full_from_step=3 so that its steps are the same compiled functions
  # (its model is all full from its start at step 2: the switch finds nothing to change).
  train.run(cfg("hybrid", "moba.full_from_step=3"), progress=False)
  train.run(cfg("split", "moba.full_from_step=3", "train.stop_after=2"), progress=False)
  train.run(cfg("split", "moba.full_from_step=3", "moba.hybrid_full_layers=all"), progress=False)
  params = {}
  for name in ("hybrid", "split"):
    model, _ = our_model(tmp_path / name)
    params[name] = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  jax.tree.map(np.testing.assert_array_equal, params["hybrid"], params["split"])


def test_llama31_8b_config_gives_the_recipes_model():
  """Llama 3.1 8B's config.json (the older format: rope_theta, rope_scaling, torch_dtype) converts
  to the [model] table of experiments/continue_llama.toml (remat aside), whose layers are MoBA
  but the last 3."""
  import dataclasses
  from pathlib import Path

  from moba_jax import train
  from moba_jax.config import layer_kinds, load_config

  hf = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000,
        "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
        "intermediate_size": 14336, "max_position_embeddings": 131072, "mlp_bias": False,
        "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "vocab_size": 128256}
  recipe = train.validate(load_config(str(Path(__file__).parents[1] / "experiments"
                                          / "continue_llama.toml")))
  assert dataclasses.replace(recipe.model, remat=False) == convert.model_config(hf)
  assert layer_kinds(32, recipe.moba.hybrid_full_layers)[-4:] == ("moba",) + ("full",) * 3


SHARDED_LOAD = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
from pathlib import Path
import numpy as np
from moba_jax import convert
hf_dir = Path(sys.argv[1])
cfg = convert.run_config(convert.read_hf_config(hf_dir), hf_dir / "unused", hf_dir,
                         ["mesh.fsdp=2", "mesh.tensor=2"])
tensors = convert.Tensors(hf_dir)
params = convert.load_params(tensors, cfg)
attn = params["layers"][1]["attn"]
print([tuple(s.data.shape) for s in attn["wq"].addressable_shards])
print([tuple(s.data.shape) for s in attn["bk"].addressable_shards])
w = tensors.get("model.layers.1.self_attn.q_proj.weight")
np.testing.assert_array_equal(np.asarray(attn["wq"]), w.T.reshape(attn["wq"].shape))
"""


def test_load_places_each_shard_on_its_device(converted):
  """On 4 (fake CPU) devices, fsdp=2 x tensor=2: wq [E, H, D] is split over embed and heads, the
  single kv head's bias is replicated, and the assembled array is the HF tensor."""
  import subprocess
  import sys
  from pathlib import Path

  out = subprocess.run([sys.executable, "-c", SHARDED_LOAD, str(converted["qwen2"][1])],
                       capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  wq, bk = out.stdout.splitlines()[-2:]
  assert wq == str([(32, 2, 16)] * 4) and bk == str([(1, 16)] * 4)


def test_eval_refuses_a_model_of_a_tokenizer(converted, capsys):
  """`moba-jax eval` builds byte-level prompts: a model that reads a tokenizer's ids (a converted
  Llama) is refused in one line, not scored on the wrong ids."""
  from moba_jax import evals
  assert evals.main([str(converted["llama"][2]), "--lengths", "128", "--samples", "1"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "reads data.tokenizer=" in err and "byte-level" in err


def test_generate_tokenizer_flag_stands_in_for_a_missing_saved_one(converted, tmp_path, capsys):
  """A run whose saved data.tokenizer is gone (a moved file): `generate --tokenizer PATH` takes
  PATH in its place and generates; without the flag, the missing file is named."""
  import shutil
  _, hf_dir, run_dir = converted["llama"]
  run = tmp_path / "run"
  shutil.copytree(run_dir, run)
  text = (run / "config.toml").read_text().replace('tokenizer = "hf/tokenizer.json"',
                                                    'tokenizer = "/gone/tokenizer.json"')
  (run / "config.toml").write_text(text)
  assert gen.main([str(run), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
  assert "/gone/tokenizer.json" in capsys.readouterr().err
  assert gen.main([str(run), "--prompt", "hi", "--max-new-tokens", "2", "--tokenizer",
                   str(hf_dir / "tokenizer.json")]) == 0
