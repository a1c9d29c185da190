"""pytest options of the suite: `--compiled` runs the Pallas kernels compiled (tests/helpers.py);
`--shard I/N` runs every N-th test from the I-th (0-based), so N processes can share one machine
(compiling kernels is CPU-bound: tools/run_h200.sh runs the compiled suite as 10 shards); with
`--shard-times FILE` (tests' measured seconds, tools/test_times.py) the shards are balanced by
those times instead (run 46: round robin left five of ten shards unfinished at 450 s, the
others done in 265-331 s);
`--failures-now` prints each failure's report when it happens, not only in the final summary,
which a run stopped at a time limit never reaches (run 42: nine failures of the compiled suite on
an H100 left only their F's); `--not-run-file PATH` keeps PATH listing the selected tests that
have not finished, one id a line, rewritten after each test (what a run stopped at its limit did
not reach: tools/run_h200.sh phase 69 reruns such a list; run 46 mapped them by hand)."""

import json
import os

import jax
import pytest

from tests import helpers


def pytest_addoption(parser):
  parser.addoption("--compiled", action="store_true",
                   help="run the Pallas kernels compiled on this machine's GPU/TPU instead of in "
                        "interpret mode (skips the other platform's kernel)")
  parser.addoption("--shard", default=None, help="I/N: run only tests I, I+N, I+2N, ...")
  parser.addoption("--shard-times", default=None,
                   help="with --shard: a JSON file of measured seconds per test id "
                        "(tools/test_times.py); the shards are then balanced by those times")
  parser.addoption("--failures-now", action="store_true",
                   help="print each failure's report as it happens (also in the summary)")
  parser.addoption("--not-run-file", default=None,
                   help="keep this file listing the selected tests not yet finished (one id a "
                        "line; without -n)")


_CONFIG = []  # the session's config, for the report hook
_TIMES = []  # --shard-times's (times, default_s), read when the options are checked


def pytest_configure(config):
  _check_options(config)
  helpers.COMPILED = config.getoption("--compiled")
  _CONFIG[:] = [config]


_NOT_RUN: dict[str, None] = {}  # --not-run-file: the selected tests not finished, in order


def _write_not_run(config):
  path = config.getoption("--not-run-file")
  with open(path + ".tmp", "w") as f:
    f.writelines(f"{nodeid}\n" for nodeid in _NOT_RUN)
  os.replace(path + ".tmp", path)  # a run killed mid-write leaves the last whole list


def pytest_collection_finish(session):
  if session.config.getoption("--not-run-file"):
    _NOT_RUN.clear()
    _NOT_RUN.update(dict.fromkeys(item.nodeid for item in session.items))
    _write_not_run(session.config)


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report):
  config = _CONFIG[0] if _CONFIG else None
  if (report.when == "teardown" and config and config.getoption("--not-run-file")
      and report.nodeid in _NOT_RUN):
    del _NOT_RUN[report.nodeid]
    _write_not_run(config)
  if not (report.failed and config and config.getoption("--failures-now")):
    return
  terminal = config.pluginmanager.get_plugin("terminalreporter")
  if terminal is None:  # an xdist worker: its controller gets the report and prints it
    return
  terminal.write_line("")
  terminal.write_sep("-", f"FAILED {report.nodeid} ({report.when})")
  terminal.write_line(report.longreprtext)


def _shard(config) -> tuple[int, int] | None:
  """--shard's (I, N), or None without it; a UsageError naming a bad value."""
  spec = config.getoption("--shard")
  if not spec:
    return None
  try:
    index, count = (int(x) for x in spec.split("/"))
    assert 0 <= index < count
  except (ValueError, AssertionError):
    raise pytest.UsageError(f"--shard={spec!r} must be I/N with 0 <= I < N") from None
  return index, count


def _check_options(config):
  """One-line UsageErrors for bad values and option combinations that would mislead, made in
  pytest_configure: before collection, and under -n before the workers start."""
  _shard(config)
  if config.getoption("--shard-times") and not config.getoption("--shard"):
    raise pytest.UsageError("--shard-times balances --shard I/N's shards; give --shard too")
  if config.getoption("--shard-times"):
    _TIMES[:] = [_read_times(config.getoption("--shard-times"))]
  if config.getoption("--not-run-file") and getattr(config.option, "numprocesses", None):
    raise pytest.UsageError("--not-run-file records one process's tests; run it without -n")


def _read_times(path: str) -> tuple[dict[str, float], float]:
  """(seconds per test id, seconds of a test not listed) from a --shard-times file."""
  try:
    with open(path) as f:
      table = json.load(f)
    times = {str(k): float(v) for k, v in dict(table["times"]).items()}
    default = float(table["default_s"])
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise pytest.UsageError(f"--shard-times={path!r}: {e} (expected a JSON object with "
                            "'times' {test id: seconds} and 'default_s')") from None
  bad = [(k, v) for k, v in [*times.items(), ("default_s", default)] if not v >= 0]
  if bad:
    raise pytest.UsageError(f"--shard-times={path!r}: {bad[0][0]!r} is {bad[0][1]}; every time "
                            "must be a number of seconds >= 0")
  return times, default


def pytest_collection_modifyitems(config, items):
  shard_spec = _shard(config)
  if shard_spec is None:
    return
  index, count = shard_spec
  if _TIMES:
    times, default = _TIMES[0]
    shard = balanced_shards([item.nodeid for item in items], times, default, count)
  else:
    shard = [i % count for i in range(len(items))]
  keep = [item for item, s in zip(items, shard) if s == index]
  config.hook.pytest_deselected(items=[item for item, s in zip(items, shard) if s != index])
  items[:] = keep


def balanced_shards(ids: list[str], times: dict, default: float, count: int) -> list[int]:
  """Each test's shard (0 <= shard < count): longest first onto the least-loaded shard (ties: the
  earlier test, the lower shard), a test missing from `times` at `default` seconds. Every process
  of a sharded run computes the same assignment from the same collection."""
  cost = [times.get(i, default) for i in ids]
  load, shard = [0.0] * count, [0] * len(ids)
  for i in sorted(range(len(ids)), key=lambda i: (-cost[i], i)):
    s = min(range(count), key=lambda s: (load[s], s))
    shard[i], load[s] = s, load[s] + cost[i]
  return shard


@pytest.fixture
def retraced(monkeypatch):
  """`monkeypatch` for module globals that jitted entries read while tracing (byte budgets, the
  kernel or sort a backend chooses): JAX's caches are cleared before the test and again after
  its patches are undone, so neither this test nor a later one reuses a trace made under the
  other's values. (Run 40, compiled on an H100: an earlier test had traced the same shapes and
  options with the default budget, and the lowering counted one pass's kernels, not two
  chunks'.)"""
  jax.clear_caches()
  yield monkeypatch
  monkeypatch.undo()
  jax.clear_caches()
