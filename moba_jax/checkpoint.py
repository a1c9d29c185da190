"""Orbax checkpoint helpers: one CheckpointManager per run under `<run_dir>/checkpoints`.

Each step directory holds four items (ocp.args.Composite):
  params     StandardSave of the model parameters (a pure dict, arrays sharded as in training)
  opt_state  StandardSave of the nnx.Optimizer state (pure dict)
  data       Grain's iterator state (one JSON file per process, all equal: a global batch
             index), via grain.checkpoint; read directly where the process count changed
  meta       JSON: step, counters, the resolved config
Restoring takes the newest step that restores cleanly: a corrupt or partial newer step is reported
with a warning and skipped, never silently. Parameters restore into any attention setting (MoBA adds
no parameters), so an SFT stage may change moba.hybrid_full_layers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from moba_jax import rundir

ITEMS = ("params", "opt_state", "data", "meta")
_TMP = rundir.PARTIAL_STEP


class _QuietReadOnly(logging.Filter):
  """Orbax logs "Given directory is read only" on every read-only open (inspect, generate, eval,
  init_from): what was asked for, not news to the user."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_QuietReadOnly())


class _QuietUnretrievedReads(logging.Filter):
  """asyncio logs "Task exception was never retrieved" for each read of a failed restore after
  the first (Orbax gathers them and raises the first), each with TensorStore's whole spec: the
  restore's own error has said it (`unreadable_arrays` restores groups with several bad arrays)."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    if exc is None or "exception was never retrieved" not in str(record.msg):
      return True
    return not _is_read_error(exc)


logging.getLogger("asyncio").addFilter(_QuietUnretrievedReads())


def _is_read_error(e: BaseException) -> bool:
  """An Orbax or TensorStore read's error, in e or its causes: Orbax's "error while reading",
  TensorStore's "Error reading" or its status codes ("DATA_LOSS: ...", "OUT_OF_RANGE: ...")."""
  for _ in range(8):
    if e is None:
      return False
    text = str(e)
    if ("while reading" in text or "Error reading" in text
        or re.match(r"^[A-Z][A-Z_]+: ", text)):
      return True
    e = e.__cause__ or e.__context__
  return False


CheckpointWarning = rundir.CheckpointWarning


def _warn(msg: str) -> None:
  """A warning (for callers in Python: tests, notebooks) and one stderr line (the `moba-jax`
  commands ignore the warning: cli.py)."""
  warnings.warn(msg, CheckpointWarning, stacklevel=3)
  if jax.process_index() == 0:
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)


def _first_line(e: BaseException) -> str:
  """"Type: the message's first line" (TensorStore's errors run on with a whole spec)."""
  line = (str(e).splitlines() or [""])[0].split(". See full TensorStore details")[0]
  return f"{type(e).__name__}: {line[:300]}"


def checkpoint_dir(path: str) -> str:
  """The checkpoints dir of a run dir (or `path` itself if it already is one)."""
  path = os.path.abspath(path)
  sub = os.path.join(path, rundir.CHECKPOINTS)
  return sub if os.path.isdir(sub) else path


def _data_handler():
  import grain

  return grain.checkpoint.CheckpointHandler()


def manager(directory: str, keep: int = 3, async_save: bool = True,
            with_data: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
  """A CheckpointManager over `directory` (created unless read_only)."""
  # read-only: the settings Orbax would force (and warn about on every open) given as they are
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1,
      enable_async_checkpointing=async_save, create=not read_only, read_only=read_only)
  handlers = {"params": ocp.StandardCheckpointHandler(),
              "opt_state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
  if with_data:
    handlers["data"] = _data_handler()
  return ocp.CheckpointManager(os.path.abspath(directory), options=options, item_handlers=handlers)


@jax.jit
def _bit_sums(leaves):
  """Per array: (sum, index-weighted sum) of its bit patterns as uint32, wrapping: a flipped bit
  anywhere changes the first; a moved value, the second."""
  out = []
  for x in leaves:
    bits = x.reshape(-1)
    if bits.dtype.itemsize == 4:
      bits = jax.lax.bitcast_convert_type(bits, jnp.uint32)
    elif bits.dtype.itemsize == 2:
      bits = jax.lax.bitcast_convert_type(bits, jnp.uint16).astype(jnp.uint32)
    else:
      bits = bits.astype(jnp.uint32)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
    out.append(jnp.stack([jnp.sum(bits, dtype=jnp.uint32),
                          jnp.sum(bits * weights, dtype=jnp.uint32)]))
  return out


def _path(path) -> str:
  """"layers/0/attn/wq": the same whether a level is a list or a dict with string keys (as a
  checkpoint restored without a target gives it)."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def checksums(tree: dict) -> dict:
  """{"path/to/array": [sum, weighted sum]} of a pure-dict tree of arrays (computed on device)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  sums = jax.device_get(_bit_sums([jnp.asarray(x) for _, x in flat]))
  return {_path(path): [int(a), int(b)] for (path, _), (a, b) in zip(flat, sums)}


def mismatches(tree: dict, expected: dict | None) -> list[str]:
  """Paths whose checksums differ from `expected` (None: nothing recorded, nothing checked)."""
  if not expected:
    return []
  got = checksums(tree)
  return [p for p in expected if got.get(p) != expected[p]]


def save(mngr: ocp.CheckpointManager, step: int, params: dict, opt_state: dict, data_iter,
         meta: dict, force: bool = False) -> bool:
  """Saves all items of `step` (asynchronously if the manager is async). meta gets the checksums
  of every array (`checksums`), verified on restore."""
  import grain

  meta = {**meta, "checksums": {"params": checksums(params), "opt_state": checksums(opt_state)}}
  args = ocp.args.Composite(
      params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
      data=grain.checkpoint.CheckpointSave(data_iter), meta=ocp.args.JsonSave(meta))
  return mngr.save(step, args=args, force=force)


def _warn_partial(directory: str, latest: int | None) -> None:
  if not os.path.isdir(directory):
    return
  for name in sorted(os.listdir(directory)):
    m = _TMP.match(name)
    if m and (latest is None or int(m.group(1)) > latest):
      _warn(f"checkpoint {os.path.join(directory, name)} is partial (an interrupted save); "
            f"ignoring it and using step {latest}")


def save_params(run_dir: str, params: dict, meta: dict) -> None:
  """A parameters-only snapshot: <run_dir>/checkpoints/0 holding `params` and `meta` (with their
  checksums), as train.init_from, generate, eval and inspect read it (moba-jax convert's output).
  Not a run to resume: `params_only` recognises it."""
  meta = {**meta, "checksums": {"params": checksums(params)}}
  directory = os.path.join(os.path.abspath(run_dir), rundir.CHECKPOINTS)
  mngr = manager(directory, keep=1, async_save=False, with_data=False)
  mngr.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                       meta=ocp.args.JsonSave(meta)))
  mngr.wait_until_finished()
  mngr.close()


def params_only(run_dir: str) -> list[int]:
  """The steps of <run_dir>/checkpoints when every one of them holds parameters only (a
  `save_params` snapshot, not a training state); [] otherwise. Reads directory names only."""
  directory = os.path.join(run_dir, rundir.CHECKPOINTS)
  if not os.path.isdir(directory):
    return []
  steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit())
  if steps and all(os.path.isdir(os.path.join(directory, str(s), "params"))
                   and not os.path.exists(os.path.join(directory, str(s), "opt_state"))
                   for s in steps):
    return steps
  return []


def restore_latest(mngr: ocp.CheckpointManager, abstract_params, abstract_opt,
                   data_iter) -> tuple[int, dict, dict, dict] | None:
  """(step, params, opt_state, meta) from the newest step that restores; None if there is none.
  Restores the data iterator in place; a step that fails (a checksum, say, after its iterator
  state was read) gives the iterator its starting position back."""
  import grain

  start = data_iter.get_state()
  steps = sorted(mngr.all_steps(), reverse=True)
  _warn_partial(str(mngr.directory), steps[0] if steps else None)
  unusable = []
  for i, step in enumerate(steps):
    try:
      other = _other_processes_state(str(mngr.directory), step)  # before reading any array
      items = dict(params=ocp.args.StandardRestore(abstract_params),
                   opt_state=ocp.args.StandardRestore(abstract_opt), meta=ocp.args.JsonRestore())
      if other is None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
      out = mngr.restore(step, args=ocp.args.Composite(**items))
      if other is not None:
        data_iter.set_state(other)
      sums = out["meta"].get("checksums") or {}
      bad = (mismatches(out["params"], sums.get("params"))
             + mismatches(out["opt_state"], sums.get("opt_state")))
      if bad:
        raise ValueError(f"checksum mismatch in {len(bad)} arrays ({', '.join(bad[:3])}): the "
                         "files changed after they were saved")
    except ProcessCountError:  # the run's progress is there, for its own process count
      data_iter.set_state(start)
      raise
    except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
      data_iter.set_state(start)
      nxt = steps[i + 1] if i + 1 < len(steps) else None
      _warn(f"checkpoint step {step} in {mngr.directory} could not be restored "
            f"({_read_failure(e, mngr, step)}); falling back to "
            f"{'step ' + str(nxt) if nxt is not None else 'a fresh start'}")
      unusable.append(step)
      continue
    _set_aside(mngr, unusable)
    return step, out["params"], out["opt_state"], out["meta"]
  _set_aside(mngr, unusable)
  return None


class ProcessCountError(ValueError):
  """A step saved by another number of processes whose data states do not carry over."""


def _other_processes_state(directory: str, step: int) -> dict | None:
  """The data iterator state of `step` where it was saved by another number of processes than
  this run has (process_I-of-N.json, which Grain's handler reads for N processes only), else
  None. Rows are a function of the global batch index (moba_jax.data), so the processes of a run
  hold one state: it carries over to any process count. Saved states that differ (another data
  pipeline) raise ProcessCountError naming both counts, and the step is not set aside (the run's
  progress would be lost); a missing or unreadable state file raises as any damage to a step."""
  import json

  data = os.path.join(directory, str(step), "data")
  names = os.listdir(data) if os.path.isdir(data) else []
  files = {n: int(m.group(1)) for n in names
           if (m := re.fullmatch(r"process_\d+-of-(\d+)\.json", n))}
  counts = set(files.values())
  if not counts or jax.process_count() in counts:
    return None
  saved = max(counts)
  states = []
  for i in range(saved):
    name = os.path.join(data, f"process_{i}-of-{saved}.json")
    try:
      with open(name) as f:
        states.append(json.load(f))
    except (OSError, ValueError) as e:
      raise ValueError(f"{name}: {e}") from None  # damage: the step is unusable
  if any(st != states[0] for st in states):
    raise ProcessCountError(
        f"checkpoint step {step} in {directory} was saved by {saved} processes whose data "
        f"iterator states differ, and this run has {jax.process_count()}: resume it with "
        f"{saved} processes, or start a new run_dir with train.init_from={directory} (its "
        "parameters only)")
  if jax.process_index() == 0:
    print(f"note: checkpoint step {step} was saved by {saved} processes and continues on "
          f"{jax.process_count()}: their data iterator state {states[0]} carries over (each "
          "global batch is the same for any process count)", file=sys.stderr, flush=True)
  return states[0]


def _set_aside(mngr: ocp.CheckpointManager, steps: list[int]) -> None:
  """Moves unusable step dirs to <run dir>/checkpoints_unusable/ (nothing is deleted), so that the
  run can save those steps again when it reaches them."""
  if not steps or jax.process_index() != 0:
    return
  directory = str(mngr.directory)
  aside = os.path.join(os.path.dirname(directory), rundir.UNUSABLE)
  os.makedirs(aside, exist_ok=True)
  for step in steps:
    dest, n = os.path.join(aside, f"{step}.{int(time.time())}"), 1
    while os.path.exists(dest):  # set aside before within the same second
      dest, n = os.path.join(aside, f"{step}.{int(time.time())}.{n}"), n + 1
    os.replace(os.path.join(directory, str(step)), dest)
    _warn(f"moved the unusable checkpoint step {step} to {dest}")
  mngr.reload()


def restore_params(path: str, abstract_params, name: str = "train.init_from") -> tuple[int, dict]:
  """(step, params) of the newest restorable step under a run dir or checkpoints dir (params only:
  used by train.init_from). Raises FileNotFoundError if there is no checkpoint."""
  directory = checkpoint_dir(path)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{name}={path!r}: no such directory")
  mngr = manager(directory, with_data=False, read_only=True, async_save=False)
  steps = sorted(mngr.all_steps(), reverse=True)
  _warn_partial(directory, steps[0] if steps else None)
  tried = set()
  while steps:
    for step in steps:
      tried.add(step)
      try:
        out = mngr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore()))
        bad = mismatches(out["params"], (out["meta"].get("checksums") or {}).get("params"))
        if bad:
          raise ValueError(f"checksum mismatch in {len(bad)} arrays ({', '.join(bad[:3])})")
        mngr.close()
        return step, out["params"]
      except Exception as e:  # noqa: BLE001
        _warn(f"{name}: step {step} in {directory} could not be restored "
              f"({_first_line(e)}); trying an older step")
    # a run training into the directory may have saved newer steps and deleted these meanwhile
    mngr.reload()
    steps = sorted(set(mngr.all_steps()) - tried, reverse=True)
  mngr.close()
  raise FileNotFoundError(f"{name}={path!r}: no restorable checkpoint in {directory}")


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays: restore targets."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


def _read_failure(e: BaseException, mngr, step: int) -> str:
  """Why `step` did not restore: the error's first line, after the arrays that do not read
  when the error is a read's (a whole restore's names an index range, not the array; other
  failures, a checksum mismatch or another model's shapes, name their own) and the process is
  alone (`unreadable_arrays`)."""
  read = _is_read_error(e)
  bad = unreadable_arrays(mngr, step) if read and jax.process_count() == 1 else None
  if not bad:
    return _first_line(e)
  more = ", ..." if len(bad) > 3 else ""
  return f"{len(bad)} arrays do not read: {', '.join(bad[:3])}{more}; {_first_line(e)}"


SCAN_BYTES = 256 << 20  # the most bytes of arrays `unreadable_arrays` reads at once


def unreadable_arrays(mngr, step: int) -> list[str] | None:
  """The arrays of `step`'s params and opt_state that do not read ("item/path" each, in the
  metadata's order): a whole item's restore fails naming only an index range. Arrays are
  restored in groups of at most `SCAN_BYTES` (an array alone where it is larger); a group that
  fails is halved: a half that reads clears itself and blames the other (not read again), and
  where both halves fail (many bad arrays: a damaged file takes every array stored after the
  damage) its arrays are read one by one. So one bad array in a group of n costs about
  2 log2(n) restores, all bad n + 3. No barrier with other processes (a process-local
  checkpointer: a restore that failed on some processes only). None where that cannot be told:
  the metadata does not read, this Orbax has no placeholders for the arrays left out, or the
  scan itself failed."""
  if not hasattr(ocp, "PLACEHOLDER"):
    return None
  reader, bad = None, []
  try:
    with _quiet_failed_reads():
      local = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                                 active_processes={jax.process_index()})
      reader = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(), multiprocessing_options=local)
      meta = mngr.item_metadata(step)
      for item in ("params", "opt_state"):
        if meta.get(item) is None:
          continue
        tree = getattr(meta[item], "tree", meta[item])
        leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
        where = os.path.join(str(mngr.directory), str(step), item)

        def reads(chosen, leaves=leaves, treedef=treedef, where=where):
          chosen = set(chosen)
          pick = lambda f: treedef.unflatten([f(leaf) if i in chosen else ocp.PLACEHOLDER
                                              for i, (_, leaf) in enumerate(leaves)])
          args = ocp.args.PyTreeRestore(
              item=pick(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)),
              restore_args=pick(lambda _: ocp.RestoreArgs(restore_type=np.ndarray)))
          try:
            reader.restore(where, args=args)
            return True
          except Exception:  # noqa: BLE001 - some array of `chosen` does not read
            return False

        for group in _byte_groups([leaf for _, leaf in leaves]):
          bad += [f"{item}/{_path_name(leaves[i][0])}" for i in _failing(group, reads)]
  except Exception:  # noqa: BLE001 - a diagnosis on an error path: no names, not a new error
    return None
  finally:
    if reader is not None:
      with contextlib.suppress(Exception):
        reader.close()
  return bad


def _failing(idx: list[int], reads, known: bool = False) -> list[int]:
  """The indices of idx whose arrays do not read, by restores of subsets (reads(subset) -> bool):
  a subset that reads is clear; a failing one is halved, a half that reads clearing itself and
  blaming the other (known: idx holds a bad one, not restored whole again); where both halves
  fail, one restore an index."""
  if len(idx) == 1:
    return idx if known or not reads(idx) else []
  if not known and reads(idx):
    return []
  left, right = idx[:len(idx) // 2], idx[len(idx) // 2:]
  if reads(left):
    return _failing(right, reads, known=True)
  if reads(right):
    return _failing(left, reads, known=True)
  return [i for i in idx if not reads([i])]


def _byte_groups(leaves) -> list[list[int]]:
  """Indices of consecutive leaves (array metadata) in groups of at most `SCAN_BYTES`."""
  groups, size = [], SCAN_BYTES
  for i, leaf in enumerate(leaves):
    n = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    if not groups or size + n > SCAN_BYTES:
      groups.append([])
      size = 0
    groups[-1].append(i)
    size += n
  return groups


def _path_name(path) -> str:
  """'a/0/b' of a key path (dict keys, sequence indices)."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


@contextlib.contextmanager
def _quiet_failed_reads():
  """Reads expected to fail, without Orbax's absl warnings on stderr (an item without a handler,
  a missing metadata file). Its read coroutines' late unraisable exceptions, which repeat each
  failure with TensorStore's whole spec, the `moba-jax` commands drop (cli.py)."""
  absl = logging.getLogger("absl")
  level = absl.level
  absl.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl.setLevel(level)


def verify(directory: str, step: int) -> dict:
  """Reads every array of `step` and compares it with the checksums saved with it (moba-jax
  inspect --verify). -> {"ok", "checked" (arrays), "mismatched" (paths), "error"}, and where the
  step does not read "unreadable" (`unreadable_arrays`: paths, or None where not told)."""
  mngr = manager(checkpoint_dir(directory), with_data=False, read_only=True, async_save=False)
  try:
    items = [i for i in ("params", "opt_state") if os.path.isdir(os.path.join(
        str(mngr.directory), str(step), i))]
    out = mngr.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore(), **{i: ocp.args.StandardRestore() for i in items}))
  except Exception as e:  # noqa: BLE001 - unreadable is a verdict, not a crash
    return {"ok": False, "checked": 0, "mismatched": [], "error": _first_line(e),
            "unreadable": unreadable_arrays(mngr, step)}
  finally:
    mngr.close()
  sums = out["meta"].get("checksums")
  if not sums:
    return {"ok": None, "checked": 0, "mismatched": [], "error": "no checksums were saved with it"}
  bad = [f"{i}/{p}" for i in items for p in mismatches(out[i], sums.get(i))]
  return {"ok": not bad, "checked": sum(len(sums.get(i, {})) for i in items), "mismatched": bad,
          "error": None}
