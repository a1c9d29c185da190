"""`moba-jax data {code,jsonl,info}`: build a real-text corpus directory (moba_jax/corpus.py)."""

from __future__ import annotations

import argparse
import json
import sys

from moba_jax.cli import OneLineParser
from moba_jax import corpus


def _parser() -> argparse.ArgumentParser:
  p = OneLineParser(prog="moba-jax data", description=__doc__.splitlines()[0])
  sub = p.add_subparsers(dest="command", required=True)
  code = sub.add_parser("code", help="source files (default: this interpreter's standard library)")
  code.add_argument("out", help="the corpus directory to write")
  code.add_argument("--source", action="append", default=[],
                    help="a directory of source files (repeatable; default: the stdlib)")
  code.add_argument("--ext", action="append", default=[],
                    help="file name ending to include (repeatable; default: .py)")
  jsonl = sub.add_parser("jsonl", help='a JSONL file of {"text"} or {"prompt", "response"} lines')
  jsonl.add_argument("path", help="the JSONL file")
  jsonl.add_argument("out", help="the corpus directory to write")
  for s in (code, jsonl):
    s.add_argument("--heldout", type=float, default=0.05,
                   help="fraction of documents held out, chosen by a hash of each name "
                        "(default 0.05)")
    s.add_argument("--force", action="store_true",
                   help="replace an existing corpus directory (one holding manifest.json; no "
                        "other directory is ever replaced)")
  info = sub.add_parser("info", help="print a corpus directory's manifest")
  info.add_argument("path")
  return p


def _summary(m: dict, out: str) -> str:
  sp = m["splits"]
  skipped = ", ".join(f"{v} {k}" for k, v in m.get("skipped", {}).items()) or "none"
  return (f"{out}: {m['documents']} documents, {m['bytes']:,} bytes (train "
          f"{sp['train']['documents']} / {sp['train']['bytes']:,}; heldout "
          f"{sp['heldout']['documents']} / {sp['heldout']['bytes']:,}); "
          f"{m['duplicates_dropped']} duplicates dropped; skipped: {skipped}\n"
          f"fingerprint {m['fingerprint']}")


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  try:
    if args.command == "info":
      print(json.dumps(corpus.open_dir(args.path, what=repr(args.path)).manifest, indent=2))
      return 0
    if args.command == "code":
      m = corpus.build_code(args.out, args.source, tuple(args.ext or [".py"]), args.heldout,
                            args.force)
    else:
      m = corpus.build_jsonl(args.path, args.out, args.heldout, args.force)
  except (corpus.CorpusError, OSError) as e:
    print(f"moba-jax data: {e}", file=sys.stderr)
    return 2
  print(_summary(m, args.out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
