"""`moba-jax` entry point. Each subcommand lives in its own module as `main(argv) -> int`."""

from __future__ import annotations

import argparse
import atexit
import difflib
import importlib
import math
import os
import signal
import sys
import warnings

from moba_jax import rundir

SUBCOMMANDS = {
    "train": ("moba_jax.train", "train one run from a TOML config and key=value overrides"),
    "grid": ("moba_jax.grid", "run the layer-wise hybrid experiment grid"),
    "data": ("moba_jax.data_cli", "build a real-text corpus (Python source, JSONL) for training"),
    "report": ("moba_jax.report", "rebuild the grid's table and chart from its run directories"),
    "inspect": ("moba_jax.inspect", "list a checkpoint directory's steps, config and arrays"),
    "generate": ("moba_jax.generate", "continue text prompts from a checkpoint (exact MoBA decoding)"),
    "eval": ("moba_jax.evals", "long-context retrieval (passkey / needle) over lengths and depths"),
    "bench": ("moba_jax.bench", "time MoBA implementations against full attention"),
    "plan": ("moba_jax.plan", "dry-run an experiment on a fake pod mesh: lowering, memory, shards"),
    "convert": ("moba_jax.convert", "Hugging Face Llama/Qwen2 checkpoints to a run dir and back"),
}


class UsageError(ValueError):
  """A bad command line: the command prints it as one line and exits with 2."""


class OneLineParser(argparse.ArgumentParser):
  """argparse for moba-jax commands: a mistake raises UsageError (one line, no usage block; the
  usage is -h), which the command's main prints as `moba-jax CMD: message`, exit 2."""

  def error(self, message):
    raise UsageError(message)


def number_arg(kind, lo, hi=None, why_hi=""):
  """An argparse type: a finite int/float >= lo (and <= hi, `why_hi` saying why; argparse names
  the flag in its error)."""
  def parse(text):
    try:
      value = kind(text)
    except ValueError:
      value = None
    if value is None or not math.isfinite(value) or value < lo:
      what = "an integer" if kind is int else "a finite number"
      raise argparse.ArgumentTypeError(f"{text!r} must be {what} >= {lo}")
    if hi is not None and value > hi:
      raise argparse.ArgumentTypeError(f"{text!r} must be at most {hi}{why_hi}")
    return value
  return parse


def usage() -> str:
  lines = ["usage: moba-jax {" + ",".join(SUBCOMMANDS) + "} [args ...]", ""]
  lines += [f"  {name:8s} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  """`moba-jax`. Without argv (the console script, `python -m moba_jax.cli`) it is the process's
  entry point and keeps SIGTERM/SIGINT until the process exits (`_result_stands`); called with
  argv from Python (tests, notebooks) it gives the caller's signal handlers back on return."""
  if argv is not None:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
      return _main(argv)
    finally:
      for sig, handler in saved.items():
        signal.signal(sig, handler)
  # Registered before any command imports JAX, so it runs after their exit hooks: the last one.
  atexit.register(_ignore_late_signals)
  # moba_jax.checkpoint prints each CheckpointWarning as one "WARNING: ..." line itself
  warnings.simplefilter("ignore", rundir.CheckpointWarning)
  sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)
  code = _main(sys.argv[1:])
  _result_stands(code)
  return code


def _main(argv: list[str]) -> int:
  try:
    return _dispatch(argv)
  except BrokenPipeError:  # stdout's reader left (`| head`): stop quietly, as `cat` would
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the interpreter's last flush has nowhere to fail
    return 128 + signal.SIGPIPE


def _dispatch(argv: list[str]) -> int:
  if not argv or argv[0] in ("-h", "--help"):
    print(usage())
    return 0
  name, rest = argv[0], argv[1:]
  if name not in SUBCOMMANDS:
    close = difflib.get_close_matches(name, SUBCOMMANDS, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    print(f"moba-jax: unknown subcommand {name!r}; {hint}expected one of {list(SUBCOMMANDS)}",
          file=sys.stderr)
    return 2
  # Until a command installs its own handling (training checkpoints and stops), SIGTERM and
  # SIGINT end the process with a one-line message and the shell's exit codes, no traceback.
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, _stop)
  module = importlib.import_module(SUBCOMMANDS[name][0])
  try:
    return int(module.main(rest) or 0)
  except UsageError as e:  # a command-line mistake its main left to us: one line, exit 2
    print(f"moba-jax {name}: {e}", file=sys.stderr)
    return 2


def _result_stands(code: int) -> None:
  """After the command returned: a SIGTERM or SIGINT that lands while the interpreter exits
  (JAX's and Orbax's clean-up can take a while) ends the process at once with the command's own
  exit code, its output flushed. The command's files are written by then: a preempted run that
  saved its checkpoint and summary still exits 0 when a second signal follows its last line."""
  def finish(signum, frame):
    for stream in (sys.stdout, sys.stderr):
      try:
        stream.flush()
      except (OSError, ValueError):  # closed or broken: nothing left to keep
        pass
    os._exit(code)

  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, finish)


def _quiet_closed_loop(hook):
  """sys.unraisablehook without the late echoes of a checkpoint read that failed, tracebacks
  after the command's own one-line verdict: TensorStore's callbacks onto Orbax's closed event
  loop ("RuntimeError: Event loop is closed") and the exceptions an Orbax read coroutine raises
  from the GeneratorExit of its closing (each failure again, with TensorStore's whole spec:
  `inspect --verify` reads the arrays in groups to name those that do not read). Every other
  unraisable exception goes to `hook`."""
  def quiet(unraisable):
    exc = unraisable.exc_value
    code = getattr(getattr(unraisable, "object", None), "cr_code", None)  # a coroutine's
    closed = isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"
    echo = (code is not None and isinstance(getattr(exc, "__cause__", None), GeneratorExit)
            and f"{os.sep}orbax{os.sep}checkpoint{os.sep}" in code.co_filename)
    if not (closed or echo):
      hook(unraisable)
  return quiet


def _ignore_late_signals() -> None:
  """The process's last exit hook: past it the interpreter tears itself down and runs no Python
  signal handler, so a SIGTERM or SIGINT would end it with the signal's status (143, 130) in
  place of the command's code, turning a run that finished into a failed one for whoever waits
  on it (the grid's pool). From here on they are ignored; the process exits in a moment."""
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, signal.SIG_IGN)


def _stop(signum, frame):
  """Ends the process at once. Not by raising SystemExit: a signal that lands while the
  interpreter runs a GC or weakref callback (JAX registers some) has its exception printed and
  ignored, and start-up would go on. Nothing is half-written here: before a command installs its
  own handling, its files are written atomically (rundir.atomic_write)."""
  code = 128 + int(signum)
  print(f"moba-jax: stopped by {signal.Signals(signum).name} (exit {code})", file=sys.stderr,
        flush=True)
  sys.stdout.flush()
  os._exit(code)


if __name__ == "__main__":
  # `python -m moba_jax.cli`: run the package's module, not this __main__ copy, whose UsageError
  # is not the one the commands raise (a mistake would print a traceback)
  from moba_jax import cli as _cli
  sys.exit(_cli.main())
