"""Loss-versus-layers results of a grid: table (CSV, Markdown, JSON) and chart (PNG).

Everything is rebuilt from the run directories under OUT_DIR, so `moba-jax report OUT_DIR` gives the
same files as the end of `moba-jax grid`. Layout written by moba_jax.grid:

  OUT_DIR/experiment.json            resolved grid config (labels of the chart)
  OUT_DIR/pretrain/                  stage-1 run dir
  OUT_DIR/sft/<variant>/seed<S>/     stage-2 run dirs; each has grid_run.json (+ summary.json)

Aggregation over seeds: mean of the runs whose status is "done" with finite losses; spread is the
sample standard deviation (ddof=1; 0 for one seed) drawn as +-1 std error bars, and min/max are in the
CSV/JSON too.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from moba_jax.cli import OneLineParser
from moba_jax import report_charts as charts
from moba_jax import rundir
from moba_jax.rundir import atomic_write, read_json

RESULT_FILES = (*rundir.RESULTS, rundir.LOSS_CHART)
RUN_FILE = rundir.RUN_FILE
EXPERIMENT_FILE = rundir.EXPERIMENT
COLUMNS = ("variant", "hybrid_full_layers", "sft_loss", "sft_loss_std", "sft_loss_min",
           "sft_loss_max", "trailing_loss", "trailing_loss_std", "trailing_loss_min",
           "trailing_loss_max", "n_seeds", "n_runs", "tokens_per_s", "wall_s", "status",
           "corpus_fingerprint")


def variant_label(hfl: int | str) -> str:
  """0 -> "moba", "all" -> "full", n -> "hybrid-n"."""
  if hfl == "all":
    return "full"
  return "moba" if int(hfl) == 0 else f"hybrid-{int(hfl)}"


def variant_key(hfl: int | str) -> float:
  """Sort order of the table: MoBA, hybrids by number of full layers, Full."""
  return math.inf if hfl == "all" else float(hfl)


def _finite(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def load_run(run_dir: Path) -> dict:
  """One run: its grid record merged with its summary.json; status "done" needs finite losses."""
  rec = dict(read_json(run_dir / RUN_FILE) or {})
  summary = read_json(run_dir / rundir.SUMMARY) or {}
  rec.setdefault("run_dir", str(run_dir))
  for key in ("eval_loss", "trailing_loss", "tokens_per_s", "wall_s", "step", "final_train_loss",
              "corpus_fingerprint", "position_lm_loss", "mfu"):
    if key in summary:
      rec[key] = summary[key]
  if rec.get("status") != "failed" and summary.get("status"):
    rec["status"] = summary["status"]
  if rec.get("status") == "done" and not _finite(rec.get("eval_loss")):
    rec["status"] = "failed"
    rec.setdefault("error", f"non-finite eval_loss {rec.get('eval_loss')!r}")
  rec.setdefault("status", "missing")
  return rec


def collect_runs(out_dir: str | os.PathLike) -> tuple[dict | None, list[dict]]:
  """(pretrain run or None, SFT runs) found under out_dir."""
  out = Path(out_dir)
  pre = load_run(out / rundir.PRETRAIN) if (out / rundir.PRETRAIN).is_dir() else None
  runs = []
  for rec_path in sorted(out.glob(f"{rundir.SFT}/*/*/{RUN_FILE}")):
    rec = load_run(rec_path.parent)
    if "hybrid_full_layers" in rec:
      runs.append(rec)
  return pre, runs


def stale(runs: list[dict], steps: int | None) -> None:
  """Marks "incomplete" the runs done at fewer steps than the experiment now asks for (a grid
  rerun with a longer grid.sft.train.steps resumes them): their losses are not the table's."""
  for r in runs:
    if steps and r["status"] == "done" and int(r.get("step") or 0) < steps:
      r["status"] = "incomplete"
      r["error"] = f"done at step {r.get('step')} of the {steps} the experiment asks for"


def _stats(values: list[float]) -> dict:
  if not values:
    return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan}
  mean = sum(values) / len(values)
  var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
  return {"mean": mean, "std": math.sqrt(var), "min": min(values), "max": max(values)}


def _row_status(group: list[dict]) -> str:
  done = sum(r["status"] == "done" for r in group)
  if done == len(group):
    return "done"
  notes = [f"seed {r.get('seed')}: {r['status']}" + (f" ({r['error']})" if r.get("error") else "")
           for r in group if r["status"] != "done"]
  return f"{done}/{len(group)} done; " + "; ".join(notes)


def aggregate(runs: list[dict]) -> list[dict]:
  """One row per variant, ordered MoBA, 1, 3, 5, 10, ..., Full."""
  groups: dict[Any, list[dict]] = {}
  for r in runs:
    groups.setdefault(r["hybrid_full_layers"], []).append(r)
  rows = []
  for hfl in sorted(groups, key=variant_key):
    group = sorted(groups[hfl], key=lambda r: r.get("seed", 0))
    ok = [r for r in group if r["status"] == "done"]
    row = {"variant": variant_label(hfl), "hybrid_full_layers": hfl}
    for name, key in (("sft_loss", "eval_loss"), ("trailing_loss", "trailing_loss")):
      per_seed = {r.get("seed"): float(r[key]) for r in ok if _finite(r.get(key))}
      st = _stats(list(per_seed.values()))
      row.update({name: st["mean"], f"{name}_std": st["std"], f"{name}_min": st["min"],
                  f"{name}_max": st["max"], f"{name}_per_seed": per_seed})
    row["n_seeds"], row["n_runs"] = len(ok), len(group)
    row["tokens_per_s"] = _stats([float(r["tokens_per_s"]) for r in ok
                                  if _finite(r.get("tokens_per_s"))])["mean"]
    row["wall_s"] = sum(float(r["wall_s"]) for r in group if _finite(r.get("wall_s")))
    row["seeds"] = [r.get("seed") for r in ok]
    row["status"] = _row_status(group)
    rows.append(row)
  return rows


def _fmt(x: Any, digits: int = 4) -> str:
  if isinstance(x, float):
    return "nan" if math.isnan(x) else f"{x:.{digits}f}"
  return str(x)


def adjacent_gaps(rows: list[dict], key: str = "sft_loss") -> list[dict]:
  """Each variant against the next one (MoBA, hybrid-1, ..., Full), and MoBA against Full.

  gap = mean(a) - mean(b); spread = sqrt(std_a^2 + std_b^2), the std of the difference of one run
  of each; `separated` when |gap| > 2 spread, None where a side has fewer than two seeds (its
  std is unknown, not 0). paired: mean and std over the seeds both have of the per-seed
  differences (the seeds of a grid share their training rows and held-out rows)."""
  pairs = list(zip(rows, rows[1:]))
  if len(rows) > 2 and rows[0]["variant"] == "moba" and rows[-1]["variant"] == "full":
    pairs.append((rows[0], rows[-1]))
  out = []
  for a, b in pairs:
    gap = a[key] - b[key]
    spread = math.sqrt(a[f"{key}_std"] ** 2 + b[f"{key}_std"] ** 2)
    sa, sb = a.get(f"{key}_per_seed", {}), b.get(f"{key}_per_seed", {})
    paired = _stats([sa[s] - sb[s] for s in sa if s in sb])
    known = min(a.get("n_seeds", 0), b.get("n_seeds", 0)) >= 2 and math.isfinite(gap)
    out.append({"from": a["variant"], "to": b["variant"], "gap": gap, "spread": spread,
                "separated": bool(abs(gap) > 2 * spread) if known else None,
                "paired_mean": paired["mean"], "paired_std": paired["std"],
                "paired_n": len([s for s in sa if s in sb])})
  return out


def format_gaps(gaps: list[dict], what: str = "SFT loss") -> str:
  head = (f"| {what}: from | to | gap | spread | gap / spread | > 2 spread | paired gap "
          "(per seed) |\n|---|---|---|---|---|---|---|\n")
  lines = []
  for g in gaps:
    unknown = g["separated"] is None  # a side of one seed: no spread to compare with
    ratio = "-" if unknown or not g["spread"] else f"{g['gap'] / g['spread']:.1f}"
    spread = "-" if unknown else _fmt(g["spread"])
    lines.append(f"| {g['from']} | {g['to']} | {_fmt(g['gap'])} | {spread} | {ratio} | "
                 f"{charts.verdict(g['separated'])} | "
                 f"{_fmt(g['paired_mean'])} ± {_fmt(g['paired_std'])} (n={g['paired_n']}) |")
  return head + "\n".join(lines) + "\n"


def fingerprints(runs: list[dict]) -> list[str]:
  """The distinct corpus fingerprints of the runs (empty for synthetic data)."""
  return sorted({r["corpus_fingerprint"] for r in runs if r.get("corpus_fingerprint")})


def format_markdown(rows: list[dict]) -> str:
  """Markdown table: losses as mean ± std over seeds."""
  head = ("| variant | full layers | SFT loss | trailing loss | seeds | tokens/s | wall s | status |\n"
          "|---|---|---|---|---|---|---|---|\n")
  lines = []
  for r in rows:
    sft = f"{_fmt(r['sft_loss'])} ± {_fmt(r['sft_loss_std'])}"
    trail = f"{_fmt(r['trailing_loss'])} ± {_fmt(r['trailing_loss_std'])}"
    status = str(r["status"]).replace("|", "/").replace("\n", " ")
    lines.append(f"| {r['variant']} | {r['hybrid_full_layers']} | {sft} | {trail} | "
                 f"{r['n_seeds']}/{r['n_runs']} | {_fmt(r['tokens_per_s'], 0)} | "
                 f"{_fmt(r['wall_s'], 1)} | {status} |")
  return head + "\n".join(lines) + "\n"


def format_csv(rows: list[dict]) -> str:
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
  writer.writeheader()
  for r in rows:
    writer.writerow({k: _fmt(r[k], 6) if isinstance(r[k], float) else r[k] for k in COLUMNS})
  return buf.getvalue()


def _json_safe(x: Any) -> Any:
  if isinstance(x, float) and not math.isfinite(x):
    return None  # strict JSON has no NaN
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_json_safe(v) for v in x]
  return x


def _trailing_label(exp: dict) -> str:
  seq, last = exp.get("seq_len"), exp.get("trailing_tokens")
  if seq and last:
    return f"LM trailing loss (seqlen={seq}, last {last})"
  return "LM trailing loss"


def plot(rows: list[dict], path: str | os.PathLike, experiment: dict | None = None,
         prints: list[str] = ()) -> None:
  """Two panels like the paper's Figure 5b/5c: SFT loss and trailing loss vs hybrid full layers."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  exp = experiment or {}
  hybrids = [r for r in rows if r["variant"].startswith("hybrid-")]
  base = {r["variant"]: r for r in rows if r["variant"] in ("full", "moba")}
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
  panels = (("sft_loss", "SFT LM loss", "(b)"), ("trailing_loss", _trailing_label(exp), "(c)"))
  for ax, (key, ylabel, tag) in zip(axes, panels):
    handles = _panel(ax, key, hybrids, base)
    ax.set_xlabel("Number of Hybrid Full Layers")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{tag} {ylabel}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(handles=handles, fontsize=8)
  seeds = max((r["n_seeds"] for r in rows), default=0)
  data = f"; corpus {prints[0][:12]}" if len(prints) == 1 else ""
  fig.suptitle(f"{exp.get('name', 'layer-wise hybrid')}: mean over up to {seeds} seeds, "
               f"bars and bands ±1 std{data}", fontsize=10)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=120)
  plt.close(fig)
  atomic_write(path, buf.getvalue())


def _panel(ax, key: str, hybrids: list[dict], base: dict) -> list:
  handles = []
  xs = list(range(len(hybrids)))
  labels = [f"{r['hybrid_full_layers']} layer" + ("s" if r["hybrid_full_layers"] != 1 else "")
            for r in hybrids]
  ys = [r[key] for r in hybrids]
  errs = [0.0 if math.isnan(r[f"{key}_std"]) else r[f"{key}_std"] for r in hybrids]
  if hybrids:
    handles.append(ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=4, color="tab:blue",
                               label="Layer-wise Hybrid"))
  ax.set_xticks(xs, labels)
  ax.set_xlim(-0.5, max(len(hybrids) - 0.5, 0.5))
  for name, label, color, style in (("full", "Full Attention", "tab:orange", "--"),
                                    ("moba", "MoBA", "tab:green", "-.")):
    r = base.get(name)
    if r is None or math.isnan(r[key]):
      continue
    handles.append(ax.axhline(r[key], color=color, linestyle=style, label=label))
    std = r[f"{key}_std"]
    if std and not math.isnan(std):
      ax.axhspan(r[key] - std, r[key] + std, color=color, alpha=0.12, linewidth=0)
  return handles


def _markdown_doc(rows: list[dict], gaps: dict, prints: list[str]) -> str:
  corpus = ("corpus fingerprint (sha256): " + ", ".join(f"`{p}`" for p in prints)
            + (" **(runs differ in their data: not comparable)**" if len(prints) > 1 else "")
            + "\n\n") if prints else ""
  return (corpus + format_markdown(rows) + "\n" + format_gaps(gaps["sft_loss"]) + "\n"
          + format_gaps(gaps["trailing_loss"], "trailing loss"))


def write_results(out_dir: str | os.PathLike, *, chart: bool = True) -> list[dict]:
  """Rebuild results.{csv,md,json} (and the charts) from the run directories; returns the rows."""
  out = Path(out_dir)
  experiment = read_json(out / EXPERIMENT_FILE) or {}
  pre, runs = collect_runs(out)
  stale(runs, experiment.get("sft_steps"))
  rows = aggregate(runs)
  prints = fingerprints(runs)
  for r in rows:
    r["corpus_fingerprint"] = ",".join(prints)
  gaps = {k: adjacent_gaps(rows, k) for k in ("sft_loss", "trailing_loss")}
  csv_file, md_file, json_file = rundir.RESULTS
  atomic_write(out / csv_file, format_csv(rows))
  atomic_write(out / md_file, _markdown_doc(rows, gaps, prints))
  doc = {"experiment": experiment, "aggregation": "mean and sample std (ddof=1) over seeds",
         "corpus_fingerprint": prints, "gaps": gaps, "pretrain": pre, "rows": rows,
         "runs": runs}
  atomic_write(out / json_file, json.dumps(_json_safe(doc), indent=2) + "\n")
  if chart:
    plot(rows, out / rundir.LOSS_CHART, experiment, prints)
    if any(r.get("position_lm_loss") for r in runs):
      charts.plot_positions(runs, out / rundir.POSITION_CHART, experiment)
  return rows


def sft_loss_label(out_dir) -> str | None:
  """"all" or "masked": the SFT loss of the grid in out_dir (its experiment.json's
  grid.sft.data.loss_on, else data.loss_on; "auto" masks an SFT task), None without a record."""
  config = (read_json(Path(out_dir) / EXPERIMENT_FILE) or {}).get("config")
  if not isinstance(config, dict):
    return None
  stage = ((config.get("grid") or {}).get("sft") or {}).get("data") or {}
  loss_on = stage.get("loss_on", (config.get("data") or {}).get("loss_on", "auto"))
  return "all" if loss_on == "all" else "masked"


def default_labels(out_dir, other) -> tuple[str, str]:
  """The two grids' names in a comparison: their SFT losses where they differ, else their
  directory names."""
  if other is None:
    return ("masked", "all")
  losses = (sft_loss_label(out_dir), sft_loss_label(other))
  if None not in losses and losses[0] != losses[1]:
    return losses
  names = (Path(out_dir).resolve().name, Path(other).resolve().name)
  return names if names[0] != names[1] else ("first", "second")


def main(argv: list[str] | None = None) -> int:
  parser = OneLineParser(prog="moba-jax report", description=__doc__.splitlines()[0])
  parser.add_argument("out_dir", help="the grid's out_dir (holds pretrain/ and sft/)")
  parser.add_argument("--no-chart", action="store_true", help="skip the charts")
  parser.add_argument("--compare", metavar="OTHER_OUT_DIR",
                      help="a second grid (e.g. data.loss_on=all): writes compare.{md,json,png}")
  parser.add_argument("--labels", default=None,
                      help="names of OUT_DIR and OTHER_OUT_DIR in the comparison (default: each "
                           "grid's SFT loss, masked or all, from its experiment.json; the "
                           "directory names where those are the same)")
  args = parser.parse_args(argv)
  labels = tuple(args.labels.split(",")) if args.labels else default_labels(args.out_dir,
                                                                           args.compare)
  for d in (args.out_dir, args.compare):
    if d is not None and not Path(d, rundir.SFT).is_dir():
      what = ("holds no sft/ run directories" if Path(d).is_dir() else
              "is not a directory" if Path(d).exists() else "does not exist")
      print(f"moba-jax report: {d!r} {what} (expected the out_dir of `moba-jax grid`)",
            file=sys.stderr)
      return 2
  if len(labels) != 2:
    print(f"moba-jax report: --labels {args.labels!r} must be two names, e.g. masked,all",
          file=sys.stderr)
    return 2
  mistake = None
  if args.compare is None and args.labels is not None:
    mistake = "--labels names the two grids of --compare OTHER_OUT_DIR, which is not given"
  elif args.compare and Path(args.compare).resolve() == Path(args.out_dir).resolve():
    mistake = f"--compare {args.compare!r} is OUT_DIR itself: give the other grid's out_dir"
  if mistake:
    print(f"moba-jax report: {mistake}", file=sys.stderr)
    return 2
  rows = write_results(args.out_dir, chart=not args.no_chart)
  print(Path(args.out_dir, rundir.RESULTS[1]).read_text(), end="")
  if args.compare:
    other = write_results(args.compare, chart=not args.no_chart)
    charts.write_compare(args.out_dir, rows, other, labels)
    print("\n" + Path(args.out_dir, f"{rundir.COMPARE}.md").read_text(), end="")
  print(f"wrote {', '.join(RESULT_FILES[:3 if args.no_chart else 4])} in {args.out_dir}"
        + (" and compare.{md,json,png}" if args.compare else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main())
