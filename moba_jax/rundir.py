"""The one owner of run-directory file names and of atomic writes.

A run dir (moba-jax train) holds CONFIG, METRICS, SUMMARY and CHECKPOINTS (and PROFILE, TB,
UNUSABLE, ERROR_LOG when they happen); a grid's out_dir holds EXPERIMENT, the stage-1 run dir
PRETRAIN, the stage-2 run dirs `sft_run(out_dir, variant label, seed)` (each with RUN_FILE), the
results (RESULTS, LOSS_CHART, POSITION_CHART, COMPARE) and JAX_CACHE. Every file that a reader may
open while it is being written goes through atomic_write.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

CONFIG = "config.toml"  # the resolved config of the run
METRICS = "metrics.jsonl"  # one JSON object per logged step
SUMMARY = "summary.json"  # written at the end (status, losses, throughput)
CHECKPOINTS = "checkpoints"  # Orbax CheckpointManager directory
RUN_FILE = "grid_run.json"  # per-run record of the grid (variant, seed, status, error)
EXPERIMENT = "experiment.json"  # a grid's resolved config and chart labels
WORKER_LOG = "worker.log"  # output of a grid worker process
HF = "hf"  # a converted run dir's copy of the Hugging Face side files (moba-jax convert)
PROFILE = "profile"  # jax.profiler traces (train.profile_steps)
TB = "tb"  # TensorBoard event files (log.tensorboard)
UNUSABLE = "checkpoints_unusable"  # checkpoint steps that did not restore, set aside
ERROR_LOG = "error.log"  # the traceback of a grid run that raised
PRETRAIN = "pretrain"  # a grid's stage-1 run dir
SFT = "sft"  # a grid's stage-2 run dirs: SFT/<variant label>/seed<S>
JAX_CACHE = "jax_cache"  # a grid's persistent compilation cache
RESULTS = ("results.csv", "results.md", "results.json")  # a grid's table
LOSS_CHART = "loss_vs_layers.png"
POSITION_CHART = "position_loss.png"
COMPARE = "compare"  # `moba-jax report --compare`: compare.{md,json,png}
PARTIAL_STEP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")  # an interrupted Orbax save in CHECKPOINTS


def sft_run(out_dir: str | os.PathLike, label: str, seed: int) -> Path:
  """A grid's stage-2 run dir of variant `label` (report.variant_label) and `seed`."""
  return Path(out_dir) / SFT / label / f"seed{seed}"


class CheckpointWarning(UserWarning):
  """A checkpoint step that did not restore (moba_jax/checkpoint.py), here so that the command
  line can silence its Python form without importing JAX."""


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
  """Writes via a temporary file beside `path` and os.replace: readers never see a partial file.
  The file is created as open() would create it (mode 0666 less the umask)."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}-"
                                f"{os.path.basename(path)}")
  try:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    with os.fdopen(fd, "wb") as f:
      f.write(data.encode() if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.unlink(tmp)
    name_target_in_error(e, tmp, path, unnamed=True)
    raise


def name_target_in_error(e: BaseException, tmp: str | os.PathLike,
                         target: str | os.PathLike, *, unnamed: bool = False):
  """An OSError that names `tmp` (a temporary file or staging directory, gone once the error is
  handled) or a file inside it names the same file under `target` instead, the name the user
  gave (an error of two names, a failed rename, is left as it is). unnamed: one that
  names no file is the write's (a full disk) and names `target`; only where the failed block
  did nothing but write it (atomic_write), not where it also read inputs. Not a system error (no
  errno: a message of this package's own) is left as it is."""
  if not isinstance(e, OSError) or e.errno is None:
    return
  if e.filename is None:
    if unnamed:
      e.filename = os.fspath(target)
    return
  if e.filename2 is not None:  # a rename's or a link's: 'tmp' -> 'target' is what happened
    return
  if not isinstance(e.filename, (str, bytes, os.PathLike)):
    return  # a file descriptor
  try:
    rel = os.path.relpath(os.path.abspath(os.fsdecode(e.filename)), os.path.abspath(tmp))
  except (TypeError, ValueError):
    return
  if rel != os.pardir and not rel.startswith(os.pardir + os.sep):
    e.filename = os.fspath(target) if rel == os.curdir else os.path.join(os.fspath(target), rel)


def created_file_mode() -> int:
  """The mode open() gives a new file under the process's umask (0666 less it): for files a
  library writes with its own mode (safetensors: 0600), set afterwards. Read from /proc where
  Linux has it (setting the umask to read it races with other threads creating files)."""
  try:
    with open("/proc/self/status") as f:
      mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
  except (OSError, StopIteration, ValueError, IndexError):
    mask = os.umask(0o022)
    os.umask(mask)
  return 0o666 & ~mask


def make_writable_dir(path: str | os.PathLike, key: str) -> Path:
  """Creates directory `path` (and parents) and checks a file can be written in it; OSError
  naming the config key and the reason otherwise (read-only, not a directory, disk full...)."""
  path = Path(path)
  why = why_unwritable(path, directory=True)  # a file in the way, /proc: named as such
  if why:
    raise OSError(f"{key}={str(path)!r} cannot hold the run's files: {why}")
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write_probe.{uuid.uuid4().hex}"
    probe.write_bytes(b"x")
    probe.unlink()
  except OSError as e:
    raise OSError(f"{key}={str(path)!r} cannot hold the run's files ({e.strerror or e})") from None
  return path


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, *, main: bool = True):
  """A directory written whole or not at all: yields `.NAME.partial` beside `out` to build it in,
  renamed to `out` when the block ends without an error (removed on one). A build a kill cut
  short leaves only that hidden directory, which the next build removes first: `out` never holds
  a partial build. `out` must be missing or empty. main: the process that creates, removes and
  renames (the others of a multi-process build write into the same staging directory)."""
  out = Path(out)
  stage = out.parent / f".{out.name}.partial"
  if main:
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
  try:
    yield stage
  except BaseException as e:
    if main:
      shutil.rmtree(stage, ignore_errors=True)
    name_target_in_error(e, stage, out)
    raise
  if main:
    if out.exists():
      out.rmdir()  # empty (the caller checked): os.replace takes a missing name
    os.replace(stage, out)


def why_unwritable(path: str | os.PathLike, *, directory: bool) -> str | None:
  """Why `path` could not take what a command will write there at its end (a directory of
  files when `directory`, else one file written by atomic_write), or None; creates nothing, so
  a command checks its outputs before its work (a temporary file is made and deleted in the
  place the outputs would go). The reason names the place as given: a file where a directory
  must be (or the reverse), a parent that is a file, no write permission (or a filesystem that
  takes no file, as /proc)."""
  p = Path(path)
  if p.exists():
    if directory and not p.is_dir():
      return f"{str(p)!r} is not a directory"
    if not directory and p.is_dir():
      return f"{str(p)!r} is a directory, not a file"
    place = p if directory else p.parent
  else:
    place = next(q for q in p.parents if q.exists())  # '.' or '/' at the latest
    if not place.is_dir():
      return f"{str(place)!r} is not a directory"
  if not os.access(place, os.W_OK | os.X_OK):
    return f"{str(place)!r} is not writable"
  try:  # os.access grants root everything: a file made and gone at once asks the filesystem
    with tempfile.TemporaryFile(dir=place):
      pass
  except OSError as e:
    return f"{str(place)!r} is not writable ({e.strerror or e})"
  return None


def has_checkpoints(run_dir: str | os.PathLike) -> bool:
  """Whether run_dir's checkpoints/ holds anything: a run that starts there resumes (or falls
  back through damaged steps) rather than starting over."""
  ckdir = Path(run_dir, CHECKPOINTS)
  return ckdir.is_dir() and any(ckdir.iterdir())


def finished_step(run_dir: str | os.PathLike) -> int | None:
  """The step a run's summary says it finished at (status "done"), else None."""
  summary = read_json(Path(run_dir, SUMMARY)) or {}
  return summary.get("step", 0) if summary.get("status") == "done" else None


def read_json(path: str | os.PathLike) -> dict | None:
  """The JSON object in `path`, or None if it is missing or unreadable."""
  try:
    return json.loads(Path(path).read_text())
  except (OSError, ValueError):
    return None


LOCK = ".lock"  # held (flock) by the process training in the run dir


def clear(run_dir: str | os.PathLike) -> None:
  """Deletes what a run wrote (checkpoints, those set aside, metrics, summary, profiles,
  TensorBoard files, a grid run's error log) so that the run dir starts over (`moba-jax train
  --fresh`); the lock, the config and a grid's record stay."""
  import shutil

  for name in (CHECKPOINTS, UNUSABLE, PROFILE, TB):
    shutil.rmtree(Path(run_dir) / name, ignore_errors=True)
  for name in (METRICS, SUMMARY, ERROR_LOG):
    Path(run_dir, name).unlink(missing_ok=True)


@contextlib.contextmanager
def waiting_lock(path: str | os.PathLike):
  """Holds an exclusive lock (fcntl.flock) on the file `path`, waiting for another holder: for
  a shared build that two processes may start at once (the default corpus in the cache). A
  killed holder's lock goes with its process."""
  import errno
  import fcntl

  Path(path).parent.mkdir(parents=True, exist_ok=True)
  fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)  # read-only: another user's file locks too
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as e:  # a file system without flock (NFS mounted nolock): build unlocked
      if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
        raise
    yield
  finally:
    os.close(fd)  # releases the lock


class RunDirBusy(RuntimeError):
  """Another live process holds the run dir."""


class Lock:
  """An exclusive lock on a run dir (fcntl.flock on RUN/.lock, released when the process ends, even
  by kill -9). The file names the holder (host, pid, start time) for the error a second process
  gets. Finding a holder's note without its lock means that process died: taken over, with a
  warning."""

  def __init__(self, run_dir: str | os.PathLike):
    self.path = Path(run_dir) / LOCK
    self._f = None

  def __enter__(self):
    import fcntl
    import socket
    import sys
    import time

    self.path.parent.mkdir(parents=True, exist_ok=True)
    f = open(self.path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      f.close()
      raise RunDirBusy(f"run_dir {str(self.path.parent)!r} is in use by {holder}; wait for it to "
                       "finish, stop it, or use another run_dir") from None
    f.seek(0)
    previous = f.read().strip()
    if previous:
      print(f"WARNING: taking over the lock of {self.path.parent} from {previous} (no longer "
            "running)", file=sys.stderr, flush=True)
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    self._f = f
    return self

  def __exit__(self, *exc):
    if self._f is not None:
      self._f.seek(0)
      self._f.truncate()  # a clean exit leaves no note: the next holder has nothing to take over
      self._f.close()
      self._f = None
