"""pytest options of the suite: `--compiled` runs the Pallas kernels compiled (tests/helpers.py)."""

from tests import helpers


def pytest_addoption(parser):
  parser.addoption("--compiled", action="store_true",
                   help="run the Pallas kernels compiled on this machine's GPU/TPU instead of in "
                        "interpret mode (skips the other platform's kernel)")


def pytest_configure(config):
  helpers.COMPILED = config.getoption("--compiled")
