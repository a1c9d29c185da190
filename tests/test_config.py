"""Config system: TOML + dotted overrides, validated once, clear errors."""

import json

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
  cfg = C.load_config(str(path), ["train.steps=7", "model.dtype=bfloat16", "grid.seeds=[4, 5]",
                                  "moba.hybrid_full_layers=2", "data.task=passkey"])
  assert cfg.run_dir == "runs/x" and cfg.train.steps == 7 and cfg.train.lr == 1e-3
  assert cfg.model.dtype == "bfloat16" and cfg.grid.seeds == (4, 5)
  assert cfg.moba.hybrid_full_layers == 2 and cfg.mesh.rules.batch == ("data",)
  assert C.apply_overrides(cfg, ["moba.hybrid_full_layers=all"]).moba.hybrid_full_layers == "all"
  assert C.apply_overrides(cfg, ["grid.variants=[0, 1, \"all\"]"]).grid.variants == (0, 1, "all")


@pytest.mark.parametrize("override, needle", [
    ("train.stepz=3", "unknown config key 'train.stepz'; did you mean 'train.steps'?"),
    ("modle.d_model=3", "did you mean 'model.d_model'?"),
    ("train.steps=-5", "train.steps=-5 must be an integer >= 1"),
    ("train.lr=abc", "train.lr='abc' must be a number"),
    ("train.min_lr_ratio=2", "train.min_lr_ratio=2"),
    ("moba.hybrid_full_layers=9", "moba.hybrid_full_layers=9 must be in [0, n_layers=4]"),
    ("data.task=nope", "data.task='nope' must be one of"),
    ("mesh.rules.batch=[\"dat\"]", "mesh.rules.batch='dat' must be one of"),
    ("train=3", "train=3 is a section"),
    ("eval.trailing_tokens=9999", "eval.trailing_tokens=9999 must be <= train.seq_len=256"),
    ("train.batch_size=3", None),  # fine on its own
])
def test_errors_name_the_key_and_range(override, needle):
  if needle is None:
    C.load_config(None, [override])
    return
  with pytest.raises(ValueError) as e:
    C.load_config(None, [override])
  assert needle in str(e.value)


def test_unknown_key_in_file(tmp_path):
  path = tmp_path / "bad.toml"
  path.write_text("[train]\nstepss = 3\n")
  with pytest.raises(ValueError, match="'train.stepss'; did you mean 'train.steps'"):
    C.load_config(str(path))


def test_cross_section_checks():
  with pytest.raises(ValueError, match="train.batch_size=6 must be divisible by mesh.data"):
    C.load_config(None, ["mesh.data=4", "train.batch_size=6"])
  with pytest.raises(ValueError, match="train.seq_len=16 must be >= "):
    C.load_config(None, ["train.seq_len=16", "eval.trailing_tokens=8"])
  with pytest.raises(ValueError, match="vocab_size=256 must be >= 259 for data.task='corpus'"):
    C.load_config(None, ["data.task=corpus", "data.path=x.jsonl"])
  assert C.load_config(None, ["data.task=corpus", "data.path=x.jsonl",
                              "model.vocab_size=259"]).data.path == "x.jsonl"  # read when used
  with pytest.raises(ValueError, match="data.response_tokens=256 applies to data.task='corpus' "
                     "and must be < train.seq_len=256"):
    C.load_config(None, ["data.task=corpus", "model.vocab_size=259", "data.response_tokens=256"])
  with pytest.raises(ValueError, match="data.response_tokens=8 applies to data.task='corpus'"):
    C.load_config(None, ["data.task=passkey", "data.response_tokens=8"])


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
