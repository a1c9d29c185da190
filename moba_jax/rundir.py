"""The one owner of run-directory file names and of atomic writes.

A run dir (moba-jax train) holds CONFIG, METRICS, SUMMARY and CHECKPOINTS; a grid's out_dir holds
EXPERIMENT, the stage-1 run dir PRETRAIN, SFT/<variant>/seed<S> run dirs (each with RUN_FILE) and
the results. Every file that a reader may open while it is being written goes through atomic_write.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

CONFIG = "config.toml"  # the resolved config of the run
METRICS = "metrics.jsonl"  # one JSON object per logged step
SUMMARY = "summary.json"  # written at the end (status, losses, throughput)
CHECKPOINTS = "checkpoints"  # Orbax CheckpointManager directory
RUN_FILE = "grid_run.json"  # per-run record of the grid (variant, seed, status, error)
EXPERIMENT = "experiment.json"  # a grid's resolved config and chart labels
WORKER_LOG = "worker.log"  # output of a grid worker process
PARTIAL_STEP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")  # an interrupted Orbax save in CHECKPOINTS


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
  """Writes via a temporary file beside `path` and os.replace: readers never see a partial file."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data.encode() if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def read_json(path: str | os.PathLike) -> dict | None:
  """The JSON object in `path`, or None if it is missing or unreadable."""
  try:
    return json.loads(Path(path).read_text())
  except (OSError, ValueError):
    return None
