"""Training loop: bit-exact resume, SIGTERM, non-finite steps, corrupt checkpoints, attention
switch."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moba_jax import checkpoint as ckpt
from moba_jax import config as C
from moba_jax import rundir
from moba_jax import sharding as S
from moba_jax import train
from moba_jax import train_step as ts
from tests.helpers import flip_a_params_byte
from tests.test_sharding import ROOT

TINY = ["model.n_layers=2", "model.d_model=32", "model.mlp_dim=64", "model.n_heads=2",
        "model.n_kv_heads=1", "model.head_dim=16", "train.batch_size=4", "train.seq_len=64",
        "moba.block_size=16", "log.every=1", "eval.batches=1", "eval.trailing_tokens=16",
        "data.prefetch=0", "train.warmup_steps=2", "data.num_queries=2", "log.progress=false"]


def tiny(run_dir, *overrides):
  return C.load_config(None, [f"run_dir={run_dir}", *TINY, *overrides])


def losses(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_resume_reproduces_straight_run_bit_for_bit(tmp_path):
  a, b = tmp_path / "straight", tmp_path / "split"
  summary = train.run(tiny(a, "train.steps=12", "train.profile_steps=1",
                           "train.profile_start=3", "log.tensorboard=true"), progress=False)
  first = train.run(tiny(b, "train.steps=12", "train.stop_after=6"), progress=False)
  assert first["status"] == "stopped" and first["step"] == 6
  assert sorted(losses(b)) == list(range(1, 7))
  train.run(tiny(b, "train.steps=12"), progress=False)
  straight, split = losses(a), losses(b)
  assert sorted(split) == list(range(1, 13))
  assert [straight[s] for s in range(1, 13)] == [split[s] for s in range(1, 13)]  # exact
  for key in ("status", "step", "final_train_loss", "eval_loss", "trailing_loss", "tokens_per_s",
              "wall_s", "position_loss"):
    assert key in summary
  assert summary["status"] == "done" and summary["step"] == 12
  assert np.isfinite(summary["eval_loss"]) and np.isfinite(summary["trailing_loss"])
  assert json.loads((a / "summary.json").read_text())["step"] == 12
  assert C.load_config(str(a / "config.toml")).train.steps == 12
  assert any((a / "profile").rglob("*.xplane.pb"))
  assert sorted(int(p.name) for p in (b / "checkpoints").iterdir() if p.name.isdigit()) == [6, 12]


def test_a_preempted_runs_metrics_rows_are_the_straight_runs(tmp_path, monkeypatch):
  """A SIGTERM between two metrics rows (log.every=5, the signal during step 3): the losses of
  steps 1-3 go into the checkpoint, and the resumed run's rows equal the straight run's (loss,
  answer tokens); the summary's wall_s spans both invocations."""
  straight, split = tmp_path / "straight", tmp_path / "split"
  common = ("train.steps=10", "log.every=5", "eval.batches=0", "checkpoint.every=0")
  train.run(tiny(straight, *common), progress=False)
  dispatch = train._Loop.dispatch

  def signalled(loop):
    if loop.step == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return dispatch(loop)
  monkeypatch.setattr(train._Loop, "dispatch", signalled)
  first = train.run(tiny(split, *common), progress=False)
  assert first["status"] == "preempted" and first["step"] == 3 and not losses(split)
  monkeypatch.setattr(train._Loop, "dispatch", dispatch)
  second = train.run(tiny(split, *common), progress=False)
  rows = lambda d: [{k: r[k] for k in ("step", "loss", "answer_tokens")}
                    for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())]
  assert rows(split) == rows(straight) and len(rows(split)) == 2
  # the resumed run counts on from the time the first saved with its step-3 checkpoint (taken
  # before that save, so the first's summary, written after it, may say more: CI's machine
  # once spent 0.55 s more in the save than the resumed run took)
  saved = rundir.read_json(split / "checkpoints" / "3" / "meta" / "metadata")["wall_s"]
  assert 0 < saved <= first["wall_s"] and second["wall_s"] > saved


def test_a_run_that_dies_while_resuming_is_not_left_done(tmp_path, monkeypatch):
  """A summary from an earlier invocation says "running" (its other fields kept) once a rerun
  trains on: a crash or kill -9 then leaves no "done" or "preempted" for a run that was neither."""
  run_dir = tmp_path / "run"
  first = train.run(tiny(run_dir, "train.steps=2"), progress=False)
  assert first["status"] == "done"

  def crash(loop):
    raise RuntimeError("the process dies here")
  monkeypatch.setattr(train._Loop, "dispatch", crash)
  with pytest.raises(RuntimeError, match="dies here"):
    train.run(tiny(run_dir, "train.steps=4"), progress=False)
  summary = json.loads((run_dir / "summary.json").read_text())
  assert summary["status"] == "running" and summary["step"] == 2
  assert summary["eval_loss"] == first["eval_loss"]


def test_sigterm_saves_and_exits_then_resumes(tmp_path):
  run_dir = tmp_path / "run"
  args = [sys.executable, "-m", "moba_jax.cli", "train", f"run_dir={run_dir}", *TINY,
          "train.steps=500", "checkpoint.every=0", "eval.batches=0"]
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  metrics = run_dir / "metrics.jsonl"
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "received SIGTERM" in err and "run the same command again" in err
  step = json.loads((run_dir / "summary.json").read_text())["step"]
  assert 2 <= step < 500 and (run_dir / "checkpoints" / str(step)).is_dir()
  assert json.loads((run_dir / "summary.json").read_text())["status"] == "preempted"
  again = subprocess.run(args + [f"train.stop_after={step + 2}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=180)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"resumed from {run_dir / 'checkpoints'}/{step}" in again.stderr
  assert sorted(losses(run_dir)) == list(range(1, step + 3))


def poison(monkeypatch):
  clean = ts.loss_fn

  def nan_loss(model, batch):
    loss, tokens = clean(model, batch)
    return loss * jnp.nan, tokens
  monkeypatch.setattr(ts, "loss_fn", nan_loss)
  monkeypatch.setattr(ts, "_JIT_CACHE", {})  # compile afresh with the poisoned loss


def test_nonfinite_step_leaves_state_unchanged(tmp_path, monkeypatch):
  cfg = tiny(tmp_path)
  mesh = S.make_mesh(cfg.mesh)
  state = ts.init_state(cfg, mesh, S.rules_from_config(cfg.mesh))
  before = jax.tree.map(np.asarray, (nnx.to_pure_dict(state.params),
                                     nnx.to_pure_dict(state.opt_state)))
  poison(monkeypatch)
  step = ts.make_train_step(state)
  from moba_jax import data
  batch = S.global_batch(next(iter(data.train_dataset(cfg))), S.batch_sharding(mesh), 4)
  params, opt_state, m = step(state.params, state.opt_state, batch)
  assert int(m["finite"]) == 0 and not np.isfinite(float(m["loss"]))
  after = jax.tree.map(np.asarray, (nnx.to_pure_dict(params), nnx.to_pure_dict(opt_state)))
  jax.tree.map(np.testing.assert_array_equal, before, after)


def test_deterministic_steps_carry_xla_deterministic_ops_on_a_gpu(tmp_path):
  """train.deterministic compiles the train and eval steps with XLA's deterministic ops where the
  mesh is a GPU's (its scatter-adds use atomics), with no options elsewhere. The options reach
  XLA: a value it refuses fails both steps' compile; on the CPU the GPU's option changes no bit."""
  from moba_jax import data
  assert ts.compile_options(True, "gpu") == (("xla_gpu_deterministic_ops", True),)
  assert ts.compile_options(False, "gpu") == ts.compile_options(True, "cpu") == ()
  cfg = tiny(tmp_path, "train.deterministic=true")
  mesh = S.make_mesh(cfg.mesh)
  state = ts.init_state(cfg, mesh, S.rules_from_config(cfg.mesh))
  assert state.compile_options == ()  # the CPU's mesh
  batch = S.global_batch(next(iter(data.train_dataset(cfg))), S.batch_sharding(mesh), 4)
  held_out = S.global_batch(data.eval_batches(cfg)[0], S.batch_sharding(mesh), 4)

  def steps(options):
    s = dataclasses.replace(state, compile_options=options,  # fresh arrays: the step donates
                            params=jax.tree.map(jnp.copy, state.params),
                            opt_state=jax.tree.map(jnp.copy, state.opt_state))
    params, _, metrics = ts.make_train_step(s)(s.params, s.opt_state, batch)
    return jax.tree.map(np.asarray, (nnx.to_pure_dict(params), metrics,
                                     ts.make_eval_step(s)(state.params, held_out)))

  jax.tree.map(np.testing.assert_array_equal, steps(()), steps(ts.compile_options(True, "gpu")))
  refused = (("xla_gpu_deterministic_ops", "BOGUS"),)
  with pytest.raises(Exception, match="BOGUS"):
    steps(refused)
  s = dataclasses.replace(state, compile_options=refused)
  with pytest.raises(Exception, match="BOGUS"):
    ts.make_eval_step(s)(state.params, held_out)


def test_consecutive_nonfinite_steps_abort(tmp_path, monkeypatch, capfd):
  poison(monkeypatch)
  with pytest.raises(train.NonFiniteError, match="3 non-finite steps in a row"):
    train.run(tiny(tmp_path, "train.steps=10", "train.max_nonfinite_steps=3"), progress=False)
  assert "left unchanged" in capfd.readouterr().err


def test_corrupt_latest_checkpoint_falls_back(tmp_path):
  run_dir = tmp_path / "run"
  train.run(tiny(run_dir, "train.steps=6", "train.stop_after=4", "checkpoint.every=2",
                 "eval.batches=0"), progress=False)
  before = losses(run_dir)  # steps 1..4, checkpoints 2 (saved asynchronously mid-run) and 4
  ckdir = run_dir / "checkpoints"
  for f in (ckdir / "4" / "params").rglob("*"):
    if f.is_file() and "METADATA" not in f.name:
      f.write_bytes(b"garbage")
  (ckdir / "9.orbax-checkpoint-tmp-123").mkdir()  # an interrupted save
  with pytest.warns(ckpt.CheckpointWarning) as record:
    summary = train.run(tiny(run_dir, "train.steps=6", "checkpoint.every=2", "eval.batches=0"),
                        progress=False)
  messages = " ".join(str(w.message) for w in record)
  assert "step 4" in messages and "falling back to step 2" in messages
  assert "partial" in messages
  after = losses(run_dir)
  assert summary["step"] == 6 and sorted(after) == list(range(1, 7))
  assert [after[s] for s in (3, 4)] == [before[s] for s in (3, 4)]  # recomputed from step 2


def test_a_fresh_start_after_the_only_checkpoint_fails_reads_the_data_from_the_start(tmp_path):
  """The only checkpoint restores but fails its checksums (one byte flipped in its params): the
  run starts over, and its data iterator too (the failed restore had moved it to that step's
  position): the losses are those of a run that never had a checkpoint."""
  run_dir, fresh = tmp_path / "run", tmp_path / "fresh"
  common = ("train.steps=3", "checkpoint.every=0", "eval.batches=0")
  train.run(tiny(run_dir, *common), progress=False)
  flip_a_params_byte(run_dir / "checkpoints" / "3")
  (run_dir / "metrics.jsonl").unlink()
  with pytest.warns(ckpt.CheckpointWarning) as record:
    train.run(tiny(run_dir, *common), progress=False)
  messages = " ".join(str(w.message) for w in record)
  assert "a fresh start" in messages and "moved the unusable checkpoint step 3" in messages
  train.run(tiny(fresh, *common), progress=False)
  assert losses(run_dir) == losses(fresh)


def test_init_from_a_run_of_another_shape_is_named_before_anything_runs(tmp_path):
  """train.init_from naming a run of another model shape (or nothing) is a ValueError naming the
  differing keys before the model is built; a run dir that resumes does not read it."""
  src = tmp_path / "src"
  train.run(tiny(src, "train.steps=1", "eval.batches=0"), progress=False)
  with pytest.raises(ValueError, match=r"is a run of another model shape \(model.d_model: 32 "
                                       r"there, 48 now; model.mlp_dim: 64 there, 96 now\)"):
    train.run(tiny(tmp_path / "a", f"train.init_from={src / 'checkpoints'}",
                   "model.d_model=48", "model.mlp_dim=96"), progress=False)
  with pytest.raises(ValueError, match="train.init_from='/nonexistent': no such directory"):
    train.run(tiny(tmp_path / "b", "train.init_from=/nonexistent"), progress=False)
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
  # a run dir with checkpoints resumes and never reads init_from
  train.run(tiny(src, "train.steps=2", "eval.batches=0", "train.init_from=/nonexistent"),
            progress=False)


def test_init_from_reads_a_step_saved_while_the_older_ones_failed(tmp_path, monkeypatch):
  """train.init_from of a run still training: every step listed at the start fails (a run with
  checkpoint.keep=1 deletes them as it goes; here they fail their checksums) while a newer one
  appears; the list is read again and the newer step restores."""
  import shutil
  src = tmp_path / "src"
  train.run(tiny(src, "train.steps=2", "checkpoint.every=1", "eval.batches=0",
                 "checkpoint.async_save=false"), progress=False)
  ckdir = src / "checkpoints"
  shutil.copytree(ckdir / "2", tmp_path / "good")
  for step in ("1", "2"):
    flip_a_params_byte(ckdir / step)
  real = ckpt.manager

  def training_meanwhile(*a, **kw):
    mngr = real(*a, **kw)
    reload = mngr.reload

    def saved_then_reload():
      if not (ckdir / "3").exists():
        shutil.copytree(tmp_path / "good", ckdir / "3")
      return reload()
    mngr.reload = saved_then_reload
    return mngr
  monkeypatch.setattr(ckpt, "manager", training_meanwhile)
  cfg = tiny(tmp_path / "x")
  state = ts.init_state(cfg, S.make_mesh(cfg.mesh), S.rules_from_config(cfg.mesh))
  with pytest.warns(ckpt.CheckpointWarning) as record:
    step, _ = ckpt.restore_params(str(src), ckpt.abstract_like(nnx.to_pure_dict(state.params)))
  assert step == 3
  assert [str(w.message).split(" in ")[0] for w in record] == [
      "train.init_from: step 2", "train.init_from: step 1"]


def test_a_mesh_that_does_not_fit_the_devices_touches_no_file(tmp_path):
  """mesh.fsdp=3 (no device count here is a multiple): a ValueError before the run dir's
  config.toml is rewritten, and a new run dir is not made."""
  run_dir = tmp_path / "run"
  train.run(tiny(run_dir, "train.steps=1", "eval.batches=0"), progress=False)
  before = (run_dir / "config.toml").read_text()
  for target in (run_dir, tmp_path / "new"):
    with pytest.raises(ValueError, match="mesh"):
      train.run(tiny(target, "train.steps=2", "mesh.data=1", "mesh.fsdp=3"), progress=False)
  assert (run_dir / "config.toml").read_text() == before and not (tmp_path / "new").exists()


def _as_saved_by(data_dir, states):
  """Rewrites a step's data item as if saved by len(states) processes."""
  (data_dir / "process_0-of-1.json").unlink()
  for i, state in enumerate(states):
    (data_dir / f"process_{i}-of-{len(states)}.json").write_text(state)


def test_a_step_saved_by_another_process_count_continues_with_its_batches(tmp_path, capfd):
  """A checkpoint whose data item was saved by 2 processes (process_I-of-2.json, one global
  batch index), resumed by 1: the run goes on with the batches an uninterrupted run reads (its
  losses bit-equal) and says so."""
  straight = train.run(tiny(tmp_path / "straight", "train.steps=4", "eval.batches=0"),
                       progress=False)
  run_dir = tmp_path / "run"
  train.run(tiny(run_dir, "train.steps=4", "train.stop_after=2", "eval.batches=0"),
            progress=False)
  data = run_dir / "checkpoints" / "2" / "data"
  _as_saved_by(data, [(data / "process_0-of-1.json").read_text()] * 2)
  capfd.readouterr()
  resumed = train.run(tiny(run_dir, "train.steps=4", "eval.batches=0"), progress=False)
  assert "saved by 2 processes and continues on 1" in capfd.readouterr().err
  assert resumed["step"] == 4 and resumed["final_train_loss"] == straight["final_train_loss"]
  assert losses(run_dir) == losses(tmp_path / "straight")
  assert json.loads((run_dir / "checkpoints" / "4" / "data" / "process_0-of-1.json")
                    .read_text())["next_index"] == 4


def test_a_step_of_differing_process_states_is_named_not_set_aside(tmp_path):
  """Saved by 2 processes whose iterator states differ (not this pipeline's), resumed by 1: a
  ValueError naming both counts and train.init_from; the step is not set aside as unusable (a
  fresh start would lose the run)."""
  run_dir = tmp_path / "run"
  train.run(tiny(run_dir, "train.steps=4", "train.stop_after=2", "eval.batches=0"),
            progress=False)
  data = run_dir / "checkpoints" / "2" / "data"
  state = (data / "process_0-of-1.json").read_text()
  _as_saved_by(data, [state, state.replace("2", "3")])
  with pytest.raises(ValueError, match="saved by 2 processes whose data iterator states differ, "
                                       "and this run has 1: resume it with 2 processes, or start "
                                       "a new run_dir with train.init_from="):
    train.run(tiny(run_dir, "train.steps=4", "eval.batches=0"), progress=False)
  assert (run_dir / "checkpoints" / "2").is_dir()
  assert not (run_dir / "checkpoints_unusable").exists()


def test_a_damaged_step_of_another_process_count_falls_back(tmp_path, capfd):
  """Saved by 2 processes, one state file torn: that step is damaged like any other (a warning,
  set aside, the run resumes from the step before), not an error that stops the run."""
  run_dir = tmp_path / "run"
  train.run(tiny(run_dir, "train.steps=4", "train.stop_after=2", "checkpoint.every=1",
                 "eval.batches=0"), progress=False)
  data = run_dir / "checkpoints" / "2" / "data"
  state = (data / "process_0-of-1.json").read_text()
  _as_saved_by(data, [state, state[:5]])
  capfd.readouterr()
  with pytest.warns(ckpt.CheckpointWarning) as record:
    summary = train.run(tiny(run_dir, "train.steps=4", "checkpoint.every=1", "eval.batches=0"),
                        progress=False)
  assert "moved the unusable checkpoint step 2" in " ".join(str(w.message) for w in record)
  err = capfd.readouterr().err
  assert "step 2 in" in err and "process_1-of-2.json" in err and "falling back to step 1" in err
  assert summary["step"] == 4 and any((run_dir / "checkpoints_unusable").iterdir())


def test_checkpoint_restores_into_another_attention_setting(tmp_path, capfd):
  """A run resumes with every layer on full attention; train.init_from starts a hybrid run from
  the saved params: its one step (at train.lr=1e-6) saves params within 1e-5 of the source's,
  which are far from a fresh start's."""
  src = tmp_path / "moba"
  train.run(tiny(src, "train.steps=4", "train.stop_after=2", "moba.hybrid_full_layers=0",
                 "eval.batches=0"), progress=False)
  # resume the same run with every layer on full attention
  summary = train.run(tiny(src, "train.steps=4", "moba.hybrid_full_layers=all",
                           "eval.batches=0"), progress=False)
  assert summary["step"] == 4 and summary["hybrid_full_layers"] == "all"
  # init_from: params (only) into a hybrid model
  cfg = tiny(tmp_path / "sft", "moba.hybrid_full_layers=1", "train.steps=1",
             f"train.init_from={src}", "eval.batches=0", "train.lr=1e-6")
  state = ts.init_state(cfg, S.make_mesh(cfg.mesh), S.rules_from_config(cfg.mesh))
  abstract = ckpt.abstract_like(nnx.to_pure_dict(state.params))
  step, params = ckpt.restore_params(str(src), abstract)
  assert step == 4
  out = train.run(cfg, progress=False)
  assert out["step"] == 1 and "initialised params from" in capfd.readouterr().err
  assert not np.allclose(np.asarray(params["embed"]),
                         np.asarray(nnx.to_pure_dict(state.params)["embed"]))
  # the run started from the source's params: one AdamW step of lr <= 1e-6 moves each by ~1e-6
  step, trained = ckpt.restore_params(str(tmp_path / "sft"), abstract)
  assert step == 1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0,
                                                       atol=1e-5), trained, params)


def test_lr_schedule_warmup_cosine():
  """Every step's LR is the closed form: linear warmup from 0 to lr, then the cosine
  end + (lr - end) * (1 + cos(pi * t)) / 2 with end = lr * min_lr_ratio and t the fraction of the
  decay steps done (a linear decay is up to 0.09 lr away from it here); a warmup longer than the
  schedule is capped at it."""
  tc = C.TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
  sched = ts.lr_schedule(tc)
  assert float(sched(0)) == 0.0 and abs(float(sched(10)) - 1.0) < 1e-6
  assert abs(float(sched(100)) - 0.1) < 1e-6 and float(sched(50)) < float(sched(20))
  steps = np.arange(121)
  t = np.clip((steps - 10) / 90, 0, 1)
  expected = np.where(steps < 10, steps / 10, 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * t)))
  np.testing.assert_allclose([float(sched(s)) for s in steps], expected, rtol=0, atol=1e-6)
  capped = ts.lr_schedule(C.TrainConfig(steps=8, lr=2.0, warmup_steps=20, min_lr_ratio=0.1))
  np.testing.assert_allclose([float(capped(s)) for s in range(8)], np.arange(8) / 4, atol=1e-6)
