"""Several grid runs at once: each run a `moba-jax grid` subprocess, several per GPU.

A 12M-parameter model does not fill an H200, so `grid.workers = N` runs N training processes side by
side: stage 1 alone first, then the SFT runs, N at a time, spread round-robin over the visible GPUs
(CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`), each process holding an equal share of its GPU's memory
(XLA_PYTHON_CLIENT_MEM_FRACTION). The parent never touches a device. Each worker writes its run dir as
the sequential grid does (worker.log beside it); SIGTERM / SIGINT are forwarded to the workers, which
checkpoint and exit, and the grid stops as "preempted".
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from moba_jax import rundir
from moba_jax.signals import SignalFlag

MEMORY_SHARE = 0.9  # of each GPU's memory, split between its workers


def visible_gpus() -> list[str]:
  """GPU ids this process may use: CUDA_VISIBLE_DEVICES, else those nvidia-smi lists."""
  env = os.environ.get("CUDA_VISIBLE_DEVICES")
  if env is not None:
    return [g for g in env.split(",") if g.strip() and g.strip() != "-1"]
  try:
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return []
  return [str(i) for i, ln in enumerate(out.stdout.splitlines()) if ln.startswith("GPU ")]


def worker_env(slot: int, workers: int, gpus: list[str]) -> dict:
  """Environment of worker `slot` of `workers`: its GPU and memory share (nothing on CPU)."""
  env = dict(os.environ)
  if gpus:
    per_gpu = -(-workers // len(gpus))
    env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{MEMORY_SHARE / per_gpu:.3f}"
  return env


def run_pool(jobs: list[tuple[str, list[str], Path]], workers: int, on_done) -> str | None:
  """Runs jobs (name, argv, run_dir) `workers` at a time; on_done(index, returncode, seconds) after
  each. Returns the signal name if stopped by one (running workers are signalled and awaited)."""
  gpus = visible_gpus()
  queue = list(enumerate(jobs))
  running: dict[int, tuple[subprocess.Popen, int, float]] = {}  # slot -> (proc, job, start)
  signalled: set[int] = set()  # one signal per worker: a second could cut its final save
  with SignalFlag() as sig:
    while queue or running:
      while queue and len(running) < workers and not sig.received:
        slot = next(s for s in range(workers) if s not in running)
        i, (name, argv, run_dir) = queue.pop(0)
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / rundir.WORKER_LOG, "ab") as log:
          proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                  env=worker_env(slot, workers, gpus))
        running[slot] = (proc, i, time.time())
        print(f"[grid] started {name} (worker {slot}"
              + (f", GPU {worker_env(slot, workers, gpus)['CUDA_VISIBLE_DEVICES']}" if gpus
                 else "") + f") -> {run_dir}", flush=True)
      if sig.received:
        queue.clear()
        for proc, _, _ in running.values():
          if proc.poll() is None and proc.pid not in signalled:
            proc.send_signal(signal.SIGTERM)
            signalled.add(proc.pid)
      time.sleep(0.2)
      for slot, (proc, i, t0) in list(running.items()):
        if proc.poll() is not None:
          del running[slot]
          on_done(i, proc.returncode, time.time() - t0)
  return sig.received


def worker_argv(experiment: str, overrides: list[str], stage: str, variant=None,
                seed=None) -> list[str]:
  """The command of one worker: the same experiment and overrides, one run selected, through
  `moba-jax`'s entry point (its signal handling: a SIGTERM from the pool that lands after the
  worker's run returned keeps the worker's exit code, so a finished run is not recorded failed)."""
  argv = [sys.executable, "-m", "moba_jax.cli", "grid", experiment, *overrides, "grid.workers=1",
          f"--stage={stage}", "--worker", "--no-progress"]
  if variant is not None:
    argv += [f"--variant={variant}", f"--seed={seed}"]
  return argv
