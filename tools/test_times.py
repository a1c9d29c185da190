"""Measured seconds per test from pytest logs, for `pytest --shard I/N --shard-times FILE`.

usage: python tools/test_times.py LOG_OR_TGZ ... [--out tools/compiled_test_times.json]

Reads each log's `--durations` section (tools/run_h200.sh's shards print every phase of at least
5 s) and sums setup, call and teardown per test id; a .tgz holds shard logs (each member read).
A test in several logs keeps its time from the last one given. The tests the durations hide
(under 5 s) get `default_s`: over the finished logs with at least MIN_UNLISTED such tests, the
seconds their summary lines count that their listed durations do not, over those tests (a log
of one or two short tests would price the process's start-up as a test's time).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tarfile

_LINE = re.compile(r"^([\d.]+)s (setup|call|teardown)\s+(\S.*?)\s*$")
_SUMMARY = re.compile(r"^=*\s*(.*?) in ([\d.]+)s\b")


MIN_UNLISTED = 5


def read_log(text: str) -> tuple[dict[str, float], tuple[float, int] | None]:
  """(seconds per listed test, (seconds, count) of the unlisted tests or None): one pytest log's
  durations; None for a log cut off at its limit or without a summary."""
  times: dict[str, float] = {}
  in_durations, summary = False, None
  for line in text.splitlines():
    if "slowest durations" in line:
      in_durations = True
      continue
    m = _LINE.match(line) if in_durations else None
    if m:
      times[m[3]] = times.get(m[3], 0.0) + float(m[1])
    s = _SUMMARY.match(line)
    if s and re.search(r"\d+ (passed|failed|skipped)", s[1]):
      summary = (s[1], float(s[2]))
  unlisted = None
  if summary and "KeyboardInterrupt" not in text:  # a shard cut off at its limit: no estimate
    ran = sum(int(n) for n, what in re.findall(r"(\d+) (passed|failed|skipped|error)", summary[0]))
    if ran > len(times):
      unlisted = (max(summary[1] - sum(times.values()), 0.0), ran - len(times))
  return times, unlisted


def texts(path: str):
  if path.endswith((".tgz", ".tar.gz")):
    with tarfile.open(path) as tar:
      for member in tar.getmembers():
        if member.isfile() and member.name.endswith(".txt"):
          yield tar.extractfile(member).read().decode(errors="replace")
  else:
    with open(path, errors="replace") as f:
      yield f.read()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("logs", nargs="+")
  p.add_argument("--out", default=None, help="write the JSON here (default: print it)")
  args = p.parse_args(argv)
  times: dict[str, float] = {}
  unlisted = []
  for path in args.logs:
    for text in texts(path):
      got, rest = read_log(text)
      times.update(got)
      if rest is not None and rest[1] >= MIN_UNLISTED:
        unlisted.append(rest)
  seconds, count = sum(s for s, _ in unlisted), sum(n for _, n in unlisted)
  table = {"default_s": round(seconds / count, 2) if count else 2.0,
           "sources": args.logs, "times": {k: round(v, 2) for k, v in sorted(times.items())}}
  text = json.dumps(table, indent=1) + "\n"
  if args.out:
    with open(args.out, "w") as f:
      f.write(text)
    print(f"{len(times)} tests, default_s {table['default_s']}: {args.out}")
  else:
    sys.stdout.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
