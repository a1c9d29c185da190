"""`moba-jax report`: table and chart rebuilt from synthetic run directories."""

import csv
import json
import math

import pytest

from moba_jax import report

# (hybrid_full_layers, seed) -> (sft loss, trailing loss); one failed run, one missing summary.
LOSSES = {
    (0, 0): (2.0, 2.5), (0, 1): (2.2, 2.7),
    (1, 0): (1.9, 2.4), (1, 1): (1.7, 2.2),
    (3, 0): (1.5, 2.0), (3, 1): None,
    (10, 0): (1.3, 1.8), (10, 1): (1.3, 1.8),
    ("all", 0): (1.2, 1.6), ("all", 1): (1.0, 1.4),
}


def make_run(out, hfl, seed, losses, status="done"):
  run_dir = out / "sft" / report.variant_label(hfl) / f"seed{seed}"
  run_dir.mkdir(parents=True)
  rec = {"stage": "sft", "variant": report.variant_label(hfl), "hybrid_full_layers": hfl,
         "seed": seed, "status": status}
  if losses is None:
    rec.update(status="failed", error="RuntimeError: boom")
  else:
    summary = {"status": status, "step": 10, "eval_loss": losses[0], "trailing_loss": losses[1],
               "tokens_per_s": 1000.0 + seed, "wall_s": 2.0, "final_train_loss": losses[0]}
    (run_dir / "summary.json").write_text(json.dumps(summary))
  (run_dir / report.RUN_FILE).write_text(json.dumps(rec))
  return run_dir


@pytest.fixture
def grid_dir(tmp_path):
  for (hfl, seed), losses in LOSSES.items():
    make_run(tmp_path, hfl, seed, losses)
  (tmp_path / report.EXPERIMENT_FILE).write_text(
      json.dumps({"name": "synthetic", "seq_len": 512, "trailing_tokens": 64}))
  return tmp_path


def test_rows_ordered_with_mean_and_spread(grid_dir):
  rows = report.write_results(grid_dir)
  assert [r["variant"] for r in rows] == ["moba", "hybrid-1", "hybrid-3", "hybrid-10", "full"]
  moba = rows[0]
  assert moba["sft_loss"] == pytest.approx(2.1)
  assert moba["sft_loss_std"] == pytest.approx(math.sqrt(0.02))  # sample std of 2.0, 2.2
  assert (moba["sft_loss_min"], moba["sft_loss_max"]) == (2.0, 2.2)
  assert moba["trailing_loss"] == pytest.approx(2.6)
  assert moba["n_seeds"] == 2 and moba["status"] == "done"
  assert rows[3]["sft_loss_std"] == 0.0


def test_failed_seed_recorded_and_excluded(grid_dir):
  rows = {r["variant"]: r for r in report.write_results(grid_dir)}
  h3 = rows["hybrid-3"]
  assert h3["n_seeds"] == 1 and h3["n_runs"] == 2
  assert h3["sft_loss"] == pytest.approx(1.5) and h3["sft_loss_std"] == 0.0
  assert "1/2 done" in h3["status"] and "boom" in h3["status"]


def test_result_files_written(grid_dir):
  report.write_results(grid_dir)
  for name in report.RESULT_FILES:
    assert (grid_dir / name).stat().st_size > 0
  assert (grid_dir / "loss_vs_layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with open(grid_dir / "results.csv") as f:
    table = list(csv.DictReader(f))
  assert [r["variant"] for r in table][0] == "moba" and len(table) == 5
  assert set(report.COLUMNS) <= set(table[0])
  doc = json.loads((grid_dir / "results.json").read_text())
  assert len(doc["rows"]) == 5 and len(doc["runs"]) == len(LOSSES)
  md = (grid_dir / "results.md").read_text()
  tables = md.strip().split("\n\n")  # the variants, then the adjacent gaps of both losses
  assert len(tables) == 3 and tables[0].count("\n") == 1 + 5 and "hybrid-10" in tables[0]
  assert tables[1].count("\n") == 1 + 5  # 4 adjacent gaps and MoBA -> Full
  assert not list(grid_dir.glob(".tmp-*"))  # atomic writes leave no temporaries


def test_adjacent_gaps_with_spread_and_paired_seeds(grid_dir):
  rows = report.write_results(grid_dir, chart=False)
  gaps = report.adjacent_gaps(rows)
  assert [(g["from"], g["to"]) for g in gaps] == [
      ("moba", "hybrid-1"), ("hybrid-1", "hybrid-3"), ("hybrid-3", "hybrid-10"),
      ("hybrid-10", "full"), ("moba", "full")]
  first = gaps[0]  # MoBA 2.0 / 2.2 against hybrid-1 1.9 / 1.7
  assert first["gap"] == pytest.approx(0.3)
  assert first["spread"] == pytest.approx(0.2)  # sqrt(0.02 + 0.02)
  assert not first["separated"]  # 0.3 < 2 x 0.2
  assert first["paired_mean"] == pytest.approx(0.3) and first["paired_n"] == 2
  assert first["paired_std"] == pytest.approx(math.sqrt(0.08))  # differences 0.1 and 0.5
  last = gaps[-1]  # MoBA 2.1 against Full 1.1, spread sqrt(0.02 + 0.02)
  assert last["gap"] == pytest.approx(1.0) and last["separated"]
  h3 = gaps[1]  # hybrid-3 has one finished seed: its std is 0, the paired gap has n = 1
  assert h3["paired_n"] == 1
  # ... and no spread is known: neither gap touching it claims a separation (the table says so)
  assert h3["separated"] is None and gaps[2]["separated"] is None
  table = report.format_gaps(gaps)
  assert table.count("n/a (one seed)") == 2 and "inf" not in table


def test_fingerprint_in_every_results_file(tmp_path):
  for seed, fp in ((0, "a" * 64), (1, "a" * 64)):
    run = make_run(tmp_path, 0, seed, (1.0 + seed, 1.0))
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "corpus_fingerprint": fp}))
  report.write_results(tmp_path, chart=False)
  assert "a" * 64 in (tmp_path / "results.md").read_text()
  assert "a" * 64 in (tmp_path / "results.csv").read_text()
  assert json.loads((tmp_path / "results.json").read_text())["corpus_fingerprint"] == ["a" * 64]
  run = make_run(tmp_path, "all", 0, (0.5, 0.5))
  summary = json.loads((run / "summary.json").read_text())
  (run / "summary.json").write_text(json.dumps({**summary, "corpus_fingerprint": "b" * 64}))
  report.write_results(tmp_path, chart=False)
  assert "not comparable" in (tmp_path / "results.md").read_text()


def test_compare_two_grids(grid_dir, tmp_path):
  other = tmp_path / "other"
  for (hfl, seed), losses in LOSSES.items():
    if losses is not None:
      make_run(other, hfl, seed, (losses[0] - 0.1 * (hfl != "all"), losses[1]))
  assert report.main([str(grid_dir), "--compare", str(other), "--labels", "masked,all"]) == 0
  doc = json.loads((grid_dir / "compare.json").read_text())
  gap = doc["gaps"]["sft_loss"]  # MoBA - Full: 1.0 masked, 0.9 in the other grid
  assert gap["masked_gap"] == pytest.approx(1.0) and gap["all_gap"] == pytest.approx(0.9)
  assert gap["difference"] == pytest.approx(0.1) and not gap["separated"]
  assert (grid_dir / "compare.png").read_bytes()[:4] == b"\x89PNG"
  assert report.main([str(grid_dir), "--compare", str(other), "--labels", "one"]) == 2


def test_compare_labels_each_grid_by_its_own_loss_and_flags_other_data(grid_dir, tmp_path):
  """Without --labels each grid is named by the SFT loss its experiment.json records (masked or
  all), in either order; grids of different corpora are flagged not comparable."""
  other = tmp_path / "other_grid"
  for (hfl, seed), losses in LOSSES.items():
    if losses is not None:
      make_run(other, hfl, seed, losses)
  (other / report.EXPERIMENT_FILE).write_text(json.dumps(
      {"config": {"data": {"loss_on": "auto"}, "grid": {"sft": {"data": {"loss_on": "all"}}}}}))
  (grid_dir / report.EXPERIMENT_FILE).write_text(json.dumps({"config": {"data": {}}}))
  assert report.default_labels(grid_dir, other) == ("masked", "all")
  assert report.default_labels(other, grid_dir) == ("all", "masked")
  (other / report.EXPERIMENT_FILE).write_text(json.dumps({"config": {"data": {}}}))
  assert report.default_labels(grid_dir, other) == (grid_dir.name, "other_grid")
  for run in other.glob("sft/*/*"):
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "corpus_fingerprint": "ab" * 32}))
  assert report.main([str(other), "--compare", str(grid_dir)]) == 0
  doc = json.loads((other / "compare.json").read_text())
  assert doc["comparable"] is False and doc["labels"] == ["other_grid", grid_dir.name]
  assert "not comparable" in (other / "compare.md").read_text()


@pytest.mark.parametrize("extra, needle", [
    (["--labels", "a,b"], "--labels names the two grids of --compare OTHER_OUT_DIR"),
    (["--compare", "{grid}"], "is OUT_DIR itself"),
])
def test_compare_mistakes_are_one_line(grid_dir, capsys, extra, needle):
  argv = [str(grid_dir), *(x.format(grid=grid_dir) for x in extra)]
  assert report.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("moba-jax report: ") and needle in err and err.count("\n") == 1


def test_nonfinite_loss_counts_as_failed(tmp_path):
  make_run(tmp_path, 1, 0, (float("nan"), 1.0))
  make_run(tmp_path, 1, 1, (1.5, 1.0))
  (row,) = report.write_results(tmp_path, chart=False)
  assert row["n_seeds"] == 1 and row["sft_loss"] == pytest.approx(1.5)
  doc = json.loads((tmp_path / "results.json").read_text())  # strict JSON: NaN becomes null
  assert doc["runs"][0]["eval_loss"] is None


def test_cli(grid_dir, capsys):
  assert report.main([str(grid_dir)]) == 0
  out = capsys.readouterr().out
  assert "| variant |" in out and "hybrid-3" in out
  assert report.main([str(grid_dir / "nowhere")]) == 2
  assert capsys.readouterr().err == (f"moba-jax report: {str(grid_dir / 'nowhere')!r} does not "
                                     "exist (expected the out_dir of `moba-jax grid`)\n")
  assert report.main([str(grid_dir / "sft")]) == 2  # a directory, not a grid's
  assert "'sft' holds no sft/ run directories" in capsys.readouterr().err.replace(
      str(grid_dir) + "/", "")
