"""Runs that cannot be lost: model-shape changes, signals on checkpoint steps and during the final
save, unusable final checkpoints, the run-dir lock, the non-finite guard across reruns, file modes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from moba_jax import checkpoint as ckpt
from moba_jax import metrics, rundir, train
from tests.test_sharding import ROOT
from tests.test_train import TINY, losses, poison, tiny


def test_changed_model_shape_is_an_error_and_fresh_starts_over(tmp_path, capsys):
  run_dir = tmp_path / "run"
  base = [f"run_dir={run_dir}", *TINY, "train.steps=2", "eval.batches=0"]
  assert train.main(base) == 0
  config_before = (run_dir / "config.toml").read_text()
  capsys.readouterr()
  assert train.main(base + ["model.d_model=16"]) == 2
  err = capsys.readouterr().err
  assert "model.d_model: 32 there, 16 now" in err and "--fresh" in err
  assert err.count("\n") == 1  # one line, no traceback
  assert (run_dir / "config.toml").read_text() == config_before  # nothing overwritten
  assert (run_dir / "checkpoints" / "2").is_dir() and sorted(losses(run_dir)) == [1, 2]
  assert train.main(base + ["model.d_model=16", "train.steps=1", "--fresh"]) == 0
  assert sorted(losses(run_dir)) == [1]
  assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["1"]


def test_a_finished_run_under_other_settings_is_refused_and_an_unfinished_one_noted(tmp_path,
                                                                                    capsys):
  """A finished run started again under other settings would train nothing and report its old
  results as the new config's: refused, naming the keys, nothing rewritten. Settings a run may
  change (train.RESUME_FREE: kernels, logging, length) pass silently; an unfinished run continues
  under new settings with a note, and its config.toml then holds them."""
  run_dir = tmp_path / "run"
  base = [f"run_dir={run_dir}", *TINY, "train.steps=2", "eval.batches=0"]
  assert train.main(base) == 0
  config_before = (run_dir / "config.toml").read_text()
  summary_before = (run_dir / "summary.json").read_text()
  capsys.readouterr()
  assert train.main(base + ["moba.topk=2", "train.lr=0.01"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "finished at step 2 under other settings" in err, err
  assert "moba.topk: 3 there, 2 now; train.lr: 0.003 there, 0.01 now" in err and "--fresh" in err
  assert (run_dir / "config.toml").read_text() == config_before
  assert (run_dir / "summary.json").read_text() == summary_before
  assert train.main(base + ["moba.implementation=xla", "log.every=2"]) == 0
  assert "note:" not in capsys.readouterr().err
  # eval.* too: a finished run evaluates again when it starts (here on more batches)
  assert train.main(base + ["eval.batches=1"]) == 0
  assert "note:" not in capsys.readouterr().err
  assert json.loads((run_dir / "summary.json").read_text())["eval_loss"] is not None
  assert train.main(base + ["moba.topk=2", "train.steps=3"]) == 0
  err = capsys.readouterr().err
  notes = [x for x in err.splitlines() if x.startswith("note: run_dir")]
  assert notes == [f"note: run_dir={str(run_dir)!r} continues under settings changed since it "
                   "was saved: moba.topk: 3 there, 2 now"]
  # train.steps is free, but it also sets the schedule's length here (schedule_steps 0): said
  assert ("note: train.steps=3 (the run was saved with 2) also sets the learning-rate schedule's "
          "length here (train.schedule_steps=0)") in err, err
  assert "pass train.schedule_steps=2 to keep the run's schedule" in err
  assert train.main(base + ["moba.topk=2"]) == 0  # finished at 3 >= 2: nothing runs, no note
  assert "note:" not in capsys.readouterr().err
  assert sorted(losses(run_dir)) == [1, 2, 3]
  assert "topk = 2" in (run_dir / "config.toml").read_text()


def test_an_identical_rerun_with_relative_paths_is_the_same_config(tmp_path, monkeypatch):
  """Input paths compare as places: a Config built in Python with data.path relative to the
  cwd is the same run when it starts again (config.toml is compared as written, its relative
  paths against the cwd, not against its directory as a config file's are read)."""
  import dataclasses

  monkeypatch.chdir(tmp_path)
  (tmp_path / "t.jsonl").write_text("".join(
      json.dumps({"text": f"def f(x):\n  return x + {i}\n" * 5}) + "\n" for i in range(60)))
  cfg = tiny("run", "train.steps=2", "data.task=corpus", "model.vocab_size=259",
             "eval.batches=0")
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path="t.jsonl"))
  assert train.run(cfg, progress=False)["status"] == "done"
  assert train.config_changes(cfg) == []
  assert train.run(cfg, progress=False)["status"] == "done"


def _start(run_dir, *extra):
  args = [sys.executable, "-m", "moba_jax.cli", "train", f"run_dir={run_dir}", *TINY,
          "train.steps=400", "eval.batches=0", *extra]
  proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  metrics_file, deadline = run_dir / "metrics.jsonl", time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 3:
      break
    time.sleep(0.1)
  return args, proc


def test_signals_on_a_checkpoint_step_and_during_the_final_save(tmp_path):
  """Every step saves (checkpoint.every=1), so the signal lands on a checkpoint step; a second
  signal follows at once, while the final save runs, or, where the step's own save was the last,
  after the run's last line (then the command's exit code stands: 2 of 8 runs exited 130 before
  `cli._result_stands`). Nothing is lost and the rerun finishes."""
  run_dir = tmp_path / "run"
  args, proc = _start(run_dir, "checkpoint.every=1", "checkpoint.async_save=false")
  proc.send_signal(signal.SIGTERM)
  time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  summary = json.loads((run_dir / "summary.json").read_text())
  assert summary["status"] == "preempted"
  step = summary["step"]
  assert (run_dir / "checkpoints" / str(step) / "_CHECKPOINT_METADATA").exists()
  again = subprocess.run(args[:-1] + ["eval.batches=0", f"train.steps={step + 2}",
                                      "checkpoint.every=1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=180)
  assert again.returncode == 0, again.stderr[-3000:]
  assert json.loads((run_dir / "summary.json").read_text())["status"] == "done"
  assert sorted(losses(run_dir)) == list(range(1, step + 3))


def test_unusable_final_checkpoint_is_set_aside_and_the_run_finishes(tmp_path):
  run_dir = tmp_path / "run"
  train.run(tiny(run_dir, "train.steps=3", "checkpoint.every=0", "eval.batches=0"), progress=False)
  for f in (run_dir / "checkpoints" / "3" / "params" / "ocdbt.process_0" / "d").iterdir():
    f.write_bytes(b"garbage")  # every data file; the metadata reads
  with pytest.warns(ckpt.CheckpointWarning) as caught:
    summary = train.run(tiny(run_dir, "train.steps=3", "checkpoint.every=0", "eval.batches=0"),
                        progress=False)
  said = " | ".join(str(w.message) for w in caught)
  assert "moved the unusable checkpoint step 3" in said, said
  assert "could not be restored" in said and "falling back to a fresh start" in said, said
  # every params array of the 2-layer model (3 + 2 x 9) but its five norm scales: 128 bytes
  # each, kept inline in OCDBT's index (values up to 1024 bytes), which still reads
  assert "could not be restored (16 arrays do not read: params/embed, params/head, " \
         "params/layers/0/attn/wk, ...; " in said, said
  assert summary["status"] == "done" and summary["step"] == 3
  assert (run_dir / "checkpoints" / "3").is_dir()  # saved again
  (aside,) = (run_dir / "checkpoints_unusable").iterdir()  # the bad one kept, not deleted
  assert aside.name.startswith("3.")


def test_run_dir_lock(tmp_path, capsys):
  run_dir = tmp_path / "run"
  with rundir.Lock(run_dir):
    assert train.main([f"run_dir={run_dir}", *TINY, "train.steps=1"]) == 2
    err = capsys.readouterr().err
    assert f"is in use by pid {os.getpid()}" in err and err.count("\n") == 1
  (run_dir / rundir.LOCK).write_text("pid 999999 on elsewhere since then\n")  # died, note left
  with rundir.Lock(run_dir):
    assert "taking over the lock" in capsys.readouterr().err
  assert (run_dir / rundir.LOCK).read_text() == ""  # a clean exit leaves no note


def test_nonfinite_count_survives_a_rerun(tmp_path, monkeypatch):
  poison(monkeypatch)
  cfg = tiny(tmp_path, "train.steps=10", "train.max_nonfinite_steps=3", "checkpoint.every=1",
             "checkpoint.async_save=false")
  with pytest.raises(train.NonFiniteError, match=r"steps 1\.\.3.*last step with a finite loss "
                     r"was 0.*newest being step 2"):
    train.run(cfg, progress=False)
  # The rerun resumes at step 2 with two non-finite steps already counted: one more aborts.
  with pytest.raises(train.NonFiniteError, match=r"3 non-finite steps in a row \(steps 1\.\.3"):
    train.run(cfg, progress=False)


def test_files_keep_the_umask(tmp_path):
  old = os.umask(0o027)
  try:
    rundir.atomic_write(tmp_path / "f.json", "{}")
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o640
  finally:
    os.umask(old)
  rundir.atomic_write(tmp_path / "g.json", "{}")
  assert (tmp_path / "g.json").stat().st_mode & 0o777 == 0o666 & ~old
  assert not list(tmp_path.glob(".tmp-*"))


def test_a_failed_write_names_the_file_asked_for_not_the_temporary_one(tmp_path, monkeypatch):
  """atomic_write, staged_dir and a corpus build write under temporary names that are gone once
  the error is handled: the error names the path the user gave (a file inside a staging
  directory under the output directory; a failed rename's two names left as they are);
  atomic_write's error without
  a file (a full disk while it writes) names its file, but a build's does not name its output
  (the build also reads its inputs: a read's error is not the output's); an OSError of the
  package's own message is left alone; nothing temporary stays."""
  import errno

  from moba_jax import corpus

  def fail(code=errno.ENOSPC, *names):
    raise OSError(code, os.strerror(code), *names)
  with monkeypatch.context() as m:
    m.setattr(os, "fsync", lambda fd: fail())
    with pytest.raises(OSError) as err:
      rundir.atomic_write(tmp_path / "f.json", "{}")
  assert str(err.value) == f"[Errno 28] No space left on device: '{tmp_path / 'f.json'}'"
  with monkeypatch.context() as m:  # os.replace names the temporary file and the target
    m.setattr(os, "replace", lambda a, b: fail(errno.EXDEV, a, None, b))
    with pytest.raises(OSError) as err:
      rundir.atomic_write(tmp_path / "g.json", "{}")
  assert err.value.filename2 == tmp_path / "g.json"  # a failed rename says what it renamed
  assert os.path.basename(err.value.filename).startswith(".tmp-")
  out = tmp_path / "out"
  with pytest.raises(FileNotFoundError) as err:
    with rundir.staged_dir(out) as stage:
      open(stage / "sub" / "w.bin", "wb")  # a missing subdirectory: open names the file
  assert err.value.filename == str(out / "sub" / "w.bin")
  with pytest.raises(OSError) as err:
    with rundir.staged_dir(out) as stage:
      fail(errno.EIO, str(stage / "..hidden" / "x"))  # a name starting with '..' inside it
  assert err.value.filename == str(out / "..hidden" / "x")
  with pytest.raises(OSError) as err:
    with rundir.staged_dir(out):
      fail(errno.EIO)  # no file named: not said to be the output's
  assert err.value.filename is None
  with pytest.raises(OSError, match="^the package's own message$"):
    with rundir.staged_dir(out):
      raise OSError("the package's own message")
  (tmp_path / "src").mkdir()
  for i in range(20):  # both splits get documents
    (tmp_path / "src" / f"m{i}.py").write_text(f"x = {i}\n" * 50)
  real_write, real_read = corpus.Path.write_text, corpus.Path.read_bytes
  for what, patch, want in (
      ("write_text", lambda p, *a, **k: fail(errno.ENOSPC, str(p)) if p.name == corpus.MANIFEST
       else real_write(p, *a, **k), str(tmp_path / "corpus" / corpus.MANIFEST)),
      ("read_bytes", lambda p: fail(errno.EIO) if p.name == "m3.py" else real_read(p), None)):
    with monkeypatch.context() as m:  # the manifest (the last file a build writes); an input
      m.setattr(corpus.Path, what, patch)
      with pytest.raises(OSError) as err:
        corpus.build_code(tmp_path / "corpus", sources=[tmp_path / "src"], heldout_frac=0.5)
    assert err.value.filename == want, what
  assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no temporary file or directory


def test_metrics_file_reopened_when_deleted(tmp_path, capsys):
  log = metrics.MetricsLog(str(tmp_path), 0, tensorboard=False)
  log.write({"step": 1, "loss": 1.0})
  os.unlink(tmp_path / "metrics.jsonl")
  log.write({"step": 2, "loss": 0.5})
  log.close()
  assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] \
      == [2]
  assert "disappeared" in capsys.readouterr().err


@pytest.mark.parametrize("override", ["train.lr=inf", "train.lr=nan", "train.grad_clip=inf",
                                      "model.rope_theta=inf"])
def test_nonfinite_config_values_are_rejected(override):
  from moba_jax import config as C
  with pytest.raises(ValueError, match="must be a finite number"):
    C.load_config(None, [override])


def _flip_bytes(step_dir):
  """Flips 8 bytes in the middle of the largest params file: data that still decodes, wrong."""
  files = sorted((p for p in (step_dir / "params").rglob("*") if p.is_file()),
                 key=lambda p: -p.stat().st_size)
  data = bytearray(files[0].read_bytes())
  for i in range(len(data) // 2, len(data) // 2 + 8):
    data[i] ^= 0x5A
  files[0].write_bytes(bytes(data))


def test_flipped_bytes_are_caught_by_checksums_and_inspect_flags_them(tmp_path, capsys):
  from moba_jax import inspect
  run_dir = tmp_path / "run"
  cfg = tiny(run_dir, "train.steps=2", "checkpoint.every=1", "checkpoint.async_save=false",
             "eval.batches=0")
  train.run(cfg, progress=False)
  assert inspect.main([str(run_dir), "--verify"]) == 0
  assert "verify: ok" in capsys.readouterr().out
  _flip_bytes(run_dir / "checkpoints" / "2")
  assert inspect.main([str(run_dir), "--step", "2", "--verify"]) == 1
  assert "verify: FAILED (1 arrays differ: params/" in capsys.readouterr().out
  with pytest.warns(ckpt.CheckpointWarning) as caught:
    summary = train.run(tiny(run_dir, "train.steps=3", "checkpoint.every=1",
                             "checkpoint.async_save=false", "eval.batches=0"), progress=False)
  said = " | ".join(str(w.message) for w in caught)
  assert "checksum mismatch in 1 arrays" in said and "moved the unusable checkpoint step 2" in said
  assert summary["status"] == "done" and sorted(losses(run_dir)) == [1, 2, 3]


def test_checksums_see_every_bit():
  import jax.numpy as jnp
  import numpy as np
  tree = {"a": jnp.arange(12, dtype=jnp.float32).reshape(3, 4),
          "b": [jnp.ones(5, jnp.bfloat16), jnp.arange(3, dtype=jnp.int32)]}
  base = ckpt.checksums(tree)
  assert set(base) == {"a", "b/0", "b/1"}
  flipped = np.asarray(tree["a"]).copy().view(np.uint32)
  flipped[1, 2] ^= 1 << 7  # one bit of one element
  assert ckpt.mismatches({**tree, "a": jnp.asarray(flipped.view(np.float32))}, base) == ["a"]
  swapped = jnp.asarray(tree["a"])[:, ::-1]  # same values, other places
  assert ckpt.mismatches({**tree, "a": swapped}, base) == ["a"]
  as_dict = {"a": tree["a"], "b": {"0": tree["b"][0], "1": tree["b"][1]}}  # restored untargeted
  assert ckpt.mismatches(as_dict, base) == []


def _final_params(run_dir):
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  mngr = ckpt.manager(str(run_dir / "checkpoints"), with_data=False, read_only=True,
                      async_save=False)
  step = max(mngr.all_steps())
  params = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
  mngr.close()
  return step, [np.asarray(x) for x in jax.tree.leaves(params["params"])]


def _python(*lines):
  """A fresh interpreter running `lines` from the repository root (stdout and stderr captured)."""
  return subprocess.run([sys.executable, "-c", "\n".join(lines) + "\n"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


def test_a_signal_while_jax_imports_is_one_line_not_a_traceback():
  """`moba-jax` installs its signal handling before anything imports JAX (a slow import on a busy
  machine): the package's top level loads nothing heavy, and a SIGINT that lands inside the
  subcommand's import ends the process with exit 130 and one line."""
  code = ("import sys; import moba_jax.cli; print(sorted(m for m in ('jax', 'numpy', 'flax') "
          "if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       check=True).stdout
  assert out.strip() == "[]"
  proc = _python("import importlib, os, signal, sys",
                 "from moba_jax import cli",
                 "real = importlib.import_module",
                 "def interrupted(name, *a):",
                 "  os.kill(os.getpid(), signal.SIGINT)",
                 "  return real(name, *a)",
                 "cli.importlib.import_module = interrupted",
                 "sys.exit(cli.main(['train', 'train.steps=1']))")
  assert proc.returncode == 130, proc.stderr[-2000:]
  assert proc.stderr == "moba-jax: stopped by SIGINT (exit 130)\n"


def test_a_signal_after_the_command_returned_keeps_its_exit_code():
  """A SIGINT that lands after the command returned (the interpreter's clean-up, stood in for by
  a sleep) ends the process at once with the command's own code, not 130: the second signal that
  follows a preempted run's last line (test_signals_on_a_checkpoint_step_...) leaves exit 0."""
  proc = _python("import os, signal, sys, time",
                 "from moba_jax import cli",
                 "sys.argv = ['moba-jax', 'inspect', '/nonexistent/run']",
                 "rc = cli.main()",  # the entry point's call, as the console script makes it
                 "print('returned', rc, flush=True)",
                 "os.kill(os.getpid(), signal.SIGINT)",
                 "time.sleep(30)",
                 "sys.exit(99)")
  assert proc.stdout.splitlines()[-1] == "returned 2", proc.stdout
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "stopped by" not in proc.stderr and proc.stderr.startswith("moba-jax inspect: ")


def test_a_signal_while_the_interpreter_tears_down_keeps_the_exit_code():
  """Past the last exit hook the interpreter runs no Python signal handler; a SIGTERM landing
  there (here during a slow __del__ of module teardown, sent by a hook that runs after cli's)
  must not end the process with 143: a pool's worker that finished would read as failed."""
  proc = _python("import atexit, os, signal, subprocess, sys, time",
                 "class Slow:",
                 "  def __del__(self):",
                 "    time.sleep(1.5)",
                 "slow = Slow()",
                 "atexit.register(lambda: subprocess.Popen(",
                 "    ['sh', '-c', f'sleep 0.5; kill -TERM {os.getpid()}']))",
                 "from moba_jax import cli",
                 "sys.argv = ['moba-jax', '--help']",
                 "sys.exit(cli.main())")
  assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
  assert proc.stdout.startswith("usage: moba-jax")


@pytest.mark.parametrize("argv", [
    ["report"], ["grid", "--bogus"], ["inspect", "x", "--step", "y"], ["data"], ["generate"],
    ["eval"], ["convert"], ["plan"], ["bench", "--seqs", "x"], ["bench", "--decode", "--caches", "x"],
    ["bench", "--xla-option", "gpu_enable_command_buffer"], ["train", "--frsh"],
    ["train", "train.steps", "5"], ["train", "model.head_dim=15"],
])
def test_every_commands_argument_mistakes_are_one_line(argv, capsys):
  """Every subcommand's parser (cli.OneLineParser): a mistake is `moba-jax CMD: message` on one
  line and exit 2, never argparse's usage block or a traceback."""
  from moba_jax import cli

  before = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)]
  assert cli.main(argv) == 2
  # called from Python, it gives the caller's handlers back (pytest's SIGINT among them)
  assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)] == before
  err = capsys.readouterr().err
  assert err.startswith(f"moba-jax {argv[0]}: ") and err.count("\n") == 1, err


def test_an_unknown_subcommand_is_one_line_with_the_closest_named(capsys):
  from moba_jax import cli

  assert cli.main(["trian"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("moba-jax: unknown subcommand 'trian'; did you mean 'train'? expected "
                        "one of ['train', ") and err.count("\n") == 1, err
  assert cli.main(["zzz"]) == 2
  assert "did you mean" not in capsys.readouterr().err


def test_train_given_a_packaged_experiments_name_points_to_grid(tmp_path, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert train.main(["layerwise_hybrid_cpu"]) == 2
  assert capsys.readouterr().err == (
      "moba-jax train: 'layerwise_hybrid_cpu' is not a config file (no such file); the first "
      "argument may be a TOML or JSON file, the others look like key=value; "
      "'layerwise_hybrid_cpu' names a packaged experiment, which `moba-jax grid "
      "layerwise_hybrid_cpu` runs\n")
  assert train.main(["nothere.toml"]) == 2
  assert "packaged" not in capsys.readouterr().err


def test_a_reader_that_leaves_early_ends_the_command_quietly():
  """stdout's reader gone (`moba-jax inspect RUN --json | head -c 1`): exit 141, as a process
  ended by SIGPIPE, and no BrokenPipeError traceback on stderr."""
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # each write reaches the pipe inside the command
  proc = subprocess.Popen([sys.executable, "-m", "moba_jax.cli", "--help"], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
  proc.stdout.close()  # before the command writes a byte
  err = proc.stderr.read()
  assert proc.wait(timeout=120) == 141 and "Traceback" not in err, err


def test_the_entry_point_drops_only_late_callbacks_onto_a_closed_event_loop():
  """`moba-jax`'s unraisable hook: TensorStore's callbacks onto Orbax's closed loop after a
  failed read and the exceptions of Orbax's read coroutines finalized unawaited are dropped (a
  traceback after the verdict), anything else still reported: another coroutine's too."""
  import types

  from moba_jax import cli
  seen = []
  hook = cli._quiet_closed_loop(seen.append)
  coroutine = lambda path: types.SimpleNamespace(cr_code=types.SimpleNamespace(co_filename=path))
  orbax = os.path.join("site-packages", "orbax", "checkpoint", "serialization.py")

  def raised(cause):  # as Orbax's read coroutine raises when it is closed: from the cause
    try:
      raise Exception("Encountered error while reading array index") from cause
    except Exception as e:  # noqa: BLE001
      return e
  closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"), object=None)
  echo = types.SimpleNamespace(exc_value=raised(GeneratorExit()), object=coroutine(orbax))
  failed = types.SimpleNamespace(exc_value=raised(ValueError("x")), object=coroutine(orbax))
  mine = types.SimpleNamespace(exc_value=raised(GeneratorExit()), object=coroutine("my/r.py"))
  other = types.SimpleNamespace(exc_value=RuntimeError("something else"))
  for unraisable in (closed, echo, failed, mine, other):
    hook(unraisable)
  assert seen == [failed, mine, other]


def test_python_dash_m_cli_prints_a_mistake_in_one_line():
  """`python -m moba_jax.cli` (tools/run_h200.sh's way in) handles a command's mistake as the
  `moba-jax` script does: the commands raise the package module's UsageError, not __main__'s."""
  proc = subprocess.run([sys.executable, "-m", "moba_jax.cli", "bench", "--seqs", "x"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and proc.stderr.startswith("moba-jax bench: "), proc.stderr
  assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_killed_at_random_points_the_run_still_ends_bit_for_bit(tmp_path):
  """kill -9, SIGTERM twice in a row, SIGINT, at seeded random times (start-up, steps, the saves
  of every step, the final save and eval): rerunning the same command until it is done gives the
  parameters of an uninterrupted run, bit for bit."""
  import random
  import numpy as np
  args = lambda run_dir: [sys.executable, "-m", "moba_jax.cli", "train", f"run_dir={run_dir}",
                          *TINY, "train.steps=30", "checkpoint.every=1", "eval.batches=1"]
  straight = tmp_path / "straight"
  subprocess.run(args(straight), cwd=ROOT, check=True, capture_output=True, timeout=300)
  faulty, rng, kills, progress = tmp_path / "faulty", random.Random(0), [], []
  for attempt in range(7):  # six interrupted attempts, then the same command left to finish
    proc = subprocess.Popen(args(faulty), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    how = ("kill", "term-term", "int")[attempt % 3] if attempt < 6 else "none"
    if how != "none" and attempt % 2:  # during start-up: import, compilation, restore
      time.sleep(rng.uniform(0.5, 5.0))
    elif how != "none":  # once it trains again: steps and the saves after each of them
      rows = len(losses(faulty)) if (faulty / "metrics.jsonl").exists() else 0
      deadline = time.time() + 120
      while proc.poll() is None and time.time() < deadline and (
          not (faulty / "metrics.jsonl").exists() or len(losses(faulty)) <= rows):
        time.sleep(0.05)
      time.sleep(rng.uniform(0.0, 1.5))
    if how != "none" and proc.poll() is None:
      if how == "kill":
        proc.kill()
      else:
        proc.send_signal(signal.SIGTERM if how == "term-term" else signal.SIGINT)
        time.sleep(0.05)
        if how == "term-term" and proc.poll() is None:
          proc.send_signal(signal.SIGTERM)
      kills.append(how)
    _, err = proc.communicate(timeout=300)
    # Never a crash: done or preempted (0), killed by us, or stopped before training began
    # (128 + the signal, one line); never a traceback.
    assert proc.returncode in (0, -signal.SIGKILL, 130, 143), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    saved = [int(p.name) for p in (faulty / "checkpoints").glob("*") if p.name.isdigit()] \
        if (faulty / "checkpoints").is_dir() else []
    progress.append(max(saved, default=0))
    summary = json.loads((faulty / "summary.json").read_text()) \
        if (faulty / "summary.json").exists() else {}
    if summary.get("status") == "done" and summary.get("step") == 30:
      break
  else:
    raise AssertionError(f"not done after {attempt + 1} attempts ({kills})")
  assert len(kills) >= 4  # the run really was interrupted, in several ways,
  assert len(set(progress[:-1])) >= 3, progress  # and mid-training (checkpoints moved on between)
  (s1, a), (s2, b) = _final_params(straight), _final_params(faulty)
  assert s1 == s2 == 30
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert sorted(losses(faulty)) == list(range(1, 31))
  assert [losses(faulty)[s] for s in range(1, 31)] == [losses(straight)[s] for s in range(1, 31)]


def test_an_unwritable_run_dir_or_out_dir_is_one_line_before_any_work(tmp_path, capsys):
  """A run dir that cannot hold files (here: under a regular file, which stops root too) is a
  one-line error naming the key, exit 2, before the model is built or a grid run is recorded."""
  from moba_jax import grid, train
  (tmp_path / "file").write_text("")
  assert train.main([f"run_dir={tmp_path}/file/run", "train.steps=1"]) == 2
  assert (f"run_dir='{tmp_path}/file/run' cannot hold the run's files: '{tmp_path}/file' is not "
          "a directory") in capsys.readouterr().err
  assert grid.main(["passkey_pilot_cpu", f"out_dir={tmp_path}/file/grid", "--no-progress"]) == 2
  err = capsys.readouterr().err
  assert f"grid.out_dir='{tmp_path}/file/grid' cannot hold the run's files" in err
  assert "Traceback" not in err
