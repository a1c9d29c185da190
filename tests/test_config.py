"""Config system: TOML + dotted overrides, validated once, clear errors."""

import json
import os

import pytest

from moba_jax import config as C
from moba_jax import train


def test_defaults_are_valid_and_round_trip(tmp_path):
  cfg = C.load_config()
  assert cfg == C.Config()
  for name in ("c.toml", "c.json"):
    C.save_config(cfg, str(tmp_path / name))
    assert C.load_config(str(tmp_path / name)) == cfg
  assert C.config_from_dict(C.config_to_dict(cfg)) == cfg


def test_toml_file_and_overrides(tmp_path):
  path = tmp_path / "exp.toml"
  path.write_text('run_dir = "runs/x"\n[train]\nsteps = 50\nlr = 1e-3\n'
                  '[moba]\nhybrid_full_layers = "all"\n[mesh.rules]\nbatch = ["data"]\n')
  cfg = C.load_config(str(path), ["train.steps=7", "model.dtype=bfloat16",
                                  "moba.hybrid_full_layers=2", "data.task=passkey"])
  assert cfg.run_dir == "runs/x" and cfg.train.steps == 7 and cfg.train.lr == 1e-3
  assert cfg.model.dtype == "bfloat16"
  assert cfg.moba.hybrid_full_layers == 2 and cfg.mesh.rules.batch == ("data",)
  assert C.apply_overrides(cfg, ["moba.hybrid_full_layers=all"]).moba.hybrid_full_layers == "all"


def test_experiment_is_a_run_config_plus_a_typed_grid(tmp_path):
  """[grid] with typed stage tables; `moba-jax train` reads the same file as one run."""
  (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
  path = tmp_path / "exp.toml"
  path.write_text('[train]\nsteps = 50\n[grid]\nseeds = [4]\n[grid.pretrain.train]\nsteps = 9\n'
                  '[grid.pretrain.data]\npath = "d.jsonl"\n[grid.sft.train]\nlr = 1e-4\n')
  exp = C.load_experiment_config(str(path), ["grid.variants=[0, 1, \"all\"]",
                                             "grid.sft.data.loss_on=all", "train.seed=3"])
  assert exp.grid.seeds == (4,) and exp.grid.variants == (0, 1, "all")
  pre, sft = exp.stage_config("pretrain"), exp.stage_config("sft")
  assert (pre.train.steps, pre.train.lr, pre.train.seed) == (9, 3e-3, 3)
  assert pre.data.path == str(tmp_path / "d.jsonl")  # relative to the file, in a stage table too
  assert (sft.train.steps, sft.train.lr, sft.data.loss_on) == (50, 1e-4, "all")
  assert exp.run.data.loss_on == "auto"  # the base run is untouched
  back = tmp_path / "back.toml"
  back.write_text(C.to_toml(C.experiment_to_dict(exp)))
  assert C.load_experiment_config(str(back)) == exp
  run = C.load_config(str(path))  # a run: the grid table is left out
  assert run.train.steps == 50 and not hasattr(run, "grid")
  with pytest.raises(ValueError, match="'grid.seeds' configures an experiment grid"):
    C.load_config(str(path), ["grid.seeds=[1]"])


@pytest.mark.parametrize("override, needle", [
    ("grid.pretrain.train.stepz=3", "'grid.pretrain.train.stepz'; did you mean "
     "'grid.pretrain.train.steps'?"),
    ("grid.sft.train.steps=-3", "grid.sft: train.steps=-3 must be an integer >= 1"),
    ("grid.sft.train.lr=abc", "grid.sft.train.lr='abc' must be a number"),
    ("grid.pretrain.train=3", "grid.pretrain.train=3 is a table of config keys"),
    ("grid.pretrain=[\"train.steps=3\"]", "grid.pretrain=['train.steps=3'] is a table"),
    ("grid.seedz=[1]", "'grid.seedz'; did you mean 'grid.seeds'?"),
])
def test_experiment_errors_name_the_key(override, needle):
  with pytest.raises(ValueError) as e:
    C.load_experiment_config(None, [override])
  assert needle in str(e.value)


@pytest.mark.parametrize("override, needle", [
    ("train.stepz=3", "unknown config key 'train.stepz'; did you mean 'train.steps'?"),
    ("modle.d_model=3", "did you mean 'model.d_model'?"),
    ("train.steps=-5", "train.steps=-5 must be an integer >= 1"),
    ("train.lr=abc", "train.lr='abc' must be a number"),
    ("train.min_lr_ratio=2", "train.min_lr_ratio=2"),
    ("moba.hybrid_full_layers=9", "moba.hybrid_full_layers=9 must be in [0, n_layers=4]"),
    ("moba.implementation=cudnn", "moba.implementation='cudnn' must be one of ('auto', "),
    ("data.task=nope", "data.task='nope' must be one of"),
    ("mesh.rules.batch=[\"dat\"]", "mesh.rules.batch='dat' must be one of"),
    ("mesh.rules.embed=fsdp", "mesh.rules.embed='fsdp' must be a list of strings, e.g. "
                              "mesh.rules.embed=[\"fsdp\"]"),
    ("moba.tiles=x", "moba.tiles='x' must be a list of integers"),
    ("moba.hybrid_full_layers=x", "moba.hybrid_full_layers='x' must be an integer or 'all'"),
    ("train.response_tokens=5", "'train.response_tokens'; did you mean 'data.response_tokens'?"),
    ("mesh.rules.foo=[\"data\"]", "unknown config key 'mesh.rules.foo' (mesh.rules has: batch, "
                                 "length, embed, mlp, heads, kv_heads, head_dim, vocab, norm, "
                                 "layers)"),
    ("train=3", "train=3 is a section"),
    ("eval.trailing_tokens=9999", "eval.trailing_tokens=9999 must be <= train.seq_len=256"),
    ("train.batch_size=3", None),  # fine on its own
    ("moba.tiles=[128, 128, 128, 0, 256]", None),  # 0: a field's own value (a TPU window: auto)
    ("moba.tiles=[128, -1]", "moba.tiles[]=-1 must be an integer >= 0"),
    ("model.head_dim=15", "model.head_dim=15 must be even"),
    ("mesh.fsdp=-1", "mesh.data is -1 by default: with mesh.fsdp=-1 set mesh.data=1"),
    ("mesh.rules.batch=[\"data\", \"data\"]", "mesh.rules.batch=['data', 'data'] names a mesh "
                                                "axis twice"),
    ("train.profile_steps=1", None),  # starts at step 3 of 60
    ("train.profile_start=100", None),  # no profile asked for
    (("train.profile_steps=2", "train.profile_start=61"), "train.profile_start=61 must be <= "),
    ("data.path=/x.jsonl", "data.path='/x.jsonl' applies to data.task='corpus', not "
                           "'kv_retrieval'"),
])
def test_errors_name_the_key_and_range(override, needle):
  overrides = [override] if isinstance(override, str) else list(override)
  if needle is None:
    train.validate(C.load_config(None, overrides))
    return
  with pytest.raises(ValueError) as e:
    train.validate(C.load_config(None, overrides))
  assert needle in str(e.value)


@pytest.mark.parametrize("name, text, needle", [
    ("bad.toml", "[train]\nsteps = \n", "bad.toml: not valid TOML ("),
    ("bad.toml", b"[train]\nsteps = '\xff'\n", "bad.toml: not valid TOML ("),
    ("bad.json", "{\"train\": ", "bad.json: not valid JSON ("),
    ("bad.json", "[1]", "bad.json: not a JSON table of config sections"),
    ("sect.toml", "train = [1, 2]\n", "train=[1, 2] is a section"),
])
def test_a_config_file_that_does_not_parse_is_named(tmp_path, name, text, needle):
  path = tmp_path / name
  path.write_bytes(text if isinstance(text, bytes) else text.encode())
  with pytest.raises(ValueError) as e:
    C.load_config(str(path), ["train.batch_size=2"])
  assert needle in str(e.value)


def test_unknown_key_in_file(tmp_path):
  path = tmp_path / "bad.toml"
  path.write_text("[train]\nstepss = 3\n")
  with pytest.raises(ValueError, match="'train.stepss'; did you mean 'train.steps'"):
    C.load_config(str(path))


def test_cross_section_checks():
  check = lambda *overrides: train.validate(C.load_config(None, overrides))
  with pytest.raises(ValueError, match="train.batch_size=6 must be divisible by mesh.data"):
    check("mesh.data=4", "train.batch_size=6")
  with pytest.raises(ValueError, match="train.seq_len=16 must be >= "):
    check("train.seq_len=16", "eval.trailing_tokens=8")
  with pytest.raises(ValueError, match="vocab_size=256 must be >= 259 for data.task='corpus'"):
    check("data.task=corpus", "data.path=x.jsonl")
  assert check("data.task=corpus", "data.path=x.jsonl",  # read when used; the cwd's
               "model.vocab_size=259").data.path == os.path.abspath("x.jsonl")
  with pytest.raises(ValueError, match="data.response_tokens=256 applies to data.task='corpus' "
                     "and must be < train.seq_len=256"):
    check("data.task=corpus", "model.vocab_size=259", "data.response_tokens=256")
  with pytest.raises(ValueError, match="data.response_tokens=8 applies to data.task='corpus'"):
    check("data.task=passkey", "data.response_tokens=8")


def test_config_imports_no_layer_above_it():
  """config.py and config_io.py validate without importing attention, data or the model (the
  layers they configure); those checks are train.validate, run by every entry point."""
  import ast
  import pathlib
  for name in ("config.py", "config_io.py"):
    source = (pathlib.Path(C.__file__).parent / name).read_text()
    assert "import_module" not in source
    imported = set()
    for node in ast.walk(ast.parse(source)):
      if isinstance(node, ast.ImportFrom) and node.module.startswith("moba_jax"):
        imported |= {node.module} if node.module != "moba_jax" else {a.name for a in node.names}
      elif isinstance(node, ast.Import):
        imported |= {a.name for a in node.names if a.name.startswith("moba_jax")}
    assert imported <= {"config_io", "moba_jax.config_io", "moba_jax.rundir"}, (name, imported)


def test_cli_errors_before_compiling(capsys):
  assert train.main(["train.stepz=3"]) == 2
  assert "unknown config key 'train.stepz'; did you mean 'train.steps'?" in capsys.readouterr().err
  assert train.main(["train.steps=-5"]) == 2
  assert "train.steps=-5 must be an integer >= 1" in capsys.readouterr().err


def test_override_values_parse_as_toml():
  assert C.parse_override("a.b=1e-3") == ("a.b", 1e-3)
  assert C.parse_override("a.b=true") == ("a.b", True)
  assert C.parse_override("a.b=all") == ("a.b", "all")
  assert C.parse_override("a.b=runs/x y") == ("a.b", "runs/x y")
  assert C.parse_override('a.b=[1, "all"]') == ("a.b", [1, "all"])
  with pytest.raises(ValueError, match="section.key=value"):
    C.parse_override("novalue")


def test_saved_toml_is_readable(tmp_path):
  cfg = C.load_config(None, ["run_dir=a \"quoted\" dir", "train.lr=0.5"])
  C.save_config(cfg, str(tmp_path / "c.toml"))
  assert C.load_config(str(tmp_path / "c.toml")) == cfg
  C.save_config(cfg, str(tmp_path / "c.json"))
  assert json.loads((tmp_path / "c.json").read_text())["train"]["lr"] == 0.5


def test_every_config_key_is_in_the_training_docs_table():
  """docs/training.md's table of config sections names every field of every section (the
  dataclasses are the oracle): a key added to config.py without its line there fails."""
  import dataclasses
  import pathlib
  import re
  text = (pathlib.Path(__file__).parents[1] / "docs" / "training.md").read_text()
  rows = dict(re.findall(r"^\| `?(\w+|\(top\))`? \| (.*) \|$", text, re.M))
  cfg = C.load_config(None, [])
  sections = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
  sections["grid"] = C.GridConfig
  missing = []
  for name, value in sections.items():
    row, fields = name, [name]
    if dataclasses.is_dataclass(value):
      fields = [f.name for f in dataclasses.fields(value)]
    else:
      row = "(top)"
    words = set(re.findall(r"\w+", rows.get(row, "")))
    missing += [f"{name}.{f}" for f in fields if f not in words]
  assert not missing, f"not in docs/training.md's config table: {missing}"


def test_relative_input_paths_on_the_command_line_are_the_cwds(tmp_path, monkeypatch):
  """data.path, data.tokenizer and train.init_from typed relative are the cwd's, made absolute
  (a run's saved config.toml reads relative paths against its own directory, where a relative
  override would point elsewhere); a URL stays; grid stage tables and grid.init_from too."""
  monkeypatch.chdir(tmp_path)
  cfg = C.load_config(None, ["data.task=corpus", "data.path=corpora/long",
                             "train.init_from=gs://bucket/llama", "run_dir=runs/a"])
  assert cfg.data.path == str(tmp_path / "corpora" / "long")
  assert cfg.train.init_from == "gs://bucket/llama"
  saved = tmp_path / "runs" / "a" / "config.toml"
  saved.parent.mkdir(parents=True)
  C.save_config(cfg, str(saved))
  assert C.load_config(str(saved)).data.path == cfg.data.path  # the same directory, read back
  assert C.apply_overrides(cfg, ["data.path=other"]).data.path == str(tmp_path / "other")
  exp = C.load_experiment_config(None, ["grid.sft.data.path=rel", "grid.init_from=runs/p"])
  assert exp.grid.sft["data"]["path"] == str(tmp_path / "rel")
  assert exp.grid.init_from == str(tmp_path / "runs" / "p")
