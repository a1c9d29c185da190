"""A 2-process run on localhost (jax.distributed, gloo CPU collectives, 4 fake devices each)
equals the 1-process run with the same global batch and mesh."""

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
  mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
  single = run_helper(8, *mesh)  # shared with test_sharding
  port = free_port()
  run_dir = tmp_path / "multi"
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "tests", "train_helper.py"), "4", "--process-id",
       str(i), "--num-processes", "2", "--port", str(port), f"run_dir={run_dir}", *TINY, *mesh],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for i in range(2)]
  outs = [p.communicate(timeout=240) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  multi = json.loads(outs[0][0].strip().splitlines()[-1])
  assert multi["processes"] == 2 and multi["devices"] == 8
  for a, b in zip(single["losses"], multi["losses"]):
    assert abs(a - b) <= 1e-5 * abs(a)
  assert len(multi["losses"]) == len(single["losses"]) == 3
  data_dir = run_dir / "checkpoints" / "3" / "data"
  assert sorted(p.name for p in data_dir.glob("process_*.json")) == \
      ["process_0-of-2.json", "process_1-of-2.json"]
