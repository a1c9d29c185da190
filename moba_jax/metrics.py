"""Run outputs: metrics.jsonl (one object per logged step), optional TensorBoard, eval reductions.

Only process 0 writes. Every JSONL line is flushed when written, so a crash loses nothing logged;
on resume, rows after the restored step are dropped (they will be recomputed identically).
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np

from moba_jax import rundir
from moba_jax.rundir import atomic_write


def _clean(v):
  if isinstance(v, (np.floating, np.integer)):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return None if math.isnan(v) else str(v)
  if isinstance(v, (list, tuple)):
    return [_clean(x) for x in v]
  return v


def dumps(obj: dict) -> str:
  return json.dumps({k: _clean(v) for k, v in obj.items()})


def read_rows(run_dir: str | os.PathLike) -> list[dict]:
  """The rows of a run's metrics.jsonl ([] without one), a line that does not parse (the torn
  last line a crash leaves) skipped."""
  rows = []
  try:
    with open(os.path.join(run_dir, rundir.METRICS)) as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:
          continue
        if isinstance(row, dict):
          rows.append(row)
  except FileNotFoundError:
    pass
  return rows


class MetricsLog:
  """Appends JSON lines to <run_dir>/metrics.jsonl; mirrors scalars to TensorBoard if enabled."""

  def __init__(self, run_dir: str, resume_step: int, tensorboard: bool, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(run_dir, rundir.METRICS)
    self.tb = None
    if not enabled:
      return
    self._truncate(resume_step)
    self.file = open(self.path, "a")
    if tensorboard:
      self.tb = _tensorboard_writer(os.path.join(run_dir, rundir.TB))

  def _truncate(self, resume_step: int) -> None:
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [ln for ln in f if ln.strip()]
    keep = []
    for ln in lines:
      try:
        if json.loads(ln).get("step", 0) <= resume_step:
          keep.append(ln)
      except ValueError:
        pass  # a torn last line from a crash
    if len(keep) != len(lines):
      atomic_write(self.path, "".join(keep))

  def write(self, row: dict) -> None:
    if not self.enabled:
      return
    if not os.path.exists(self.path):  # deleted under a running job: start it again, say so
      print(f"WARNING: {self.path} disappeared; reopening it (rows before step {row.get('step')} "
            "are gone)", file=sys.stderr, flush=True)
      self.file.close()
      self.file = open(self.path, "a")
    self.file.write(dumps(row) + "\n")
    self.file.flush()
    if self.tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
          self.tb.add_scalar(k, v, row["step"])

  def close(self) -> None:
    if self.enabled:
      self.file.close()
      if self.tb is not None:
        self.tb.close()


def _tensorboard_writer(logdir: str):
  for module in ("tensorboardX", "torch.utils.tensorboard"):
    try:
      mod = __import__(module, fromlist=["SummaryWriter"])
      return mod.SummaryWriter(logdir)
    except ImportError:
      continue
  print("log.tensorboard=true but neither tensorboardX nor torch.utils.tensorboard is installed; "
        "skipping TensorBoard (metrics.jsonl has everything)", file=sys.stderr)
  return None


class EvalAccumulator:
  """Sums per-token losses into: masked loss, all-token loss, trailing window, position buckets."""

  def __init__(self, seq_len: int, trailing: int, buckets: int):
    self.seq, self.trailing, self.buckets = seq_len, trailing, buckets
    self.sums = {k: 0.0 for k in ("masked", "masked_n", "all", "all_n", "trail", "trail_n",
                                  "trail_all", "trail_all_n")}
    self.bucket = {k: (np.zeros(buckets), np.zeros(buckets)) for k in ("masked", "all")}

  def add(self, nll: np.ndarray, mask: np.ndarray, real: np.ndarray) -> None:
    """nll, mask [B, T]; real [B, T]: 1 where the target is a real (non-padding) token."""
    nll, mask, real = (np.asarray(x, np.float64) for x in (nll, mask, real))
    tail = np.zeros(self.seq)
    tail[self.seq - self.trailing:] = 1.0
    s = self.sums
    for key, w in (("masked", mask), ("all", real), ("trail", mask * tail),
                   ("trail_all", real * tail)):
      s[key] += float(np.sum(nll * w))
      s[key + "_n"] += float(np.sum(w))
    bucket = np.minimum(np.arange(self.seq) * self.buckets // self.seq, self.buckets - 1)
    for key, w in (("masked", mask), ("all", real)):
      total, count = self.bucket[key]
      np.add.at(total, bucket, np.sum(nll * w, axis=0))
      np.add.at(count, bucket, np.sum(w, axis=0))

  def result(self) -> dict:
    s = self.sums
    mean = lambda a, n: a / n if n else None
    bounds = [self.seq * i // self.buckets for i in range(self.buckets + 1)]
    return {
        "eval_loss": mean(s["masked"], s["masked_n"]),
        "eval_lm_loss": mean(s["all"], s["all_n"]),
        "trailing_loss": mean(s["trail"], s["trail_n"]),
        "trailing_lm_loss": mean(s["trail_all"], s["trail_all_n"]),
        "eval_tokens": int(s["masked_n"]),
        # position-wise loss (the paper's Figure 5a): of the loss tokens, and of every real token
        **{name: [{"start": bounds[i], "end": bounds[i + 1], "loss": mean(total[i], count[i]),
                   "tokens": int(count[i])} for i in range(self.buckets)]
           for name, (total, count) in (("position_loss", self.bucket["masked"]),
                                        ("position_lm_loss", self.bucket["all"]))},
    }
