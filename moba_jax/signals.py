"""SIGTERM / SIGINT as a flag: long jobs check it between units of work and stop cleanly."""

from __future__ import annotations

import signal
import threading


class SignalFlag:
  """While active, SIGTERM and SIGINT set `received` (the signal's name) instead of killing the
  process; the previous handlers come back on exit. Off the main thread it records nothing."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: str | None = None
    self._old = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.received = signal.Signals(signum).name

  def __exit__(self, *exc):
    for sig, handler in self._old.items():
      signal.signal(sig, handler)
