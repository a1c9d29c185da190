"""`moba-jax inspect CHECKPOINT_DIR [--step N] [--json]`: what an Orbax checkpoint directory holds.

Lists the steps (flagging incomplete ones: Orbax temporary dirs `N.orbax-checkpoint-tmp-*`, or step
dirs missing their `_CHECKPOINT_METADATA` / item metadata), the run's saved config and metrics, and every
array of one step (path, shape, dtype, size) read from Orbax metadata only: no array data is loaded.
CHECKPOINT_DIR may be a run dir (holding `checkpoints/`) or the checkpoints dir itself.
"""

from __future__ import annotations

import json
import math
import sys
import tomllib
from pathlib import Path
from typing import Any

from moba_jax.cli import OneLineParser
from moba_jax import rundir

TMP_STEP = rundir.PARTIAL_STEP
STEP_METADATA = "_CHECKPOINT_METADATA"
PARAM_ROOTS = ("params", "model")  # arrays under these names count as parameters


def resolve_dirs(path: str | Path) -> tuple[Path, Path | None]:
  """(checkpoints dir, run dir or None) for a run dir or a checkpoints dir."""
  given = str(path)
  p = Path(path).resolve()
  if not p.exists():
    raise FileNotFoundError(f"checkpoint dir {given!r} does not exist")
  if not p.is_dir():
    raise NotADirectoryError(f"checkpoint dir {given!r} is not a directory (give a run dir or "
                             "its checkpoints/ dir)")
  if (p / rundir.CHECKPOINTS).is_dir():
    return p / rundir.CHECKPOINTS, p
  parent = p.parent
  markers = (rundir.CONFIG, "config.json", rundir.METRICS, rundir.SUMMARY)
  return p, parent if any((parent / m).exists() for m in markers) else None


def _step_items(step_dir: Path) -> dict[str, str]:
  """item name -> handler class name (from the step metadata, else guessed from files)."""
  meta = rundir.read_json(step_dir / STEP_METADATA) or {}
  handlers = dict(meta.get("item_handlers") or {})
  for child in sorted(step_dir.iterdir()):
    if child.is_dir() and child.name not in handlers:
      if (child / "_METADATA").exists():
        handlers[child.name] = "PyTreeCheckpointHandler"
      elif (child / "metadata").exists():
        handlers[child.name] = "JsonCheckpointHandler"
      else:
        handlers[child.name] = "unknown"
  names = sorted(handlers, key=lambda k: (k not in PARAM_ROOTS, k))  # params first
  return {k: (handlers[k].rsplit(".", 1)[-1] if isinstance(handlers[k], str) else str(handlers[k]))
          for k in names}


def _natural(path: str) -> list:
  """Sort key: layers.2 before layers.10."""
  return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split(".")]


def _incomplete_reason(step_dir: Path) -> str | None:
  if not (step_dir / STEP_METADATA).exists():
    return f"missing {STEP_METADATA}"
  for name, handler in _step_items(step_dir).items():
    if _is_pytree(handler) and not (step_dir / name / "_METADATA").exists():
      return f"item {name!r} has no _METADATA"
  return None


def list_steps(ckpt_dir: Path) -> list[dict]:
  """Every step found, ordered; complete=False with a reason for partial ones."""
  steps = []
  for child in ckpt_dir.iterdir():
    if not child.is_dir():
      continue
    if child.name.isdigit():
      reason = _incomplete_reason(child)
      steps.append({"step": int(child.name), "dir": child.name, "complete": reason is None,
                    "reason": reason})
    elif m := TMP_STEP.match(child.name):
      steps.append({"step": int(m.group(1)), "dir": child.name, "complete": False,
                    "reason": "Orbax temporary dir (save interrupted or in progress)"})
  return sorted(steps, key=lambda s: (s["step"], s["complete"]))


def _is_pytree(handler: str) -> bool:
  return "PyTree" in handler or "Standard" in handler


def _key_str(k: Any) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _leaf_info(path: str, leaf: Any) -> dict:
  import numpy as np

  shape = tuple(int(d) for d in (getattr(leaf, "shape", None) or ()))
  dtype = getattr(leaf, "dtype", None)
  if dtype is None:
    return {"path": path, "shape": list(shape), "dtype": type(leaf).__name__, "size": 1, "bytes": 0}
  size = math.prod(shape)
  return {"path": path, "shape": list(shape), "dtype": str(np.dtype(dtype)), "size": size,
          "bytes": size * np.dtype(dtype).itemsize}


def pytree_arrays(item_dir: Path, prefix: str) -> list[dict]:
  """Arrays of one PyTree/Standard item from its Orbax metadata (no array data read)."""
  import jax
  import orbax.checkpoint as ocp
  from etils import epath

  meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(item_dir))
  tree = getattr(meta, "tree", meta)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  arrays = [_leaf_info(".".join([prefix, *(_key_str(k) for k in path)]), leaf)
            for path, leaf in leaves]
  return sorted(arrays, key=lambda a: _natural(a["path"]))


def _is_param(path: str) -> bool:
  parts = path.split(".")
  return any(p in PARAM_ROOTS for p in parts[:2]) and "opt_state" not in parts


def step_contents(step_dir: Path) -> dict:
  """Items, arrays and totals of one step."""
  items, arrays, other = _step_items(step_dir), [], {}
  for name, handler in items.items():
    if _is_pytree(handler):
      arrays += pytree_arrays(step_dir / name, name)
    elif "Json" in handler:
      other[name] = rundir.read_json(step_dir / name / "metadata")
    else:
      other[name] = sorted(p.name for p in (step_dir / name).glob("*"))
  params = [a for a in arrays if _is_param(a["path"])]
  return {"items": items, "arrays": arrays, "json_items": other,
          "total_arrays": len(arrays), "total_size": sum(a["size"] for a in arrays),
          "total_bytes": sum(a["bytes"] for a in arrays),
          "param_count": sum(a["size"] for a in params),
          "param_bytes": sum(a["bytes"] for a in params)}


def run_info(run_dir: Path | None) -> dict:
  """The run's saved config, summary and metrics (count, first and last record)."""
  if run_dir is None:
    return {}
  info: dict[str, Any] = {"run_dir": str(run_dir)}
  if (run_dir / "config.json").exists():
    info["config"] = rundir.read_json(run_dir / "config.json")
  elif (run_dir / rundir.CONFIG).exists():
    info["config_toml"] = (run_dir / rundir.CONFIG).read_text(errors="replace")
    try:  # shown as written either way; a file that does not parse is said to be one
      tomllib.loads(info["config_toml"])
    except tomllib.TOMLDecodeError as e:
      info["config_error"] = f"{rundir.CONFIG} does not parse: {e}"
  if (run_dir / rundir.SUMMARY).exists():
    info["summary"] = rundir.read_json(run_dir / rundir.SUMMARY)
  if (run_dir / rundir.METRICS).exists():
    from moba_jax.metrics import read_rows
    records = read_rows(run_dir)
    info["metrics"] = {"records": len(records), "first": records[0] if records else None,
                       "last": records[-1] if records else None}
  return info


def inspect_checkpoints(path: str | Path, step: int | None = None) -> dict:
  """Everything `moba-jax inspect` shows, as one JSON-able dict."""
  ckpt_dir, run_dir = resolve_dirs(path)
  steps = list_steps(ckpt_dir)
  complete = [s["step"] for s in steps if s["complete"]]
  if step is None:
    if not complete:
      raise ValueError(f"no complete checkpoint step in {str(ckpt_dir)!r} "
                       f"(found: {[s['dir'] for s in steps]})")
    step = complete[-1]
  elif step not in complete:
    raise ValueError(f"--step {step} is not a complete step of {str(ckpt_dir)!r}; "
                     f"available: {complete}")
  try:
    contents = step_contents(ckpt_dir / str(step))
  except Exception as e:  # noqa: BLE001 - a metadata file that does not parse: name the step
    why = (str(e).splitlines() or [""])[0][:200]
    others = [s for s in complete if s != step]
    raise ValueError(f"step {step} in {str(ckpt_dir)!r}: its metadata does not read "
                     f"({type(e).__name__}: {why})"
                     + (f"; the other complete steps: {others} (--step N)" if others else ""))
  return {"checkpoint_dir": str(ckpt_dir), "steps": steps, "step": step, **contents,
          "run": run_info(run_dir)}


def _human(n: int) -> str:
  for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
    if n < 1024 or unit == "TiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
    n /= 1024
  return str(n)


def _format_verify(v: dict) -> str:
  if v["ok"]:
    return f"verify: ok ({v['checked']} arrays match their checksums)"
  if v["ok"] is None:
    return f"verify: not checked ({v['error']})"
  what = v["error"] or f"{len(v['mismatched'])} arrays differ: {', '.join(v['mismatched'][:5])}"
  if v.get("unreadable"):  # the arrays that do not read (checkpoint.unreadable_arrays)
    bad = v["unreadable"]
    what = (f"{len(bad)} arrays do not read: {', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}"
            f"; the first error: {what}")
  return f"verify: FAILED ({what})"


def format_text(info: dict) -> str:
  lines = [f"checkpoint dir: {info['checkpoint_dir']}", "steps:"]
  for s in info["steps"]:
    flag = "complete" if s["complete"] else f"INCOMPLETE ({s['reason']})"
    lines.append(f"  {s['step']:>8d}  {flag}" + ("" if s["dir"] == str(s["step"]) else
                                                 f"  [{s['dir']}]"))
  lines.append(f"step {info['step']}: items " +
               ", ".join(f"{k} ({v})" for k, v in info["items"].items()))
  width = max([len(a["path"]) for a in info["arrays"]] + [4])
  lines.append(f"  {'path':<{width}}  {'shape':<18} {'dtype':<9} {'size':>12}")
  for a in info["arrays"]:
    lines.append(f"  {a['path']:<{width}}  {str(tuple(a['shape'])):<18} {a['dtype']:<9} "
                 f"{a['size']:>12d}")
  lines.append(f"arrays: {info['total_arrays']}, elements: {info['total_size']}, "
               f"bytes: {info['total_bytes']} ({_human(info['total_bytes'])})")
  lines.append(f"parameters: {info['param_count']}, bytes: {info['param_bytes']} "
               f"({_human(info['param_bytes'])})")
  for name in info["items"]:
    part = [a for a in info["arrays"] if a["path"].split(".")[0] == name]
    if part:
      nbytes = sum(a["bytes"] for a in part)
      lines.append(f"  {name}: {len(part)} arrays, {sum(a['size'] for a in part)} elements, "
                   f"{nbytes} bytes ({_human(nbytes)})")
  for name, value in info["json_items"].items():
    shown = ({k: v for k, v in value.items() if k not in ("config", "checksums")}
             if isinstance(value, dict) else value)
    lines.append(f"item {name}: {json.dumps(shown)[:400]}")
  lines += _format_run(info["run"])
  if "verify" in info:
    lines.append(_format_verify(info["verify"]))
  return "\n".join(lines)


def _format_run(run: dict) -> list[str]:
  if not run:
    return ["run dir: not found (no config.*, metrics.jsonl or summary.json beside the checkpoints)"]
  lines = [f"run dir: {run['run_dir']}"]
  if "summary" in run:
    lines.append(f"summary: {json.dumps(run['summary'])}")
  if "metrics" in run:
    m = run["metrics"]
    lines.append(f"metrics.jsonl: {m['records']} records; last: {json.dumps(m['last'])}")
  if "config" in run:
    lines.append("config:\n" + json.dumps(run["config"], indent=2))
  elif "config_toml" in run:
    head = f"config ({run['config_error']}; as written)" if "config_error" in run else "config"
    lines.append(f"{head}:\n" + run["config_toml"].rstrip())
  return lines


def main(argv: list[str] | None = None) -> int:
  parser = OneLineParser(prog="moba-jax inspect", description=__doc__.splitlines()[0])
  parser.add_argument("checkpoint_dir", help="a run dir or its checkpoints/ dir")
  parser.add_argument("--step", type=int, default=None, help="step to list (default: latest)")
  parser.add_argument("--json", action="store_true", help="print one JSON object")
  parser.add_argument("--verify", action="store_true",
                      help="read the step's arrays and check them against their saved checksums")
  args = parser.parse_args(argv)
  try:
    info = inspect_checkpoints(args.checkpoint_dir, args.step)
  except (FileNotFoundError, NotADirectoryError, ValueError) as e:
    print(f"moba-jax inspect: {e}", file=sys.stderr)
    return 2
  if args.verify:
    from moba_jax import checkpoint

    info["verify"] = checkpoint.verify(info["checkpoint_dir"], info["step"])
  print(json.dumps(info, indent=2) if args.json else format_text(info))
  return 1 if args.verify and info["verify"]["ok"] is False else 0


if __name__ == "__main__":
  sys.exit(main())
