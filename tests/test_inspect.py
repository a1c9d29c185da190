"""`moba-jax inspect`: steps, arrays and totals from Orbax metadata, text and --json agree."""

import json

import ml_dtypes
import numpy as np
import pytest

from moba_jax import inspect as insp

SHAPES = {"params.embed": ((16, 8), np.float32), "params.layers.0.wq": ((8, 2, 4), np.float32),
          "params.norm": ((8,), ml_dtypes.bfloat16), "opt_state.mu": ((16, 8), np.float32)}


@pytest.fixture(scope="module")
def orbax_dir(tmp_path_factory):
  """A checkpoint dir saved by an Orbax CheckpointManager (Composite: a pytree and a JSON item)."""
  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  root = tmp_path_factory.mktemp("orbax")
  state = {"params": {"embed": jnp.ones((16, 8)), "layers": [{"wq": jnp.ones((8, 2, 4))}],
                      "norm": jnp.ones((8,), jnp.bfloat16)},
           "opt_state": {"mu": jnp.zeros((16, 8))}}
  with ocp.CheckpointManager(root / "checkpoints") as mgr:
    for step in (2, 4):
      mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             meta=ocp.args.JsonSave({"step": step})))
    mgr.wait_until_finished()
  (root / "checkpoints" / "6.orbax-checkpoint-tmp-1234").mkdir()  # an interrupted save
  (root / "checkpoints" / "5").mkdir()  # a step dir without metadata
  (root / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 4, "loss": 2.0}\n')
  (root / "config.json").write_text(json.dumps({"model": {"n_layers": 1}}))
  return root


def test_steps_flag_incomplete(orbax_dir):
  info = insp.inspect_checkpoints(orbax_dir)
  by_step = {s["step"]: s for s in info["steps"]}
  assert [s["step"] for s in info["steps"]] == [2, 4, 5, 6]
  assert by_step[2]["complete"] and by_step[4]["complete"]
  assert not by_step[5]["complete"] and not by_step[6]["complete"]
  assert info["step"] == 4  # latest complete


def test_arrays_and_totals(orbax_dir):
  info = insp.inspect_checkpoints(orbax_dir / "checkpoints", step=2)
  arrays = {a["path"]: a for a in info["arrays"]}
  assert set(arrays) == {f"state.{p}" for p in SHAPES}
  for path, (shape, dtype) in SHAPES.items():
    assert tuple(arrays[f"state.{path}"]["shape"]) == shape
    assert arrays[f"state.{path}"]["dtype"] == np.dtype(dtype).name
  n_params = 16 * 8 + 8 * 2 * 4 + 8
  assert info["param_count"] == n_params
  assert info["param_bytes"] == 4 * (16 * 8 + 8 * 2 * 4) + 2 * 8
  assert info["total_size"] == n_params + 16 * 8
  assert info["json_items"]["meta"] == {"step": 2}
  assert info["run"]["metrics"]["records"] == 2 and info["run"]["config"]["model"]


def test_json_matches_text(orbax_dir, capsys):
  assert insp.main([str(orbax_dir), "--json"]) == 0
  info = json.loads(capsys.readouterr().out)
  assert insp.main([str(orbax_dir)]) == 0
  text = capsys.readouterr().out
  assert f"step {info['step']}:" in text
  for a in info["arrays"]:
    line = next(l for l in text.splitlines() if l.strip().startswith(a["path"] + " "))
    assert str(tuple(a["shape"])) in line and a["dtype"] in line and line.endswith(str(a["size"]))
  assert f"parameters: {info['param_count']}, bytes: {info['param_bytes']}" in text
  assert "INCOMPLETE" in text


def test_bad_step_and_dir(orbax_dir, capsys):
  assert insp.main([str(orbax_dir), "--step", "5"]) == 2
  assert "available: [2, 4]" in capsys.readouterr().err
  assert insp.main([str(orbax_dir / "nope")]) == 2


def test_a_file_or_missing_path_is_named_in_one_line(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "afile").write_text("not a checkpoint\n")
  for given, why in (("afile", "is not a directory"), ("nope", "does not exist")):
    assert insp.main([given]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"moba-jax inspect: checkpoint dir {given!r} {why}")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A real (tiny) training run: checkpoints at steps 1 and 2 saved by moba_jax.train."""
  from moba_jax import train
  from moba_jax.config import load_config

  run_dir = tmp_path_factory.mktemp("run")
  cfg = load_config(None, [
      f"run_dir={run_dir}", "model.vocab_size=32", "model.d_model=16", "model.n_layers=2",
      "model.n_heads=2", "model.n_kv_heads=1", "model.head_dim=8", "model.mlp_dim=32",
      "moba.block_size=16", "train.steps=2", "train.batch_size=2", "train.seq_len=64",
      "train.warmup_steps=1", "data.key_len=1", "data.value_len=1", "data.num_queries=1",
      "data.prefetch=0", "eval.batches=1", "eval.trailing_tokens=16", "checkpoint.every=1",
      "checkpoint.async_save=false", "log.every=1", "mesh.data=1"])
  summary = train.run(cfg, progress=False)
  return run_dir, summary


def test_real_checkpoint(trained_run, capsys):
  run_dir, summary = trained_run
  info = insp.inspect_checkpoints(run_dir / "checkpoints")
  assert [s["step"] for s in info["steps"] if s["complete"]] == [1, 2] and info["step"] == 2
  arrays = {a["path"]: a for a in info["arrays"]}
  assert arrays["params.embed"]["shape"] == [32, 16]
  assert arrays["params.layers.1.attn.wq"]["shape"] == [16, 2, 8]
  assert info["param_count"] == summary["params"]
  assert info["run"]["summary"]["step"] == 2 and "config_toml" in info["run"]
  assert insp.main([str(run_dir), "--step", "1", "--json"]) == 0
  as_json = json.loads(capsys.readouterr().out)
  assert insp.main([str(run_dir), "--step", "1"]) == 0
  text = capsys.readouterr().out
  assert as_json["step"] == 1 and "step 1:" in text
  for a in as_json["arrays"]:
    assert any(l.split()[:1] == [a["path"]] and l.endswith(str(a["size"]))
               for l in text.splitlines())


def test_a_read_only_open_logs_nothing_to_the_user(trained_run):
  """`moba-jax inspect --verify` of a good run: the verdict on stdout, nothing on stderr (Orbax's
  warnings about the read-only settings asked for are not news)."""
  import subprocess
  import sys
  run_dir, _ = trained_run
  proc = subprocess.run([sys.executable, "-m", "moba_jax.cli", "inspect", str(run_dir),
                         "--verify"], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "verify: ok" in proc.stdout.lower(), proc.stdout[-2000:]
  assert proc.stderr == "", proc.stderr


def test_verify_names_the_arrays_that_do_not_read(trained_run, tmp_path):
  """A step whose largest data file lost its second half: `moba-jax inspect --verify` exits 1
  and names the arrays that do not read (`checkpoint.unreadable_arrays`), not only the whole
  restore's index range, with nothing on stderr (Orbax's read coroutines and asyncio's
  unretrieved tasks echo each failure late; run three times, the echoes came in some runs
  only). Oracle: every
  array it names fails to read alone, every other one reads alone and equals the intact
  checkpoint's; on the intact copy no array is named."""
  import shutil
  import subprocess
  import sys

  import jax
  import orbax.checkpoint as ocp

  from moba_jax import checkpoint as ckpt
  run_dir = tmp_path / "run"
  shutil.copytree(trained_run[0], run_dir)
  mngr = lambda: ckpt.manager(str(run_dir / "checkpoints"), with_data=False, read_only=True,
                              async_save=False)
  m = mngr()
  assert ckpt.unreadable_arrays(m, 2) == []  # params and opt_state read
  reader = ocp.PyTreeCheckpointer()

  def alone(name):  # "item/a/b": that array restored by itself, numpy
    item, *keys = name.split("/")
    leaf = m.item_metadata(2)[item]
    for key in keys:
      leaf = leaf[key]
    tree = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
    for key in reversed(keys):
      tree = {key: tree}
    restore = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    out = reader.restore(str(run_dir / "checkpoints" / "2" / item), args=ocp.args.PyTreeRestore(
        item=tree, restore_args=restore, partial_restore=True))
    for key in keys:
      out = out[key]
    return out
  meta = m.item_metadata(2)
  names = [f"{i}/" + "/".join(str(getattr(k, "key", k)) for k in path)
           for i in ("params", "opt_state")
           for path, _ in jax.tree_util.tree_flatten_with_path(meta[i])[0]]
  intact = {n: alone(n) for n in names}
  data = max((p for p in (run_dir / "checkpoints" / "2").rglob("*") if p.is_file()
              and "ocdbt.process_0" in p.parts and p.parent.name == "d"),
             key=lambda p: p.stat().st_size)
  data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
  for _ in range(3):
    proc = subprocess.run([sys.executable, "-m", "moba_jax.cli", "inspect", str(run_dir),
                           "--step", "2", "--verify"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1 and proc.stderr == "", proc.stderr[-2000:]
  verdict = proc.stdout.splitlines()[-1]
  assert verdict.startswith("verify: FAILED (") and " arrays do not read: " in verdict, verdict
  bad = ckpt.unreadable_arrays(m, 2)
  assert bad and set(bad) < set(names) and verdict.startswith(
      f"verify: FAILED ({len(bad)} arrays do not read: {', '.join(bad[:5])}")
  for name in names:
    if name in bad:
      with pytest.raises(Exception):
        alone(name)
    else:
      np.testing.assert_array_equal(alone(name), intact[name], err_msg=name)
  m.close()


def test_unreadable_arrays_of_lists_and_tuples_alone_or_in_halves(tmp_path, monkeypatch):
  """`checkpoint.unreadable_arrays` on trees with list and tuple nodes (saved by the run's own
  manager): none named while intact; with a data file cut short, the same arrays named whether
  each array is read alone (`SCAN_BYTES` 1, one restore an array) or each item in one group
  split in halves."""
  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  from moba_jax import checkpoint as ckpt
  rng = np.random.default_rng(0)  # incompressible values: the data files are the arrays' bytes
  x = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
  params = {"layers": [{"w": x(64, 64)} for _ in range(4)], "t": (x(300), x(7))}
  opt_state = {"mu": [x(128), x(32, 32)]}
  m = ckpt.manager(str(tmp_path / "checkpoints"), async_save=False, with_data=False)
  m.save(1, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                    opt_state=ocp.args.StandardSave(opt_state),
                                    meta=ocp.args.JsonSave({})))
  m.wait_until_finished()
  assert ckpt.unreadable_arrays(m, 1) == []
  data = max((p for p in (tmp_path / "checkpoints" / "1" / "params").rglob("*") if p.is_file()
              and "ocdbt.process_0" in p.parts and p.parent.name == "d"),
             key=lambda p: p.stat().st_size)
  data.write_bytes(data.read_bytes()[:data.stat().st_size // 2])
  restores = []
  real = ocp.Checkpointer.restore
  monkeypatch.setattr(ocp.Checkpointer, "restore",
                      lambda self, *a, **k: restores.append(1) or real(self, *a, **k))
  names = {}
  for scan in (1, 1 << 40):
    monkeypatch.setattr(ckpt, "SCAN_BYTES", scan)
    restores.clear()
    names[scan] = ckpt.unreadable_arrays(m, 1), len(restores)
  (alone, n_alone), (halves, _) = names[1], names[1 << 40]
  every = ["params/layers/0/w", "params/layers/1/w", "params/layers/2/w", "params/layers/3/w",
           "params/t/0", "params/t/1", "opt_state/mu/0", "opt_state/mu/1"]
  assert n_alone == len(every) and alone == halves and alone, (alone, halves)
  assert all(a.startswith("params/") for a in alone) and set(alone) < set(every)
  m.close()


def test_the_unreadable_scan_finds_every_bad_array_in_few_restores():
  """`checkpoint._failing` against a stand-in restore (a subset reads iff it holds no bad index):
  exactly the bad indices for every bad set of 1-3 among 12 and random ones among 64; one bad
  array among 64 in at most 2 log2(64) + 1 restores, all 64 bad in 64 + 3 (halving alone would
  take 127), none bad in one."""
  import itertools
  import random

  from moba_jax import checkpoint as ckpt

  def scan(n, bad):
    calls = []
    reads = lambda sub: calls.append(1) or not set(sub) & bad
    return ckpt._failing(list(range(n)), reads), len(calls)
  for k in (1, 2, 3):
    for bad in itertools.combinations(range(12), k):
      assert scan(12, set(bad))[0] == list(bad)
  rng = random.Random(0)
  for _ in range(200):
    bad = {i for i in range(64) if rng.random() < rng.choice((0.02, 0.2, 0.8))}
    assert scan(64, bad)[0] == sorted(bad)
  assert all(scan(64, {i})[1] <= 13 for i in range(64))
  assert scan(64, set(range(64))) == (list(range(64)), 67)
  assert scan(64, set()) == ([], 1)


def test_a_torn_metrics_line_and_unreadable_step_metadata_are_named(trained_run, tmp_path,
                                                                     capsys):
  """A crash's torn last metrics line is skipped (the rows before it shown); a step whose
  _METADATA does not parse is one line naming the step and the other complete steps, and the
  older step still inspects."""
  import shutil
  run = tmp_path / "run"
  shutil.copytree(trained_run[0], run)
  with open(run / "metrics.jsonl", "a") as f:
    f.write('{"step": 3, "lo')
  (run / "checkpoints" / "2" / "params" / "_METADATA").write_text("garbage{")
  assert insp.main([str(run)]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "step 2 in " in err and "its metadata does not read" in err
  assert "the other complete steps: [1] (--step N)" in err
  assert insp.main([str(run), "--step", "1", "--json"]) == 0
  info = json.loads(capsys.readouterr().out)
  assert info["run"]["metrics"]["records"] == 2 and info["run"]["metrics"]["last"]["step"] == 2


def test_a_config_that_does_not_parse_is_said_to_be_one(tmp_path, capsys):
  """A run dir's config.toml that is not TOML (hand-edited, cut short) is named as such, with the
  parser's line and column, and still shown as written; a good one is shown without the note."""
  (tmp_path / "config.toml").write_text("[train]\nsteps = = 3\n")
  info = insp.run_info(tmp_path)
  assert info["config_error"].startswith("config.toml does not parse: ") and "line 2" in (
      info["config_error"])
  assert insp._format_run(info)[1:] == [f"config ({info['config_error']}; as written):\n"
                                        "[train]\nsteps = = 3"]
  (tmp_path / "config.toml").write_text("[train]\nsteps = 3\n")
  assert insp._format_run(insp.run_info(tmp_path))[1:] == ["config:\n[train]\nsteps = 3"]
