"""Charts beside the loss-versus-layers table: position-wise loss (the paper's Figure 5a) and the
loss-masking control (the same grid with SFT loss on every token, compared with the masked one).

  moba-jax report OUT_DIR --compare OTHER_OUT_DIR [--labels masked,all]

The comparison writes OUT_DIR/compare.{md,json,png}: each variant's SFT loss under both settings, the
MoBA - Full gap under each with its spread, and whether the difference of the two gaps exceeds
twice its spread (spread of a difference: the root sum of squares of the seed stds involved).
"""

from __future__ import annotations

import io
import json
import math
import os

import numpy as np

from moba_jax import rundir
from moba_jax.rundir import atomic_write

POSITION_VARIANTS = ("moba", "hybrid-5", "full")  # the curves of position_loss.png (if present)


def _figure():
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  return plt


def _save(fig, plt, path) -> None:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=120)
  plt.close(fig)
  atomic_write(path, buf.getvalue())


def position_curves(runs: list[dict]) -> dict:
  """{variant: (bucket centres, mean loss over seeds, std)} of the runs' position_lm_loss."""
  by_variant: dict = {}
  for r in runs:
    if r.get("status") == "done" and r.get("position_lm_loss"):
      by_variant.setdefault(r["variant"], []).append(r["position_lm_loss"])
  out = {}
  for variant, seeds in by_variant.items():
    centres = np.array([(b["start"] + b["end"]) / 2 for b in seeds[0]])
    losses = np.array([[np.nan if b["loss"] is None else b["loss"] for b in s] for s in seeds])
    std = losses.std(axis=0, ddof=1) if len(seeds) > 1 else np.zeros(len(centres))
    out[variant] = (centres, losses.mean(axis=0), std)
  return out


def plot_positions(runs: list[dict], path, experiment: dict | None = None,
                   variants=POSITION_VARIANTS) -> None:
  """Held-out LM loss of every token by position (bucket means), like the paper's Figure 5a."""
  curves = position_curves(runs)
  chosen = [v for v in variants if v in curves] or sorted(curves)
  plt = _figure()
  fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
  for v in chosen:
    x, y, std = curves[v]
    ax.plot(x, y, marker="o", markersize=3, label=v)
    ax.fill_between(x, y - std, y + std, alpha=0.15)
  ax.set_xlabel("Position in the held-out window (bucket centre)")
  ax.set_ylabel("LM loss (nats per byte)")
  ax.set_title(f"{(experiment or {}).get('name', 'grid')}: position-wise LM loss after SFT",
               fontsize=10)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  _save(fig, plt, path)


def _gap(rows: dict, key: str = "sft_loss") -> tuple[float, float]:
  """MoBA - Full and its spread; nan spread where a side has fewer than two seeds (unknown)."""
  a, b = rows.get("moba"), rows.get("full")
  if a is None or b is None:
    return math.nan, math.nan
  if min(a.get("n_seeds", 0), b.get("n_seeds", 0)) < 2:
    return a[key] - b[key], math.nan
  return a[key] - b[key], math.sqrt(a[f"{key}_std"] ** 2 + b[f"{key}_std"] ** 2)


def compare(rows_a: list[dict], rows_b: list[dict], labels: tuple[str, str]) -> dict:
  """The two grids side by side and the MoBA - Full gap of each (SFT and trailing loss)."""
  a, b = ({r["variant"]: r for r in rows} for rows in (rows_a, rows_b))
  prints = [(rows[0].get("corpus_fingerprint") or "") if rows else "" for rows in (rows_a, rows_b)]
  doc = {"labels": list(labels), "corpus_fingerprints": prints,
         "comparable": prints[0] == prints[1], "variants": [], "gaps": {}}
  for v in [r["variant"] for r in rows_a if r["variant"] in b]:
    doc["variants"].append({"variant": v, **{f"{lab}_{k}": side[v][k] for lab, side in
                                              zip(labels, (a, b)) for k in
                                              ("sft_loss", "sft_loss_std", "n_seeds")}})
  for key in ("sft_loss", "trailing_loss"):
    (ga, sa), (gb, sb) = _gap(a, key), _gap(b, key)
    diff, spread = ga - gb, math.sqrt(sa ** 2 + sb ** 2)
    doc["gaps"][key] = {f"{labels[0]}_gap": ga, f"{labels[0]}_spread": sa,
                        f"{labels[1]}_gap": gb, f"{labels[1]}_spread": sb,
                        "difference": diff, "spread": spread,
                        "separated": bool(abs(diff) > 2 * spread)
                        if math.isfinite(diff) and math.isfinite(spread) else None}
  return doc


def verdict(separated: bool | None) -> str:
  """A gap's "> 2 spread" cell: None where a side has one seed (no spread known)."""
  return "n/a (one seed)" if separated is None else "yes" if separated else "no"


def format_compare(doc: dict) -> str:
  la, lb = doc["labels"]
  f = lambda x: "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"
  lines = [] if doc.get("comparable", True) else [
      f"**The two grids' data differ (corpus {doc['corpus_fingerprints'][0][:12] or 'none'} "
      f"against {doc['corpus_fingerprints'][1][:12] or 'none'}): not comparable**", ""]
  lines += [f"| variant | SFT loss ({la}) | SFT loss ({lb}) |", "|---|---|---|"]
  for v in doc["variants"]:
    lines.append(f"| {v['variant']} | {f(v[la + '_sft_loss'])} ± {f(v[la + '_sft_loss_std'])} | "
                 f"{f(v[lb + '_sft_loss'])} ± {f(v[lb + '_sft_loss_std'])} |")
  lines += ["", f"| MoBA - Full gap | {la} | {lb} | difference | spread | > 2 spread |",
            "|---|---|---|---|---|---|"]
  for key, g in doc["gaps"].items():
    lines.append(f"| {key} | {f(g[la + '_gap'])} ± {f(g[la + '_spread'])} | "
                 f"{f(g[lb + '_gap'])} ± {f(g[lb + '_spread'])} | {f(g['difference'])} | "
                 f"{f(g['spread'])} | {verdict(g['separated'])} |")
  return "\n".join(lines) + "\n"


def plot_compare(rows_a: list[dict], rows_b: list[dict], labels, path) -> None:
  """SFT loss against hybrid full layers for both settings (variants on one evenly spaced axis)."""
  plt = _figure()
  fig, ax = plt.subplots(figsize=(6, 4), constrained_layout=True)
  for rows, label, style in ((rows_a, labels[0], "-o"), (rows_b, labels[1], "--s")):
    xs = list(range(len(rows)))
    ax.errorbar(xs, [r["sft_loss"] for r in rows], yerr=[r["sft_loss_std"] for r in rows],
                fmt=style, capsize=3, label=f"training loss on: {label}")
  ax.set_xticks(range(len(rows_a)), [r["variant"] for r in rows_a], fontsize=8)
  ax.set_ylabel("held-out SFT loss (response tokens)")
  ax.set_title("Loss masking control: the same grid, training loss on the response vs all tokens",
               fontsize=9)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  _save(fig, plt, path)


def write_compare(out_dir, rows_a, rows_b, labels) -> dict:
  doc = compare(rows_a, rows_b, labels)
  stem = os.path.join(out_dir, rundir.COMPARE)
  atomic_write(f"{stem}.md", format_compare(doc))
  atomic_write(f"{stem}.json",
               json.dumps(doc, indent=2, default=lambda x: None) + "\n")
  plot_compare(rows_a, rows_b, labels, f"{stem}.png")
  return doc
