"""`moba-jax grid [EXPERIMENT.toml] [key=value ...]`: the layer-wise hybrid experiment grid.

The paper's recipe (Figure 5b/5c), as two stages over one experiment config (docs/grid.md):
  stage 1  one shared pretraining run: the run config with the [grid.pretrain] table, with
           moba.hybrid_full_layers = grid.pretrain_attention (default 0 = MoBA) -> OUT/pretrain
  stage 2  one SFT run per (variant, seed): the run config with the [grid.sft] table, with
           moba.hybrid_full_layers = variant, the seed, and train.init_from = OUT/pretrain
           -> OUT/sft/<variant>/seed<S>
then results.{csv,md,json} and loss_vs_layers.png (moba_jax.report).

Resumable and idempotent: a run whose summary.json says done (at the configured steps) is skipped, an
unfinished one resumes from its checkpoints, a failing one is recorded (status "failed" and its error)
and the others go on. `grid.only` / `--variant` and `grid.only_seeds` / `--seed` select part of the
grid (cluster job arrays); `grid.stage=pretrain|sft` runs one stage.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.resources
import json
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Iterator

from moba_jax.cli import OneLineParser
from moba_jax import report, rundir
from moba_jax.config import (STAGES, Config, ExperimentConfig, experiment_to_dict, layer_kinds,
                             load_experiment_config)
from moba_jax.signals import SignalFlag

DEFAULT_EXPERIMENT = "layerwise_hybrid_cpu.toml"
ALIASES = ("out_dir", "seeds", "variants", "only", "only_seeds", "stage", "init_from", "workers")
EXIT_FAILED, EXIT_STOPPED = 1, 3


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One training run of the grid."""

  stage: str  # "pretrain" | "sft"
  cfg: Config
  variant: int | str | None = None  # hybrid_full_layers of an SFT run
  seed: int | None = None

  @property
  def name(self) -> str:
    if self.stage == "pretrain":
      return f"pretrain (hybrid_full_layers={self.cfg.moba.hybrid_full_layers})"
    return f"sft {report.variant_label(self.variant)} seed {self.seed}"

  @property
  def run_dir(self) -> Path:
    return Path(self.cfg.run_dir)


# ----------------------------------------------------------------------------- configs


@contextlib.contextmanager
def experiment_file(name: str | None) -> Iterator[str]:
  """A path for EXPERIMENT: an existing file, or a name in the packaged moba_jax.experiments."""
  if name and Path(name).is_file():
    yield name
    return
  name = name or DEFAULT_EXPERIMENT
  res = _packaged(name)
  if not res.is_file():
    known = sorted(p.name for p in importlib.resources.files("moba_jax.experiments").iterdir()
                   if p.name.endswith(".toml"))
    raise FileNotFoundError(f"experiment {name!r} is neither a file nor one of {known}")
  with importlib.resources.as_file(res) as path:
    yield str(path)


def _packaged(name: str):
  """The packaged moba_jax.experiments resource of `name` (.toml optional; it may not exist)."""
  return importlib.resources.files("moba_jax.experiments") / (
      name if name.endswith(".toml") else name + ".toml")


def is_packaged(name: str) -> bool:
  """Whether `name` is one of the packaged moba_jax.experiments."""
  return "/" not in name and _packaged(name).is_file()


def normalize_overrides(overrides: list[str]) -> list[str]:
  """Friendly grid keys: `out_dir=D` means `grid.out_dir=D` (likewise the other ALIASES)."""
  out = []
  for item in overrides:
    key = item.partition("=")[0].strip()
    out.append(f"grid.{item.strip()}" if key in ALIASES else item)
  return out


def load_experiment(name: str | None, overrides: list[str]) -> tuple[ExperimentConfig, str]:
  """The experiment, checked against the model and the layers (before any run starts)."""
  with experiment_file(name) as path:
    exp = load_experiment_config(path, normalize_overrides(overrides))
    source = name or f"moba_jax.experiments/{DEFAULT_EXPERIMENT}"
  check_variants(exp)
  from moba_jax import train  # late: jax loads only once the experiment is known to be valid

  for stage in STAGES:
    try:
      train.validate(exp.stage_config(stage))
    except ValueError as e:
      raise ValueError(f"grid.{stage}: {e}") from None
  return resolve_corpus(exp), source


def resolve_corpus(exp: ExperimentConfig) -> ExperimentConfig:
  """data.path = "" with data.task = "corpus" means the default code corpus: build it once (here,
  not in every run) and name it, so each run's config.toml records the directory it read."""
  if not any(c.data.task == "corpus" and not c.data.path for c in map(exp.stage_config, STAGES)):
    return exp
  from moba_jax import corpus

  path = str(corpus.default_code_corpus())
  run = exp.run
  if not run.data.path:
    run = dataclasses.replace(run, data=dataclasses.replace(run.data, path=path))
  tables = {}
  for stage in STAGES:  # a stage's own data.path = "" also means the default corpus
    table = getattr(exp.grid, stage)
    if table.get("data", {}).get("path") == "":
      table = {**table, "data": {**table["data"], "path": path}}
    tables[stage] = table
  return ExperimentConfig(run, dataclasses.replace(exp.grid, **tables))


def corpus_fingerprints(exp: ExperimentConfig) -> dict:
  """{stage: the sha256 fingerprint of its corpus, or None for synthetic data}."""
  from moba_jax import corpus

  out = {}
  for stage in STAGES:
    c = exp.stage_config(stage)
    out[stage] = corpus.load(c.data.path).fingerprint if c.data.task == "corpus" else None
  return out


def check_variants(exp: ExperimentConfig) -> None:
  """Every variant must fit the model depth: errors name the value and the accepted range."""
  g, n_layers = exp.grid, exp.run.model.n_layers
  for v in (*g.variants, g.pretrain_attention):
    try:
      layer_kinds(n_layers, v)
    except ValueError:
      raise ValueError(f"grid variant hybrid_full_layers={v!r} must be in "
                       f"[0, model.n_layers={n_layers}] or 'all'") from None


def seed_settings(cfg: Config, seed: int) -> dict:
  """What one seed changes in an SFT run: the train seed, hence the training rows (moba_jax/data.py);
  the held-out rows and the filler text stay those of data.seed, the same for every seed."""
  return {"train": {"seed": seed}}


def _with(cfg: Config, run_dir: Path, hfl, changes: dict, init_from: str) -> Config:
  train = dataclasses.replace(cfg.train, init_from=init_from, **changes.get("train", {}))
  data = dataclasses.replace(cfg.data, **changes.get("data", {}))
  moba = dataclasses.replace(cfg.moba, hybrid_full_layers=hfl)
  return dataclasses.replace(cfg, run_dir=str(run_dir), train=train, data=data, moba=moba)


def plan(exp: ExperimentConfig) -> tuple[RunSpec | None, list[RunSpec]]:
  """(stage-1 run or None when grid.init_from is given, stage-2 runs) of the full grid."""
  g, out = exp.grid, Path(exp.grid.out_dir)
  pre = None
  init_from = g.init_from
  if not init_from:
    pre_base = exp.stage_config("pretrain")
    pre_cfg = _with(pre_base, out / rundir.PRETRAIN, g.pretrain_attention, {},
                    pre_base.train.init_from)
    pre = RunSpec("pretrain", pre_cfg)
    init_from = str(out / rundir.PRETRAIN)
  sft_base = exp.stage_config("sft")
  runs = []
  for v in g.variants:
    for s in g.seeds:
      run_dir = rundir.sft_run(out, report.variant_label(v), s)
      runs.append(RunSpec("sft", _with(sft_base, run_dir, v, seed_settings(sft_base, s),
                                       init_from), v, s))
  return pre, runs


def select(exp: ExperimentConfig, pre: RunSpec | None, runs: list[RunSpec]) -> list[RunSpec]:
  """The runs this invocation executes (grid.stage, grid.only, grid.only_seeds)."""
  g = exp.grid
  todo = [pre] if pre is not None and g.stage in ("all", "pretrain") else []
  if g.stage in ("all", "sft"):
    todo += [r for r in runs if (not g.only or r.variant in g.only)
             and (not g.only_seeds or r.seed in g.only_seeds)]
  return todo


# ----------------------------------------------------------------------------- running


def enable_jax_cache(exp: ExperimentConfig) -> None:
  """Persistent compilation cache under out_dir (unless JAX_COMPILATION_CACHE_DIR is set): the
  seeds of a variant compile the same programs, so only the first seed pays for compilation."""
  import os

  import jax

  if not exp.grid.jax_cache or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  cache = Path(exp.grid.out_dir, rundir.JAX_CACHE).resolve()
  jax.config.update("jax_compilation_cache_dir", str(cache))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _is_main_process() -> bool:
  import jax

  return jax.process_index() == 0


def _train_run(cfg: Config, progress: bool) -> dict:
  """The training entry point (a seam for tests)."""
  from moba_jax import train

  return train.run(cfg, progress=progress)


def is_done(spec: RunSpec) -> bool:
  """Finished at the configured number of steps (a longer config makes it resume)."""
  step = rundir.finished_step(spec.run_dir)
  return step is not None and step >= spec.cfg.train.steps


def _record(spec: RunSpec, main: bool | None = None, **fields) -> dict:
  """Updates the run's grid_run.json (on the main process; `main` given: no jax is touched)."""
  rec = rundir.read_json(spec.run_dir / rundir.RUN_FILE) or {}
  rec.update(stage=spec.stage, seed=spec.seed, run_dir=str(spec.run_dir))
  if spec.stage == "sft":
    rec.update(variant=report.variant_label(spec.variant), hybrid_full_layers=spec.variant)
  rec.update(fields)
  spec.run_dir.mkdir(parents=True, exist_ok=True)
  if _is_main_process() if main is None else main:
    rundir.atomic_write(spec.run_dir / rundir.RUN_FILE, json.dumps(rec, indent=2) + "\n")
  return rec


def run_one(spec: RunSpec, progress: bool) -> dict:
  """Trains one run unless it is done; never raises for a training error (records it)."""
  if is_done(spec):
    return _record(spec, status="done", error=None)
  _record(spec, status="running", error=None, started=time.time())
  try:
    summary = _train_run(spec.cfg, progress)
  except Exception as e:  # noqa: BLE001 - a failing run must not stop the grid
    if _is_main_process():
      rundir.atomic_write(spec.run_dir / rundir.ERROR_LOG, traceback.format_exc())
    msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    return _record(spec, status="failed", error=msg, finished=time.time())
  status = summary.get("status", "done")
  return _record(spec, status=status, error=None, finished=time.time())


def write_manifest(exp: ExperimentConfig, source: str, main: bool | None = None) -> None:
  out = Path(exp.grid.out_dir)
  out.mkdir(parents=True, exist_ok=True)
  if not (_is_main_process() if main is None else main):
    return
  sft = exp.stage_config("sft")
  manifest = {"name": exp.grid.name or Path(source).stem, "experiment": source,
              "corpus_fingerprint": corpus_fingerprints(exp),
              "n_layers": sft.model.n_layers, "seq_len": sft.train.seq_len,
              "sft_steps": sft.train.steps,
              "block_size": sft.moba.block_size, "topk": sft.moba.topk,
              "trailing_tokens": sft.eval.trailing_tokens, "config": experiment_to_dict(exp)}
  rundir.atomic_write(out / rundir.EXPERIMENT, json.dumps(manifest, indent=2) + "\n")


def run_grid(exp: ExperimentConfig, source: str = "", *, progress: bool = True, worker: bool = False,
             launch: tuple[str, list[str]] | None = None) -> int:
  """Runs the selected part of the grid, then writes the results; returns the exit code.

  worker: one run of a pool (no manifest, no results). launch: (experiment file, overrides) that
  reproduce `exp` in a subprocess; with grid.workers > 1 the runs go to a pool of them."""
  pre, runs = plan(exp)
  todo = select(exp, pre, runs)
  if not worker:
    write_manifest(exp, source, main=True if launch and exp.grid.workers > 1 else None)
  if launch and exp.grid.workers > 1:
    failed, stopped = _run_pool(exp, pre, todo, launch)
    return _results(exp, failed, stopped, main=True)
  failed, stopped = 0, False
  for i, spec in enumerate(todo, 1):
    if spec.stage == "sft" and pre is not None and not is_done(pre):
      _record(spec, status="skipped", error="pretraining is not done")
      failed += 1
      continue
    print(f"[grid {i}/{len(todo)}] {spec.name} -> {spec.run_dir}", flush=True)
    t0 = time.time()
    rec = run_one(spec, progress)
    print(f"[grid {i}/{len(todo)}] {spec.name}: {rec['status']}"
          + (f" ({rec['error']})" if rec.get("error") else "")
          + f" in {time.time() - t0:.1f}s", flush=True)
    failed += rec["status"] == "failed"
    if rec["status"] not in ("done", "failed"):  # preempted / stopped early: stop the grid
      stopped = True
      break
  if worker:
    return EXIT_STOPPED if stopped else EXIT_FAILED if failed else 0
  return _results(exp, failed, stopped)


def _results(exp: ExperimentConfig, failed: int, stopped: bool, main: bool | None = None) -> int:
  code = EXIT_STOPPED if stopped else EXIT_FAILED if failed else 0
  if not (_is_main_process() if main is None else main):
    return code
  with SignalFlag() as sig:  # a signal now waits: the table and charts are written whole
    rows = report.write_results(exp.grid.out_dir)
    print(report.format_markdown(rows), end="")
    print(f"results: {', '.join(str(Path(exp.grid.out_dir, f)) for f in report.RESULT_FILES)}",
          flush=True)
  if sig.received:
    print(f"[grid] received {sig.received} while writing the results; they are complete",
          file=sys.stderr, flush=True)
  return code


def _run_pool(exp: ExperimentConfig, pre: RunSpec | None, todo: list[RunSpec],
              launch: tuple[str, list[str]]) -> tuple[int, bool]:
  """Stage 1 alone, then the SFT runs grid.workers at a time (moba_jax/grid_pool.py), seeds
  outermost so that an interrupted grid has whole seeds. -> (failed runs, stopped)."""
  from moba_jax import grid_pool

  experiment, overrides = launch
  failed = 0
  stages = [[s for s in todo if s.stage == "pretrain"],
            sorted((s for s in todo if s.stage == "sft"), key=lambda s: s.seed)]
  for specs in stages:
    if specs and specs[0].stage == "sft" and pre is not None and not is_done(pre):
      for spec in specs:
        _record(spec, main=True, status="skipped", error="pretraining is not done")
      return failed + len(specs), False
    for spec in specs:  # finished before: its record says so (an older one may say failed)
      if is_done(spec):
        _record(spec, main=True, status="done", error=None)
    specs = [s for s in specs if not is_done(s)]
    jobs = [(s.name, grid_pool.worker_argv(experiment, overrides, s.stage, s.variant, s.seed),
             s.run_dir) for s in specs]
    preempted = 0

    def done(i, code, seconds, specs=specs):
      nonlocal failed, preempted
      spec = specs[i]
      rec = _worker_record(spec, code)
      failed += rec["status"] == "failed"
      preempted += rec["status"] == "preempted"
      print(f"[grid] {spec.name}: {rec['status']}"
            + (f" ({rec['error']})" if rec.get("error") else "") + f" in {seconds:.1f}s",
            flush=True)

    stopped = grid_pool.run_pool(jobs, exp.grid.workers, done)
    if stopped or preempted:
      return failed, True
  return failed, False


_SIGNAL_EXITS = {-signal.SIGTERM, -signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGINT}


def _worker_record(spec: RunSpec, code: int) -> dict:
  """A pool worker's run after the worker exited with `code`. Its summary decides where it says
  the run finished (a signal after that, or a crash in the interpreter's exit, changes nothing);
  else a worker ended by SIGTERM / SIGINT before it wrote its own record was preempted (a rerun
  resumes it), and one that exited otherwise without a record failed."""
  if is_done(spec):
    return _record(spec, main=True, status="done", error=None, finished=time.time())
  rec = report.load_run(spec.run_dir)
  if code != 0 and rec.get("status") in ("running", "missing", "done"):
    signalled = code in _SIGNAL_EXITS
    rec = _record(spec, main=True, status="preempted" if signalled else "failed",
                  finished=time.time(),
                  error=f"worker {'stopped by a signal' if signalled else 'exited'} with code "
                        f"{code} (see {spec.run_dir / rundir.WORKER_LOG})")
  return rec


def _parser() -> argparse.ArgumentParser:
  p = OneLineParser(prog="moba-jax grid", description=__doc__.splitlines()[0],
                              epilog="Overrides: any config key (train.steps=100) and the grid "
                              f"keys {', '.join(ALIASES)} without their grid. prefix.")
  p.add_argument("args", nargs="*", help="[EXPERIMENT.toml or packaged name] [key=value ...]")
  p.add_argument("--variant", action="append", default=[],
                 help="run only this variant (0, 1, 3, ..., all); repeatable; = grid.only")
  p.add_argument("--seed", action="append", type=int, default=[],
                 help="run only this seed; repeatable; = grid.only_seeds")
  p.add_argument("--stage", choices=("all", "pretrain", "sft"), help="= grid.stage")
  p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
  p.add_argument("--no-progress", action="store_true", help="no per-run progress bars")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one run of a pool
  return p


def _flag_overrides(args) -> list[str]:
  extra = []
  if args.variant:
    bad = [v for v in args.variant if v != "all" and not v.isdigit()]
    if bad:
      raise ValueError(f"--variant {bad[0]!r} must be an integer >= 0 or 'all'")
    vals = [v if v == "all" else int(v) for v in args.variant]
    extra.append(f"grid.only={json.dumps(vals)}")
  if args.seed:
    extra.append(f"grid.only_seeds={json.dumps(args.seed)}")
  if args.stage:
    extra.append(f"grid.stage={args.stage}")
  return extra


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_intermixed_args(argv)
  pos = list(args.args)
  name = pos.pop(0) if pos and "=" not in pos[0] else None
  try:
    exp, source = load_experiment(name, pos + _flag_overrides(args))
    corpus_fingerprints(exp)  # a bad data.path fails here, before any run starts
    check_runs(exp, trains_here=not args.dry_run and (exp.grid.workers == 1 or args.worker))
    if not args.dry_run:
      rundir.make_writable_dir(exp.grid.out_dir, "grid.out_dir")
  except (ValueError, OSError) as e:
    print(f"moba-jax grid: {e}", file=sys.stderr)
    return 2
  if args.dry_run:
    pre, runs = plan(exp)
    for i, spec in enumerate(select(exp, pre, runs), 1):
      print(f"{i:3d}. {spec.name}: {spec.run_dir}" + ("  [done]" if is_done(spec) else ""))
    return 0
  progress = not args.no_progress
  if exp.grid.workers > 1 and not args.worker:  # a pool of subprocesses; this one runs nothing
    launch = (experiment_path(name), pos + _flag_overrides(args))
    return run_grid(exp, source, progress=progress, launch=launch)
  from moba_jax import train

  train.maybe_initialize_distributed()  # multi-host pods / SLURM: before any device is touched
  enable_jax_cache(exp)
  return run_grid(exp, source, progress=progress, worker=args.worker)


def check_runs(exp: ExperimentConfig, trains_here: bool) -> None:
  """ValueError naming the stage and key where a selected run could not start, before any run
  does: a run already in grid.out_dir under other settings (a finished one would be reported
  as this config's, an unfinished one continued under two; the settings a run may change,
  train.RESUME_FREE, aside), a stage 1 to be trained further under stage-2 runs that started
  from it (done ones would be skipped, reported as of the longer one), its train.init_from (a
  run of this model shape; the grid's own stage 1 may not exist yet) and, in a process that
  trains (not a pool's parent, which touches no device), each layer's kernel on this platform."""
  from moba_jax import train

  pre, runs = plan(exp)
  todo = select(exp, pre, runs)
  if pre is not None and pre in todo and rundir.has_checkpoints(pre.run_dir):
    done = rundir.finished_step(pre.run_dir)
    started = [r.name for r in runs if rundir.has_checkpoints(r.run_dir)]
    if started and (done is None or done < pre.cfg.train.steps):
      raise ValueError(
          f"{pre.name}: it would train on to train.steps={pre.cfg.train.steps}, past the stage 1 "
          f"that the runs in grid.out_dir={exp.grid.out_dir!r} started from ({started[0]}"
          f"{f' and {len(started) - 1} more' if len(started) > 1 else ''}); they would not be "
          "of the new stage 1: use a new grid.out_dir (grid.init_from= the longer stage 1's run "
          "dir skips training it again)")
  # a grid compares train.init_from too (a stage-2 run is of the stage 1 it started from) and
  # eval.* (a done run is skipped, not evaluated again)
  free = tuple(k for k in train.RESUME_FREE if k != "train.init_from")
  for spec in todo:
    changes = train.config_changes(spec.cfg, free)
    if changes:
      raise ValueError(
          f"{spec.name}: grid.out_dir={exp.grid.out_dir!r} holds this run under other settings "
          f"({'; '.join(changes)}); the grid's runs share one config: use a new grid.out_dir, or "
          f"delete {str(spec.run_dir)!r} to train it again")
    try:
      train.check_init_from(spec.cfg, must_exist=not (pre is not None and spec.stage == "sft"))
      if trains_here:
        train.check_attention_runs_here(spec.cfg)
    except ValueError as e:
      raise ValueError(f"{spec.name}: {e}") from None


def experiment_path(name: str | None) -> str:
  """A path a subprocess can open for EXPERIMENT (packaged experiments are files on disk)."""
  with experiment_file(name) as path:
    return str(Path(path).resolve())


if __name__ == "__main__":
  sys.exit(main())
