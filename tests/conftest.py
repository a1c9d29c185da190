"""pytest options of the suite: `--compiled` runs the Pallas kernels compiled (tests/helpers.py);
`--shard I/N` runs every N-th test from the I-th (0-based), so N processes can share one machine
(compiling kernels is CPU-bound: tools/run_h200.sh runs the compiled suite as 6 shards);
`--failures-now` prints each failure's report when it happens, not only in the final summary,
which a run stopped at a time limit never reaches (run 42: nine failures of the compiled suite on
an H100 left only their F's)."""

import jax
import pytest

from tests import helpers


def pytest_addoption(parser):
  parser.addoption("--compiled", action="store_true",
                   help="run the Pallas kernels compiled on this machine's GPU/TPU instead of in "
                        "interpret mode (skips the other platform's kernel)")
  parser.addoption("--shard", default=None, help="I/N: run only tests I, I+N, I+2N, ...")
  parser.addoption("--failures-now", action="store_true",
                   help="print each failure's report as it happens (also in the summary)")


_CONFIG = []  # the session's config, for the report hook


def pytest_configure(config):
  helpers.COMPILED = config.getoption("--compiled")
  _CONFIG[:] = [config]


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report):
  config = _CONFIG[0] if _CONFIG else None
  if not (report.failed and config and config.getoption("--failures-now")):
    return
  terminal = config.pluginmanager.get_plugin("terminalreporter")
  if terminal is None:  # an xdist worker: its controller gets the report and prints it
    return
  terminal.write_line("")
  terminal.write_sep("-", f"FAILED {report.nodeid} ({report.when})")
  terminal.write_line(report.longreprtext)


def pytest_collection_modifyitems(config, items):
  spec = config.getoption("--shard")
  if not spec:
    return
  try:
    index, count = (int(x) for x in spec.split("/"))
    assert 0 <= index < count
  except (ValueError, AssertionError):
    raise pytest.UsageError(f"--shard={spec!r} must be I/N with 0 <= I < N") from None
  keep = [item for i, item in enumerate(items) if i % count == index]
  config.hook.pytest_deselected(items=[item for i, item in enumerate(items) if i % count != index])
  items[:] = keep


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
