"""The suite's own options (tests/conftest.py), as the compiled runs on a GPU use them
(tools/run_h200.sh: shards side by side under a time limit)."""

import json
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
  workers = _pytest(tmp_path, "-n", "2", "--shard", "2/2")  # checked before xdist's workers start
  assert workers.returncode == 4 and "--shard='2/2' must be I/N" in workers.stderr
  assert "INTERNALERROR" not in workers.stdout + workers.stderr


def test_shard_times_balance_the_shards_by_measured_seconds(tmp_path):
  """With --shard-times the longest test gets a shard to itself where it outweighs the rest
  (round robin would have put test_2 beside test_0)."""
  times = tmp_path / "times.json"
  times.write_text('{"default_s": 1, "times": {"test_cases.py::test_2": 10}}')
  out = _pytest(tmp_path, "--shard", "1/2", "--shard-times", str(times), "-vv")
  assert out.returncode == 1, out.stdout  # test_0 fails by design; test_2 (the kill) not run
  assert "test_1 PASSED" in out.stdout and "test_3 PASSED" in out.stdout
  assert "test_0 FAILED" in out.stdout and "test_2" not in out.stdout
  assert "1 failed, 2 passed, 1 deselected" in out.stdout
  for text, says in (('{"times": {}}', "'default_s'"), ('{"default_s": 1, "times": {"x": "abc"}}',
                     "could not convert"), ('{"default_s": 1, "times": {"x": -3}}', "'x' is -3.0"),
                     ('{"default_s": NaN, "times": {}}', "'default_s' is nan")):
    times.write_text(text)
    bad = _pytest(tmp_path, "--shard", "0/2", "--shard-times", str(times))
    assert bad.returncode == 4 and "--shard-times=" in bad.stderr and says in bad.stderr, text
    assert "Traceback" not in bad.stderr + bad.stdout
  alone = _pytest(tmp_path, "--shard-times", str(times))
  assert alone.returncode == 4 and "give --shard too" in alone.stderr


def test_balanced_shards_partition_the_tests_within_one_test_of_the_mean():
  """Every test in exactly one shard; no shard above the mean load by more than the longest test
  (the greedy bound), on random times; the same call gives the same shards."""
  import random

  from tests.conftest import balanced_shards
  rng = random.Random(0)
  for count in (1, 3, 10):
    ids = [f"t{i}" for i in range(rng.randrange(1, 60))]
    times = {i: rng.choice([0.5, 2, 30, 140]) for i in ids if rng.random() < 0.7}
    shard = balanced_shards(ids, times, 1.7, count)
    assert shard == balanced_shards(ids, times, 1.7, count)
    assert len(shard) == len(ids) and all(0 <= s < count for s in shard)
    cost = [times.get(i, 1.7) for i in ids]
    loads = [sum(c for c, s in zip(cost, shard) if s == k) for k in range(count)]
    assert max(loads) <= sum(cost) / count + max(cost) + 1e-9


def test_test_times_reads_each_phase_and_prices_the_unlisted(tmp_path):
  """tools/test_times.py: setup, call and teardown summed per id (ids with spaces kept whole), a
  later log's time kept, and the unlisted tests priced from the finished logs' summaries pooled
  (a log cut off at its limit gives no estimate, one with few unlisted tests is left out)."""
  from tools import test_times
  log = ("..s.\n== slowest durations ==\n"
         "30.00s call     tests/a.py::test_x[argv1-bad value: 'x' must be >= 1]\n"
         "5.50s setup    tests/a.py::test_y\n10.00s call     tests/a.py::test_y\n\n"
         "(9 durations < 5s hidden.)\n==== 6 passed, 1 skipped in 55.50s ====\n")
  times, unlisted = test_times.read_log(log)
  assert times == {"tests/a.py::test_x[argv1-bad value: 'x' must be >= 1]": 30.0,
                   "tests/a.py::test_y": 15.5}
  assert unlisted == (10.0, 5)  # 55.5 - 45.5 s over the 5 tests not listed
  cut = log.replace("==== 6 passed", "KeyboardInterrupt\n==== 6 passed")
  assert test_times.read_log(cut)[1] is None
  (tmp_path / "a.txt").write_text(log)
  (tmp_path / "b.txt").write_text("== slowest durations ==\n7.00s call     tests/a.py::test_y\n"
                                   "== 2 passed in 9.00s ==\n")  # one unlisted test: start-up
  out = tmp_path / "t.json"
  assert test_times.main([str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), "--out", str(out)]) == 0
  table = json.loads(out.read_text())
  assert table["default_s"] == 2.0 and table["times"]["tests/a.py::test_y"] == 7.0


def test_not_run_file_lists_what_a_killed_run_did_not_finish(tmp_path):
  """test_2 kills its process (a shard stopped at its limit): test_0 (failed) and test_1 finished
  and left the list; test_2, in progress, and test_3, never started, are still on it."""
  path = tmp_path / "not_run.txt"
  killed = _pytest(tmp_path, "--not-run-file", str(path))
  assert killed.returncode == -9
  assert path.read_text() == "test_cases.py::test_2\ntest_cases.py::test_3\n"
  out = _pytest(tmp_path, "--shard", "1/2", "--not-run-file", str(path))
  assert out.returncode == 0 and path.read_text() == ""  # a finished shard leaves it empty
