"""`moba-jax grid`: plan and selection, a tiny end-to-end grid, failures, idempotent reruns."""

import json
import shutil
import math
import os

import numpy as np
import pytest

from moba_jax import data, grid, grid_pool, report
from moba_jax.config import load_config, load_experiment_config

TINY = """
run_dir = "unused"
[model]
vocab_size = 32
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
task = "kv_retrieval"
key_len = 1
value_len = 1
num_queries = 1
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
variants = [0, "all"]
jax_cache = false
[grid.pretrain.data]
task = "lm"
[grid.pretrain.train]
steps = 3
"""


@pytest.fixture(scope="module")
def tiny_toml(tmp_path_factory):
  path = tmp_path_factory.mktemp("exp") / "tiny.toml"
  path.write_text(TINY)
  return str(path)


# ----------------------------------------------------------------------------- plan (no training)


def test_packaged_experiments_load_and_fit_their_models():
  for name in ("layerwise_hybrid_cpu", "layerwise_hybrid_h200", "layerwise_hybrid_paper"):
    exp, _ = grid.load_experiment(name, ["out_dir=/tmp/x"])
    cfg = exp.run
    assert exp.grid.out_dir == "/tmp/x"
    assert list(exp.grid.variants) == [0, 1, 3, 5, 10, "all"]
    assert cfg.model.n_layers > 10  # hybrid 10 differs from all-full
    pre, runs = grid.plan(exp)
    assert len(runs) == 6 * len(exp.grid.seeds)
    if exp.grid.init_from:  # a shipped stage 1: it exists and stage 1 is not planned
      assert pre is None and os.path.isdir(os.path.join(exp.grid.init_from, "checkpoints"))
    else:
      assert pre.cfg.moba.hybrid_full_layers == 0
    assert cfg.train.seq_len > cfg.moba.block_size * cfg.moba.topk  # MoBA drops context
  pilot, _ = grid.load_experiment("passkey_pilot_cpu", [])
  pre, runs = grid.plan(pilot)
  assert pre.cfg.data.task == "lm" and pilot.run.data.task == "passkey"
  assert [r.variant for r in runs] == [0, "all"]
  assert pilot.run.train.seq_len > pilot.run.moba.block_size * pilot.run.moba.topk


def test_plan_stages_and_seeds(tiny_toml):
  cfg, _ = grid.load_experiment(tiny_toml, ["out_dir=/o", "grid.sft.train.lr=1e-4"])
  pre, runs = grid.plan(cfg)
  assert pre.run_dir.as_posix() == "/o/pretrain"
  assert pre.cfg.data.task == "lm" and pre.cfg.train.steps == 3
  assert [(r.variant, r.seed) for r in runs] == [(0, 0), (0, 1), ("all", 0), ("all", 1)]
  r = runs[3]
  assert r.run_dir.as_posix() == "/o/sft/full/seed1"
  assert r.cfg.moba.hybrid_full_layers == "all" and r.cfg.train.init_from == "/o/pretrain"
  assert r.cfg.train.lr == 1e-4 and r.cfg.data.task == "kv_retrieval"
  assert r.cfg.train.seed == 1 and runs[2].cfg.data.seed == r.cfg.data.seed
  # Seeds see different training rows but are scored on the same held-out rows.
  rows = lambda run, split: data.RowSource(run.cfg, split)[0]["inputs"]
  assert not np.array_equal(rows(runs[2], "train"), rows(r, "train"))
  np.testing.assert_array_equal(rows(runs[2], "eval"), rows(r, "eval"))


def test_select_only_seed_stage_and_init_from(tiny_toml):
  def names(*overrides):
    cfg, _ = grid.load_experiment(tiny_toml, ["out_dir=/o", *overrides])
    return [s.name.split(" (")[0] for s in grid.select(cfg, *grid.plan(cfg))]

  assert names("grid.only=all", "grid.only_seeds=1") == ["pretrain", "sft full seed 1"]
  assert names("grid.stage=pretrain") == ["pretrain"]
  assert names("grid.stage=sft", "only=0") == ["sft moba seed 0", "sft moba seed 1"]
  cfg, _ = grid.load_experiment(tiny_toml, ["out_dir=/o", "init_from=/ckpt"])
  pre, runs = grid.plan(cfg)
  assert pre is None and {r.cfg.train.init_from for r in runs} == {"/ckpt"}


@pytest.mark.parametrize("override, needle", [
    ("grid.variants=[0, 3]", "hybrid_full_layers=3 must be in [0, model.n_layers=2]"),
    ("grid.only=1", "grid.only=1 must be one of (0, 'all')"),
    ("grid.only=[1", "grid.only='[1' must be an integer or 'all', or a list of them"),
    ("grid.variants=[x]", "grid.variants='[x]' must be a list of integers or 'all'"),
    ("grid.seeds=[0, 0]", "grid.seeds=[0, 0] must be a non-empty list"),
    ("grid.stage=sometimes", "grid.stage='sometimes' must be one of"),
    ("grid.sft.data.response_tokens=8", "grid.sft: data.response_tokens=8 applies to data.task="),
    ("grid.pretrain.moba.implementation=nope", "grid.pretrain: moba.implementation='nope' must be"),
])
def test_bad_grid_values_named(tiny_toml, override, needle, capsys):
  assert grid.main([tiny_toml, override, "--dry-run"]) == 2
  assert needle in capsys.readouterr().err


def test_runs_that_could_not_start_are_named_before_any_runs(tiny_toml, ran_grid, tmp_path,
                                                             capsys):
  """Before any run: grid.init_from that is missing or a run of another model shape, and a
  kernel this platform cannot run (the sequential grid trains here), name the stage and key."""
  pre_run = str(ran_grid[0] / "pretrain")  # d_model 16
  for overrides, needle in (
      (["grid.init_from=/nonexistent"], "sft moba seed 0: train.init_from='/nonexistent': no such"),
      ([f"grid.init_from={pre_run}", "model.d_model=32"],
       "is a run of another model shape (model.d_model: 16 there, 32 now)"),
      (["grid.sft.moba.implementation=pallas_gpu"],
       "sft moba seed 0: moba.implementation='pallas_gpu'")):
    argv = [tiny_toml, f"out_dir={tmp_path / 'g'}", *overrides, "--no-progress"]
    assert grid.main(argv) == 2, overrides
    err = capsys.readouterr().err
    assert err.startswith("moba-jax grid: ") and needle in err and err.count("\n") == 1, err
  assert not (tmp_path / "g" / "pretrain").exists()  # nothing ran


def test_cli_flags_and_dry_run(tiny_toml, tmp_path, capsys):
  assert grid.main([tiny_toml, "--variant", "all", f"out_dir={tmp_path}", "--seed", "0",
                    "--dry-run"]) == 0  # flags and key=value overrides intermixed
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 2 and "sft full seed 0" in lines[1]
  assert grid.main([tiny_toml, "--variant", "three", "--dry-run"]) == 2


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def ran_grid(tiny_toml, tmp_path_factory):
  """The tiny grid run once, with the (full, seed 1) run failing."""
  out = tmp_path_factory.mktemp("grid")
  real = grid._train_run

  def flaky(cfg, progress):
    if cfg.moba.hybrid_full_layers == "all" and cfg.train.seed == 1:
      raise RuntimeError("boom: injected failure")
    return real(cfg, progress)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(grid, "_train_run", flaky)
    code = grid.main([tiny_toml, f"out_dir={out}", "--no-progress"])
  return out, code


def test_grid_writes_results_and_records_failure(ran_grid):
  out, code = ran_grid
  assert code == grid.EXIT_FAILED
  for name in report.RESULT_FILES:
    assert (out / name).is_file()
  rows = {r["variant"]: r for r in json.loads((out / "results.json").read_text())["rows"]}
  assert list(rows) == ["moba", "full"]
  assert rows["moba"]["status"] == "done" and rows["moba"]["n_seeds"] == 2
  assert math.isfinite(rows["moba"]["sft_loss"]) and math.isfinite(rows["moba"]["trailing_loss"])
  assert rows["full"]["n_seeds"] == 1 and "boom" in rows["full"]["status"]
  failed = out / "sft" / "full" / "seed1"
  assert json.loads((failed / report.RUN_FILE).read_text())["status"] == "failed"
  assert "RuntimeError" in (failed / "error.log").read_text()
  sft_cfg = (out / "sft" / "moba" / "seed0" / "config.toml").read_text()
  assert "init_from" in sft_cfg and str(out / "pretrain") in sft_cfg


def test_rerun_retries_failed_and_skips_done(ran_grid, tiny_toml, capsys):
  out, _ = ran_grid
  calls = []
  real = grid._train_run

  def counting(cfg, progress):
    calls.append(cfg.run_dir)
    return real(cfg, progress)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(grid, "_train_run", counting)
    assert grid.main([tiny_toml, f"out_dir={out}", "--no-progress"]) == 0
    assert calls == [str(out / "sft" / "full" / "seed1")]
    assert grid.main([tiny_toml, f"out_dir={out}", "--no-progress"]) == 0
    assert len(calls) == 1  # everything done: nothing trains
  table = capsys.readouterr().out
  assert "| full | all |" in table and "2/2" in table
  rows = json.loads((out / "results.json").read_text())["rows"]
  assert all(r["status"] == "done" and r["n_seeds"] == 2 for r in rows)


@pytest.fixture
def grid_copy(ran_grid, tiny_toml, tmp_path):
  """A copy of the ran grid (tests below change its records) -> (out, exp, sft specs by name)."""
  import shutil
  out = tmp_path / "grid"
  shutil.copytree(ran_grid[0], out)
  exp = load_experiment_config(tiny_toml, [f"grid.out_dir={out}"])
  return out, exp, {s.name: s for s in grid.plan(exp)[1]}


def test_a_rerun_under_other_settings_is_refused_before_any_run(grid_copy, tiny_toml, capsys,
                                                                monkeypatch):
  """Runs already in out_dir under other settings (a finished one would be reported as the new
  config's) stop the grid before any run, naming the run and the keys; where and how a run
  runs (train.RESUME_FREE) may change."""
  out, _, _ = grid_copy
  calls, results = [], (out / "results.json").read_text()
  monkeypatch.setattr(grid, "_train_run", lambda cfg, progress: calls.append(cfg.run_dir) or {})
  for overrides, needle in (
      (["moba.topk=1"], "pretrain (hybrid_full_layers=0): grid.out_dir="),
      (["grid.sft.train.lr=0.01"], "sft moba seed 0: grid.out_dir=")):
    argv = [tiny_toml, f"out_dir={out}", *overrides, "--no-progress"]
    assert grid.main(argv) == 2, overrides
    err = capsys.readouterr().err
    assert err.startswith("moba-jax grid: ") and needle in err and err.count("\n") == 1, err
    assert ("moba.topk: 2 there, 1 now" if "moba.topk=1" in overrides
            else "train.lr: 0.003 there, 0.01 now") in err and "use a new grid.out_dir" in err
  assert calls == [] and (out / "results.json").read_text() == results
  # stage 1 longer (a key runs may change): the stage-2 runs started from the shorter one
  started = sum(any((d / "checkpoints").glob("*")) for d in (out / "sft").glob("*/seed*"))
  assert started >= 3  # the failed run has none, unless a test before this one retried it
  assert grid.main([tiny_toml, f"out_dir={out}", "grid.pretrain.train.steps=4",
                    "--no-progress"]) == 2
  assert capsys.readouterr().err == (
      f"moba-jax grid: pretrain (hybrid_full_layers=0): it would train on to train.steps=4, past "
      f"the stage 1 that the runs in grid.out_dir={str(out)!r} started from (sft moba seed 0 and "
      f"{started - 1} more); they would not be of the new stage 1: use a new grid.out_dir "
      "(grid.init_from= the longer stage 1's run dir skips training it again)\n")
  assert grid.main([tiny_toml, f"out_dir={out}", "grid.pretrain.train.steps=4", "--stage",
                    "pretrain", "--no-progress"]) == 2  # stage 1 alone: the same
  assert "it would train on to train.steps=4" in capsys.readouterr().err
  # another stage 1 (grid.init_from): the stage-2 runs started from this one
  other = out.parent / "other_stage1"
  shutil.copytree(out / "pretrain", other)
  assert grid.main([tiny_toml, f"out_dir={out}", f"grid.init_from={other}", "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert (f"sft moba seed 0: grid.out_dir={str(out)!r} holds this run under other settings "
          "(train.init_from: ") in err and f"/pretrain' there, {str(other)!r} now)" in err, err
  assert calls == []
  argv = [tiny_toml, f"out_dir={out}", "moba.implementation=xla", "log.every=2", "--variant", "0",
          "--no-progress"]
  assert grid.main(argv) == 0 and calls == []  # done runs stay done


def test_a_pool_workers_exit_code_against_its_runs_own_record(grid_copy):
  """A worker's exit code decides nothing for a run whose summary says it finished (a signal
  after that, e.g. in the interpreter's exit); otherwise SIGTERM / SIGINT exits (143, 130, -15,
  -2) mean preempted (a rerun resumes) and other exits failed."""
  out, _, specs = grid_copy
  done = specs["sft moba seed 0"]
  for code in (143, -15, 1):
    assert grid._worker_record(done, code)["status"] == "done"
  assert json.loads((done.run_dir / report.RUN_FILE).read_text())["status"] == "done"
  cut = specs["sft moba seed 1"]
  (cut.run_dir / "summary.json").unlink()
  for code, status in ((143, "preempted"), (-15, "preempted"), (130, "preempted"),
                       (-2, "preempted"), (1, "failed"), (-9, "failed"), (139, "failed")):
    grid._record(cut, main=True, status="running", error=None)
    rec = grid._worker_record(cut, code)
    assert rec["status"] == status and f"code {code}" in rec["error"], (code, rec)


def test_a_pool_rerun_corrects_the_record_of_a_finished_run(grid_copy, monkeypatch):
  """A finished run whose record says failed (an older worker's exit code) is recorded done when
  the pool starts again; it is not run again."""
  out, exp, specs = grid_copy
  spec = specs["sft moba seed 0"]
  grid._record(spec, main=True, status="failed", error="worker exited with code 143")
  launched = []
  monkeypatch.setattr(grid_pool, "run_pool", lambda jobs, n, done: launched.extend(jobs))
  grid._run_pool(exp, None, [spec], ("exp.toml", []))
  assert launched == [] and json.loads((spec.run_dir / report.RUN_FILE).read_text())[
      "status"] == "done"


def test_report_marks_runs_done_at_fewer_steps_than_asked_incomplete(grid_copy, ran_grid):
  """The manifest names the SFT steps; runs done at fewer steps (the experiment asks for more
  now, and a rerun resumes them) are not averaged into the table."""
  out, exp, _ = grid_copy
  manifest = json.loads((out / "experiment.json").read_text())
  assert manifest["sft_steps"] == exp.stage_config("sft").train.steps
  manifest["sft_steps"] = 10 ** 6
  (out / "experiment.json").write_text(json.dumps(manifest))
  rows = report.write_results(out, chart=False)
  assert all(r["n_seeds"] == 0 and "incomplete" in r["status"] for r in rows)
  assert "of the 1000000 the experiment asks for" in rows[0]["status"]


def test_a_signal_while_the_grid_writes_its_results_waits_for_them(grid_copy, monkeypatch,
                                                                    capsys):
  """SIGTERM between the table and the charts: every result file is written, the exit code is
  the grid's, and the signal is named."""
  import os
  import signal
  out, exp, _ = grid_copy
  for name in report.RESULT_FILES:
    (out / name).unlink()
  real = report.plot

  def interrupted(*a, **kw):
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*a, **kw)
  monkeypatch.setattr(report, "plot", interrupted)
  assert grid._results(exp, 0, False, main=True) == 0
  assert all((out / name).is_file() for name in report.RESULT_FILES)
  assert "received SIGTERM while writing the results" in capsys.readouterr().err


def test_report_rebuilds_same_rows(ran_grid, capsys):
  out, _ = ran_grid
  before = (out / "results.csv").read_text()
  (out / "results.csv").unlink()
  assert report.main([str(out)]) == 0
  assert (out / "results.csv").read_text() == before


def test_train_reads_an_experiment_file_as_its_run(tiny_toml):
  exp = load_experiment_config(tiny_toml, ["grid.only=[0]"])
  assert exp.grid.only == (0,) and exp.grid.pretrain == {"data": {"task": "lm"},
                                                         "train": {"steps": 3}}
  assert load_config(tiny_toml) == exp.run
