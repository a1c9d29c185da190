"""The suite's own options (tests/conftest.py), as the compiled runs on a GPU use them
(tools/run_h200.sh: shards side by side under a time limit)."""

import subprocess
import sys

from tests.helpers import CHECKOUT

CASES = '''
import os, signal

def test_0():
  assert 1 == 2, "the first failure"

def test_1():
  pass

def test_2():  # a run cut off at its limit: no summary is ever printed
  os.kill(os.getpid(), signal.SIGKILL)

def test_3():
  pass
'''


def _pytest(tmp_path, *args):
  (tmp_path / "test_cases.py").write_text(CASES)
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
         "--rootdir", str(tmp_path), *args, str(tmp_path / "test_cases.py")]  # ids: test_cases.py::
  return subprocess.run(cmd, cwd=CHECKOUT, capture_output=True, text=True, timeout=120)


def test_failures_now_reports_a_failure_before_the_run_is_cut_off(tmp_path):
  killed = _pytest(tmp_path, "--failures-now")
  assert killed.returncode == -9
  assert "FAILED test_cases.py::test_0 (call)" in killed.stdout
  assert "the first failure" in killed.stdout
  assert "the first failure" not in _pytest(tmp_path).stdout  # without it: only the F


def test_shard_runs_every_nth_test(tmp_path):
  out = _pytest(tmp_path, "--shard", "1/2", "-vv")  # -q -vv: one line a test
  assert out.returncode == 0, out.stdout
  assert "test_1 PASSED" in out.stdout and "test_3 PASSED" in out.stdout
  assert "test_0" not in out.stdout and "test_2" not in out.stdout
  assert "2 passed, 2 deselected" in out.stdout
  bad = _pytest(tmp_path, "--shard", "2/2")
  assert bad.returncode == 4 and "--shard='2/2' must be I/N with 0 <= I < N" in bad.stderr
