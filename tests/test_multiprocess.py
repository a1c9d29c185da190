"""A 2-process run on localhost (jax.distributed, gloo CPU collectives, 4 fake devices each)
equals the 1-process run with the same global batch and mesh, and continues on 1 process."""

import json
import os
import socket
import subprocess
import sys

from tests.test_sharding import ROOT, TINY, run_helper


def free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  """3 steps on 2 processes (of a 5-step schedule) equal 1 process's; the run then continues on
  1 process (8 fake devices) from the 2 processes' checkpoint, with the batches a straight run
  reads: its 5 losses are the 1-process run's."""
  mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", "train.steps=5"]
  single = run_helper(8, *mesh)  # shared with test_sharding
  port = free_port()
  run_dir = tmp_path / "multi"
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "tests", "train_helper.py"), "4", "--process-id",
       str(i), "--num-processes", "2", "--port", str(port), f"run_dir={run_dir}", *TINY, *mesh,
       "train.stop_after=3"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for i in range(2)]
  outs = [p.communicate(timeout=240) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  multi = json.loads(outs[0][0].strip().splitlines()[-1])
  assert multi["processes"] == 2 and multi["devices"] == 8
  assert len(multi["losses"]) == 3 and len(single["losses"]) == 5
  for a, b in zip(single["losses"], multi["losses"]):
    assert abs(a - b) <= 1e-5 * abs(a)
  data_dir = run_dir / "checkpoints" / "3" / "data"
  assert sorted(p.name for p in data_dir.glob("process_*.json")) == \
      ["process_0-of-2.json", "process_1-of-2.json"]
  out = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tests", "train_helper.py"), "8", f"run_dir={run_dir}",
       *TINY, *mesh], capture_output=True, text=True, timeout=240, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "saved by 2 processes and continues on 1" in out.stderr
  resumed = json.loads(out.stdout.strip().splitlines()[-1])
  assert resumed["processes"] == 1 and resumed["summary"]["step"] == 5
  assert len(resumed["losses"]) == 5
  for a, b in zip(single["losses"], resumed["losses"]):
    assert abs(a - b) <= 1e-5 * abs(a)
