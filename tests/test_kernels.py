"""Kernel-specific tests: chunked routing, kv-head chunking, the benchmark script.

The behavioural suite (golden cases, NumPy oracle, bf16 bounds, properties) runs on both kernels
through the implementation parametrization of tests/test_moba.py (interpreted, or `--compiled`).
"""

import functools
import itertools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moba_jax import flops
from moba_jax import moba as moba_lib
from tests import helpers
from tests.helpers import (KERNEL_PLATFORM, kernel_impls, moba_impls, packed_segments,
                           primitives_outside_kernels, random_qkv, rel_err, run, vjp_all)


def test_chunked_routing_is_the_oracles_choice(monkeypatch):
  from moba_jax.kernels import _routing as rt
  monkeypatch.setattr(rt, "ROUTING_BYTES", 1 << 13)  # many chunks: shared and mixed paths
  q, k, _ = random_qkv(6, 2, 300, 4, 2, 16)
  for seg in (packed_segments(2, [150, 17, 133]), jnp.zeros((2, 300), jnp.int32)):
    for block, topk in ((16, 3), (32, 16), (8, 20)):
      _assert_same_choice(rt, q, k, seg, block, topk)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_gate_scores_are_float32_scores(dtype):
  """Half-precision queries (one bf16 piece for bf16, two for f16) score against three bf16
  pieces of the float32 gate keys: equal to the float64 product up to float32 summation
  (relative 1e-6, where bf16 scores are 1e-2 off). Under jax.jit, as the routing runs: eagerly
  each op compiles alone, and XLA's GPU excess-precision rewrite, which once zeroed the lower
  pieces, never meets a float32 -> bf16 -> float32 chain (run 16, docs/kernel_notes.md)."""
  from moba_jax.kernels import _routing as rt
  q, k, _ = random_qkv(3, 1, 256, 4, 2, 64, dtype)
  q = q * 3.7  # float16 queries with all 11 significant bits in use
  kbar = moba_lib.slot_means(k, 16)  # [1, 16, 2, 64]
  qg = q.reshape(1, 256, 2, 2, 64)
  got = jax.jit(rt._gate_scores)(qg, kbar)
  want = np.einsum("bckgd,bnkd->bckgn", np.asarray(qg, np.float64), np.asarray(kbar, np.float64))
  assert np.max(np.abs(np.asarray(got) - want)) < 1e-6 * np.max(np.abs(want))


def test_bf16_routing_is_the_oracles_choice_at_a_near_tie():
  """One document of 600 bf16 tokens, block 128, top-3: query 559 (kv head 0, query head 1) has
  its 2nd and 3rd past blocks 8e-4 apart (relative), below bf16's rounding of the gate keys. On an
  H200 the routing once chose the other block there (run 16: XLA's excess-precision rewrite made
  the gate bf16-exact), which `--compiled` catches; on the CPU it guards the piece split."""
  from moba_jax.kernels import _routing as rt
  q, k, _ = random_qkv(7, 1, 600, 4, 2, 128, jnp.bfloat16)
  _assert_same_choice(rt, q, k, jnp.zeros((1, 600), jnp.int32), 128, 3)


def _assert_same_choice(rt, q, k, seg, block, topk):
  @jax.jit  # one compile per case (eager dispatch would compile every op)
  def choices(q, k, seg):
    layout = moba_lib.doc_layout(seg, block)
    kbar = moba_lib.block_key_means(k, layout, block_size=block)
    want = moba_lib.select_blocks(q, kbar, layout, block_size=block, topk=topk)
    return want, rt.select_chunked(q, k, layout, block_size=block, topk=topk)

  want, got = choices(q, k, seg)
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))


@pytest.mark.parametrize("pipeline", ["1", "3"])
def test_bench_prints_a_table_on_cpu(capsys, pipeline):
  from moba_jax import bench
  assert bench.main(["--seqs", "128", "--configs", "32:2", "--heads", "2", "--dim", "16",
                     "--impls", "xla,full_xla", "--repeats", "2", "--warmup", "1",
                     "--pipeline", pipeline]) == 0
  out = capsys.readouterr().out
  assert "f+b ms" in out and "full_xla" in out


def test_bench_compiles_every_row_with_its_xla_options(tmp_path, capsys, monkeypatch):
  """--xla-option NAME=VALUE reaches every row's jitted functions as a compile option of their
  own (jax.jit compiler_options, not XLA_FLAGS): a value XLA refuses fails the program that
  carries it and no other; the rows record the options; XLA's refusal stops the command first,
  in one line."""
  from moba_jax import bench
  bad = {"xla_gpu_enable_command_buffer": "BOGUS"}
  q = jnp.ones((1, 64, 2, 16), jnp.bfloat16)
  with pytest.raises(Exception, match="BOGUS"):
    bench.make_fn("xla", 32, 2, bwd=False, xla_options=bad)(q, q, q, None)
  bench.make_fn("xla", 32, 2, bwd=False)(q, q, q, None)  # the same program without them
  assert bench.check_xla_options(bad) and "BOGUS" in bench.check_xla_options(bad)
  assert bench.check_xla_options({"xla_gpu_enable_command_buffer": ""}) is None
  seen = []
  real = bench.make_fn
  monkeypatch.setattr(bench, "make_fn", lambda *a, **kw: seen.append(kw.get("xla_options"))
                      or real(*a, **kw))
  out = tmp_path / "rows.json"
  assert bench.main(["--seqs", "128", "--configs", "32:2", "--heads", "2", "--dim", "16",
                     "--impls", "xla", "--repeats", "1", "--warmup", "1", "--json", str(out),
                     "--xla-option", "xla_gpu_enable_command_buffer="]) == 0
  # the forward and the step timed, then the step again beside its default-compiled twin (and,
  # where those two differ, as on a GPU whose scatter-adds use atomics, both with XLA's
  # deterministic ops)
  opts = [("xla_gpu_enable_command_buffer", "")]
  row = json.loads(out.read_text())[0]
  det = [("xla_gpu_deterministic_ops", True)]
  assert seen == [opts] * 2 + [None] + {"timed program": [],
                                        "deterministic twins": [opts + det, det]}[
                                            row["xla_options_compared"]]
  assert row["xla_options"] == {"xla_gpu_enable_command_buffer": ""}
  assert row["xla_options_max_diff"] == 0.0
  assert "xla_gpu_enable_command_buffer=''" in capsys.readouterr().out
  assert bench.main(["--xla-option", "xla_gpu_enable_command_buffer=BOGUS"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("moba-jax bench: --xla-option refused by XLA") and err.count("\n") == 1


@pytest.mark.parametrize("racy", [False, True], ids=["deterministic", "racy"])
@pytest.mark.parametrize("drifts", [False, True], ids=["same", "drifting"])
def test_bench_reports_an_xla_option_that_changes_the_results(tmp_path, capsys, monkeypatch,
                                                              racy, drifts):
  """The rows' programs under --xla-option are compared with XLA's defaults on both input sets
  (the oracle: the same program, default options); a difference is named on stderr, kept in the
  row, and the command exits 1. A default program that gives other bits on each call (a GPU's
  atomic scatter-adds; here a fake that adds its call count) is no oracle: then both sides are
  compiled again with XLA's deterministic ops and compared (wherever the timed program differs),
  the timed difference kept."""
  from moba_jax import bench
  real, calls = bench.make_fn, itertools.count(1)

  def fake(*a, xla_options=None, **kw):
    fn, options = real(*a, xla_options=xla_options, **kw), dict(xla_options or ())
    if racy and "xla_gpu_deterministic_ops" not in options:
      fn = (lambda f: lambda *x: jax.tree.map(lambda y: y + next(calls) / 64, f(*x)))(fn)
    if drifts and "xla_gpu_enable_command_buffer" in options:  # the option changes the outputs
      fn = (lambda f: lambda *x: jax.tree.map(lambda y: y * 0 + 1, f(*x)))(fn)
    return fn

  monkeypatch.setattr(bench, "make_fn", fake)
  out = tmp_path / "rows.json"
  assert bench.main(["--seqs", "128", "--configs", "32:2", "--heads", "2", "--dim", "16",
                     "--impls", "xla", "--repeats", "1", "--warmup", "1", "--json", str(out),
                     "--xla-option", "xla_gpu_enable_command_buffer="]) == int(drifts)
  row = json.loads(out.read_text())[0]
  assert (row["xla_options_max_diff"] > 0) == drifts
  timed_differs = row.get("xla_options_timed_diff", 0) > 0
  # the twins give the verdict wherever the timed program differs
  assert row["xla_options_compared"] == ("deterministic twins" if timed_differs
                                         else "timed program")
  # on a GPU the xla path's own program need not repeat its bits (atomic scatter-adds in its
  # backward: with neither fake, run 45's H100 gave other bits under the option and the same
  # with XLA's deterministic ops), so only the CPU's timed program is known to agree
  if racy or drifts or jax.default_backend() == "cpu":
    assert timed_differs == (racy or drifts)
  err = capsys.readouterr().err
  assert ("--xla-option changed the results of xla at seq 128" in err) == drifts
  assert ("(both with XLA's deterministic ops)" in err) == drifts


def test_bench_packs_documents_into_the_moba_rows(tmp_path, capsys):
  """--docs N: the MoBA rows take N packed documents (segment ids as an argument of the step,
  lengths drawn once: the same for every implementation and run) and count their attended
  pairs; full attention's row stays one causal document (the floor's per-pair rate)."""
  from moba_jax import bench
  lengths = bench.doc_lengths(256, 5)
  assert len(lengths) == 5 and sum(lengths) == 256 and min(lengths) >= 1
  assert bench.doc_lengths(256, 5) == lengths and bench.doc_lengths(256, 1) == [256]
  out = tmp_path / "rows.json"
  assert bench.main(["--seqs", "256", "--configs", "32:2", "--heads", "2", "--dim", "16",
                     "--impls", "xla,full_xla", "--repeats", "1", "--warmup", "1", "--docs", "5",
                     "--json", str(out)]) == 0
  moba, full = json.loads(out.read_text())
  assert moba["docs"] == 5 and moba["doc_lengths"] == lengths
  assert moba["pairs"] == flops.attended_pairs(lengths, "moba", 32, 2)
  assert moba["pairs"] < flops.attended_pairs([256], "moba", 32, 2)
  assert full["docs"] == 1 and full["pairs"] == flops.attended_pairs([256], "full")
  assert capsys.readouterr().out.count(" 5 ") >= 1


def test_bench_ratios_to_cudnn_and_the_floor():
  """The floor is the MoBA row's attended pairs at cuDNN's measured time per pair."""
  from moba_jax import bench
  full = flops.attended_pairs([1024], "full")
  sparse = flops.attended_pairs([1024], "moba", 128, 2)
  rows = bench.add_ratios([
      dict(impl="cudnn", seq=1024, pairs=full, fwdbwd_ms=2.0, fwdbwd_tflops=100.0, peak_gib=1.0),
      dict(impl="pallas_gpu", seq=1024, pairs=sparse, fwdbwd_ms=1.0, fwdbwd_tflops=40.0,
           peak_gib=1.5),
      dict(impl="xla", seq=2048, pairs=1, fwdbwd_ms=1.0, fwdbwd_tflops=1.0)])  # no cuDNN row
  r = rows[1]
  assert sparse < full and r["floor_ms"] == pytest.approx(2.0 * sparse / full)
  assert r["x_floor"] == pytest.approx(1.0 / r["floor_ms"])
  assert (r["vs_cudnn"], r["eff_vs_cudnn"], r["mem_vs_cudnn"]) == (0.5, 0.4, 1.5)
  assert "floor_ms" not in rows[0] and "floor_ms" not in rows[2]


def test_bench_ratios_take_splash_where_there_is_no_cudnn_row(capsys):
  """On a TPU the full-attention kernel is splash: its row is the ratios' and floor's reference
  where no cuDNN row is (cuDNN's wins where both are), and the table names it."""
  from moba_jax import bench
  full = flops.attended_pairs([1024], "full")
  sparse = flops.attended_pairs([1024], "moba", 128, 2)
  row = lambda impl, seq, ms, pairs: dict(impl=impl, seq=seq, pairs=pairs, fwdbwd_ms=ms,
                                          fwdbwd_tflops=1.0 / ms, block=128, topk=2, docs=1,
                                          fwd_ms=ms, fwd_tflops=1.0, target_fwdbwd_ms=None)
  rows = bench.add_ratios([row("splash", 1024, 4.0, full), row("pallas_tpu", 1024, 1.0, sparse),
                           row("cudnn", 2048, 2.0, full), row("splash", 2048, 8.0, full),
                           row("pallas_gpu", 2048, 1.0, sparse)])
  assert rows[1]["full_ref"] == "splash" and rows[1]["vs_cudnn"] == 0.25
  assert rows[1]["floor_ms"] == pytest.approx(4.0 * sparse / full)
  assert rows[4]["full_ref"] == "cudnn" and rows[4]["vs_cudnn"] == 0.5
  bench.print_table(rows[:2])
  assert "/splash" in capsys.readouterr().out


def test_bench_tiles_reach_the_tpu_kernel():
  """--tiles (--gpu-block-sizes, its older name) gives pallas_tpu rows their BlockSizes: key
  windows of 128 make the forward take a grid step per 128 keys of a 512-key block."""
  from moba_jax import bench
  from moba_jax.kernels import moba_tpu
  assert bench.parse_args(["--gpu-block-sizes", "1,2"]).tiles == "1,2"
  spec = jax.ShapeDtypeStruct((1, 1024, 2, 64), jnp.bfloat16)
  steps = {}
  for tiles in (None, "128,128,128,128,128"):
    fn = bench.make_fn("pallas_tpu", 512, 2, bwd=False, tiles=tiles)
    steps[tiles] = moba_tpu.grid_steps(fn.trace(spec, spec, spec, None).jaxpr)["moba_tpu_fwd"]
  assert steps["128,128,128,128,128"] == 4 * steps[None]


@pytest.mark.parametrize("argv, match", [
    (["--seqs", "abc"], "argument --seqs: 'abc' must be integers"),
    (["--seqs", "0"], "every value must be >= 1"),
    (["--configs", "512"], "'512' must look like BLOCK:TOPK"),
    (["--impls", "flash"], "'flash' is not one of"),
    (["--impls", "xla,full_xla,xla"], "argument --impls: 'xla,full_xla,xla' names 'xla' twice"),
    (["--dtype", "int8"], "invalid choice: 'int8'"),
    (["--docs", "0"], "every value must be >= 1"),
])
def test_bench_arguments_are_one_line_errors(argv, match, capsys):
  from moba_jax import cli
  assert cli.main(["bench", *argv]) == 2
  err = capsys.readouterr().err
  assert match in err and err.startswith("moba-jax bench: ") and err.count("\n") == 1, err


BENCH_SMALL = ["--seqs", "256", "--configs", "64:2", "--heads", "2", "--dim", "16", "--repeats",
               "1"]
FOURTEEN = ",".join(["64"] * 14)


@pytest.mark.parametrize("argv, match", [
    (["--repeats", "0"], "argument --repeats: '0' must be an integer >= 1"),
    (["--repeats", "-1"], "argument --repeats: '-1' must be an integer >= 1"),
    (["--warmup", "-1"], "argument --warmup: '-1' must be an integer >= 0"),
    (["--pipeline", "0"], "argument --pipeline: '0' must be an integer >= 1"),
    (["--heads", "0"], "argument --heads: '0' must be an integer >= 1"),
    (["--kv-heads", "0"], "argument --kv-heads: '0' must be an integer >= 1"),
    (["--heads", "3", "--kv-heads", "2"], "--heads=3 must be divisible by --kv-heads=2"),
    (["--dim", "-16"], "argument --dim: '-16' must be an integer >= 1"),
    (["--batch", "0"], "argument --batch: '0' must be an integer >= 1"),
    (["--docs", "1000"], "--docs=1000 must be at most the shortest sequence length (--seqs), 256"),
    (["--tiles", "bad"], "argument --tiles/--gpu-block-sizes: 'bad' must be integers >= 0"),
    (["--impls", "pallas_gpu", "--tiles", "64,,64"], "'64,,64' must be integers >= 0"),
    (["--impls", "xla", "--tiles", "64,64"],
     "--tiles '64,64' sets the tiles of the pallas_gpu and pallas_tpu rows, and --impls 'xla' "
     "has none"),
    (["--impls", "pallas_gpu", "--tiles", FOURTEEN], "gives more than moba_gpu's 13 tile fields"),
    (["--impls", "pallas_gpu", "--tiles", "128,64,64,64,4,3,4,3"],
     "--tiles '128,64,64,64,4,3,4,3': pallas_gpu: mosaic_block_kv=3 must be one of [0, 64, 128]"),
    (["--impls", "pallas_tpu", "--tiles", "100"],
     "--tiles '100': pallas_tpu: moba_tpu block_q=100"),
    (["--json", "{tmp}/afile/rows.json"],
     "--json '{tmp}/afile/rows.json': '{tmp}/afile' is not a directory"),
    (["--json", "{tmp}/afile/sub/rows.json"], "'{tmp}/afile' is not a directory"),
    (["--json", "{tmp}"], "--json '{tmp}': '{tmp}' is a directory, not a file"),
    (["--breakdown", "--impls", "xla"], "--breakdown times pallas_gpu's stages only, not --impls "
     "'xla'"),
    (["--breakdown", "--impls", "pallas_gpu,cudnn"], "not --impls 'pallas_gpu,cudnn'"),
    (["--breakdown", "--docs", "2"], "--breakdown times one document per row, not --docs 2"),
    (["--breakdown"], "--breakdown times pallas_gpu's compiled kernels and needs a GPU; this "
     "process runs on cpu"),
    (["--decode", "--bandwidth", "-1"], "argument --bandwidth: '-1' must be a finite number >= 1"),
    (["--decode", "--bandwidth", "0"], "argument --bandwidth: '0' must be a finite number"),
    (["--decode", "--max-bytes", "-1"], "argument --max-bytes: '-1' must be a finite number"),
    (["--decode", "--repeats", "0"], "argument --repeats: '0' must be an integer >= 1"),
    (["--decode", "--warmup", "-1"], "argument --warmup: '-1' must be an integer >= 0"),
    (["--decode", "--inner", "0"], "argument --inner: '0' must be an integer >= 1"),
    (["--decode", "--kv-heads", "0"], "argument --kv-heads: '0' must be an integer >= 1"),
    (["--decode", "--heads", "3", "--kv-heads", "2"],
     "--heads=3 must be divisible by --kv-heads=2"),
    (["--decode", "--json", "{tmp}/afile/rows.json"], "'{tmp}/afile' is not a directory"),
])
def test_bench_mistakes_are_refused_before_any_row_runs(argv, match, tmp_path, capsys,
                                                        monkeypatch):
  """A flag's bad value, flags that do not go together, a --json path that cannot take the rows:
  `moba-jax bench: ...` naming the flag and its value in one line, exit 2, before anything is
  compiled or timed (here every way a row or a timing starts fails the test), in both modes."""
  from moba_jax import bench, bench_decode, cli
  (tmp_path / "afile").write_text("")  # a regular file where --json wants a directory
  ran = lambda *a, **kw: pytest.fail("a row ran before the mistake was refused")
  for module, name in ((bench, "bench_one"), (bench, "breakdown"), (bench, "make_fn"),
                       (bench, "time_ms"), (bench_decode, "bench_attention"),
                       (bench_decode, "bench_model"), (bench_decode, "time_ms")):
    monkeypatch.setattr(module, name, ran)
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")  # --breakdown's platform, anywhere
  tmp = lambda text: text.replace("{tmp}", str(tmp_path))
  base = [] if "--decode" in argv else BENCH_SMALL
  assert cli.main(["bench", *base, *map(tmp, argv)]) == 2
  out, err = capsys.readouterr()
  assert err.startswith("moba-jax bench: ") and err.count("\n") == 1, err
  assert tmp(match) in err, err
  assert "device:" not in out  # refused before the run's first line
  assert [p.name for p in tmp_path.rglob("*")] == ["afile"]  # nothing written or made


def test_bench_tiles_help_and_checks_follow_the_block_sizes_fields(capsys):
  """--tiles' help lists each kernel's BlockSizes fields, all of them, from the dataclasses; any
  leading run of them is accepted (the rest at their defaults), one more is refused."""
  import dataclasses
  from moba_jax import bench, cli
  from moba_jax.kernels import moba_gpu, moba_tpu
  with pytest.raises(SystemExit):
    bench.parse_args(["--help"])
  text = " ".join(capsys.readouterr().out.split())
  for impl, cls in (("pallas_gpu", moba_gpu.BlockSizes), ("pallas_tpu", moba_tpu.BlockSizes)):
    names = [f.name for f in dataclasses.fields(cls)]
    assert f"{impl} ({len(names)}): {', '.join(names)}" in text
  assert "mosaic_overlap_block" in text and "needs a GPU" in text
  d = moba_gpu.BlockSizes()
  values = [d.num_warps if v is None else v for v in dataclasses.astuple(d)]
  for n in range(1, len(values) + 1):
    tiles = ",".join(map(str, values[:n]))
    assert bench.parse_args(["--impls", "pallas_gpu,xla", "--tiles", tiles]).tiles == tiles
  with pytest.raises(cli.UsageError, match=f"more than moba_gpu's {len(values)} tile fields"):
    bench.parse_args(["--impls", "pallas_gpu", "--tiles", ",".join(map(str, values + [1]))])
  tpu = moba_tpu.BlockSizes()
  assert bench.parse_args(["--impls", "pallas_tpu", "--tiles", ",".join(
      map(str, dataclasses.astuple(tpu)))]).impls == "pallas_tpu"


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the CPU's choice of rows")
def test_bench_names_an_impl_of_another_platform_and_drops_the_defaults_ones(tmp_path, capsys):
  """On a CPU, --impls naming a GPU kernel is refused before any row (it was a row of raw
  exception text each); the default --impls times the rows that run here, with a note."""
  from moba_jax import bench
  small = ["--seqs", "128", "--configs", "32:2", "--heads", "2", "--dim", "16", "--repeats", "1",
           "--warmup", "0", "--no-bwd"]
  assert bench.main(small + ["--impls", "xla,cudnn"]) == 2
  out, err = capsys.readouterr()
  assert out == "" and err == ("moba-jax bench: --impls 'xla,cudnn': 'cudnn' compiles for gpu and "
                               "this process runs on cpu; name those that run here (e.g. xla, "
                               "full_xla, reference)\n")
  rows = tmp_path / "rows.json"
  assert bench.main(small + ["--json", str(rows)]) == 0
  assert [r["impl"] for r in json.loads(rows.read_text())] == ["xla"]
  err = capsys.readouterr().err
  assert err == ("moba-jax bench: note: on cpu the default --impls times xla (pallas_gpu, cudnn: "
                 "gpu only)\n")


def test_bench_exits_1_when_a_row_fails(tmp_path, capsys, monkeypatch):
  """A row that fails at run time (an OOM, a kernel this platform cannot run) is recorded in its
  row and the others still run; the command then exits 1 and its last stderr line says so."""
  from moba_jax import bench
  real = bench.bench_one

  def flaky(args, impl, *case):
    if impl == "pallas_gpu":
      raise ValueError("Only interpret mode is supported on CPU backend.")
    return real(args, impl, *case)

  monkeypatch.setattr(bench, "bench_one", flaky)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # where pallas_gpu's row is made
  out = tmp_path / "new" / "rows.json"  # a directory made at the end
  assert bench.main(["--seqs", "128", "--configs", "32:2", "--heads", "2", "--dim", "16",
                     "--impls", "pallas_gpu,xla", "--repeats", "1", "--warmup", "0", "--no-bwd",
                     "--json", str(out)]) == 1
  failed, timed = json.loads(out.read_text())
  assert "Only interpret mode" in failed["error"] and timed["fwd_ms"] > 0
  assert capsys.readouterr().err == ("moba-jax bench: 1 of 2 rows failed (their errors are in the "
                                     "rows above)\n")


def test_bench_breakdown_takes_pallas_gpu_and_records_a_failed_row(tmp_path, capsys,
                                                                  monkeypatch):
  """--breakdown without --impls times pallas_gpu (on a GPU: faked here); a row that fails is
  recorded and the others run; exit 1."""
  from moba_jax import bench
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  seen = []

  def fake(args, seq, block, topk):
    seen.append((args.impls, seq))
    if seq == 512:
      raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
    return dict(impl="pallas_gpu/breakdown", seq=seq, block=block, topk=topk)

  monkeypatch.setattr(bench, "breakdown", fake)
  out = tmp_path / "rows.json"
  assert bench.main(["--breakdown", "--seqs", "256,512", "--configs", "64:2", "--json",
                     str(out)]) == 1
  assert seen == [("pallas_gpu", 256), ("pallas_gpu", 512)]
  ok, failed = json.loads(out.read_text())
  assert ok == dict(impl="pallas_gpu/breakdown", seq=256, block=64, topk=2)
  assert failed["seq"] == 512 and "out of memory" in failed["error"]
  assert capsys.readouterr().err == ("moba-jax bench: 1 of 2 rows failed (their errors are in the "
                                     "rows above)\n")


def test_bench_decode_writes_its_rows_atomically_and_exits_1_on_a_failed_row(tmp_path, capsys,
                                                                              monkeypatch):
  """bench --decode writes --json as bench does (rundir.atomic_write: its directory made, no
  temporary file left) and, as bench, exits 1 with one stderr line when a row failed."""
  from moba_jax import bench, bench_decode, rundir
  writes, real_write = [], rundir.atomic_write
  monkeypatch.setattr(rundir, "atomic_write", lambda *a: writes.append(a[0]) or real_write(*a))

  def fake(args, batch, cache):
    if cache == 512:
      raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
    return [dict(kind="attention", impl="full", batch=batch, cache=cache, ms=1.0,
                 tokens_per_s=1e3)]

  monkeypatch.setattr(bench_decode, "bench_attention", fake)
  out = tmp_path / "new" / "decode.json"
  argv = ["--decode", "--caches", "256,512", "--batches", "1", "--json", str(out)]
  assert bench.main(argv) == 1
  assert writes == [str(out)] and [p.name for p in out.parent.iterdir()] == ["decode.json"]
  ok, failed = json.loads(out.read_text())
  assert ok["cache"] == 256 and "out of memory" in failed["error"]
  assert capsys.readouterr().err == ("moba-jax bench: 1 of 2 rows failed (their errors are in the "
                                     "rows above)\n")
  monkeypatch.setattr(bench_decode, "bench_attention", lambda a, b, c: fake(a, b, 256))
  assert bench.main(argv) == 0 and capsys.readouterr().err == ""


def test_bench_rows_that_cannot_be_written_at_the_end_are_one_line(tmp_path, capsys,
                                                                   monkeypatch):
  """The --json destination was fine at the start but the write fails at the end (the disk
  filled): one stderr line, exit 1 (the rows are on stdout already)."""
  import errno
  from moba_jax import bench, bench_decode, rundir

  def full(path, data):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(rundir, "atomic_write", full)
  monkeypatch.setattr(bench_decode, "bench_attention", lambda args, batch, cache: [dict(
      kind="attention", impl="full", batch=batch, cache=cache, ms=1.0, tokens_per_s=1e3)])
  out = tmp_path / "decode.json"
  assert bench.main(["--decode", "--caches", "256", "--batches", "1", "--json", str(out)]) == 1
  assert capsys.readouterr().err == (f"moba-jax bench: --json {str(out)!r}: could not write the "
                                     "rows (No space left on device); they are printed above\n")


def test_compile_time_tool_reports_each_spec_in_its_own_process(capsys):
  """tools/compile_time_gpu.py: one row per --tiles spec, each from its own process; a spec whose
  step cannot compile here (pallas_gpu compiled on a CPU) is a one-line error in its row, not a
  crash of the table."""
  import json

  from tools import compile_time_gpu
  assert compile_time_gpu.main(["--seq", "64", "--block", "16", "--topk", "2", "--heads", "2",
                                "--kv-heads", "1", "--dim", "16", "--repeats", "1",
                                "--parallel", "2", "-", "32,32,32,32,4,2"]) == 0
  out = capsys.readouterr().out
  rows = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
  assert sorted(r["spec"] for r in rows) == ["-", "32,32,32,32,4,2"]
  for r in rows:
    if jax.default_backend() == "gpu":
      assert r["compile_s"] > 0 and r["run_ms"] > 0 and len(r["grad_norms"]) == 3, r
    else:
      assert r["error"].startswith("ValueError") and "interpret" in r["error"], r
  assert "float32 seq 64 block 16 top-2 heads 2/1 head_dim 16, fwd+bwd step" in out


def test_profile_counts_device_stream_kernels_once(tmp_path):
  """tools/profile_gpu.py: kernels on the GPU's "Stream" lines, per step; the derived "XLA Ops"
  line of the same device and the host's events are not counted."""
  import gzip
  import json
  from tools import profile_gpu
  meta = lambda ph_name, pid, tid, name: dict(ph="M", name=ph_name, pid=pid, tid=tid,
                                              args=dict(name=name))
  x = lambda pid, tid, name, dur: dict(ph="X", pid=pid, tid=tid, name=name, dur=dur, ts=0)
  events = [meta("process_name", 1, 0, "/device:GPU:0"), meta("process_name", 2, 0, "/host:CPU"),
            meta("thread_name", 1, 7, "Stream #14(Compute)"), meta("thread_name", 1, 8, "XLA Ops"),
            x(1, 7, "_fwd_kernel", 1500.0), x(1, 7, "_fwd_kernel", 1700.0),
            x(1, 7, "loop_fusion", 100.0), x(1, 8, "_fwd_kernel", 1600.0),
            x(2, 3, "PjitFunction", 9000.0)]
  path = tmp_path / "perfetto_trace.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  times = profile_gpu.kernel_times(str(path), steps=2)
  assert set(times) == {"_fwd_kernel", "loop_fusion"}
  assert times["_fwd_kernel"][:2] == (1.6, 1.0)  # ms per step, launches per step
  assert times["loop_fusion"][:2] == (0.05, 0.5)


def test_profile_budget_sums_the_steps_kernels_by_part():
  """tools/profile_gpu.py's budget line: the Mosaic kernels and the gate by their names, the rest
  as "other" with its two largest named; the parts add up to the device total."""
  from tools import profile_gpu
  times = {"moba_mgpu_fwd_mosaic_gpu_kernel": (0.75, 1.0, ""),
           "moba_mgpu_dq_mosaic_gpu_kernel": (0.5, 2.0, ""),
           "moba_mgpu_dkdv_mosaic_gpu_kernel": (1.25, 1.0, ""), "moba_gate": (0.125, 1.0, ""),
           "input_reduce_fusion": (0.25, 1.0, ""), "sort_10_1": (0.0625, 1.0, ""),
           "loop_convert_fusion": (0.125, 1.0, "")}
  parts = profile_gpu.budget(times)
  assert parts == {"forward": 0.75, "dQ": 0.5, "dK/dV": 1.25, "gate": 0.125, "other": 0.4375}
  line = profile_gpu.budget_line(times)
  assert "other 0.438 (largest: input_reduce_fusion 0.250, loop_convert_fusion 0.125)" in line
  assert line.endswith("total 3.062")


def test_mgpu_trace_summarizes_each_warpgroups_regions(tmp_path, monkeypatch, capsys):
  """tools/mgpu_trace.py over a trace in Mosaic GPU's dump format (ts = (start ns + clock
  cycles) / 1e3; tid = 1 + warpgroup + 3 x block): per role, each region's count a CTA, median
  length in cycles and share of the warpgroup's span, nested regions paired by a stack and
  counted once in the time inside regions; a trace that used its --ranges is counted as cut. And
  `trace_params` and `region`: the kernels record only when MOBA_MGPU_TRACE is set, and only the
  regions it names where it names some."""
  import contextlib
  import json
  from tools import mgpu_trace
  events = []

  def region(tid, name, start, cycles):
    events.extend([dict(name=name, ph="B", ts=(5e6 + start) / 1e3, pid=1, tid=tid),
                   dict(name=name, ph="E", ts=(5e6 + start + cycles) / 1e3, pid=1, tid=tid)])

  for block in range(2):
    for wg in range(3):
      tid, t = 1 + wg + 3 * block, 0
      for _ in range(4):  # tiles; the second block's compute is 2x slower
        if wg < 2:
          region(tid, "rows", t, 100)
          region(tid, "unmasked", t + 100, 1000 * (1 + block))
          region(tid, "finish", t + 100 + 1000 * (1 + block), 200)
          t += 400 + 1000 * (1 + block)  # 100 cycles a tile outside every region
        else:
          region(tid, "next_rows", t, 600)
          region(tid, "publish", t + 100, 50)  # nested in next_rows
          t += 1000
  with open(tmp_path / "moba_mgpu_fwd-1-trace.json", "w") as f:
    json.dump({"traceEvents": events}, f)
  text = mgpu_trace.summarize(str(tmp_path), ranges=10)
  rows = {tuple(line.split()[:2]): line.split()[2:] for line in text.splitlines()[2:]}
  assert rows[("compute0", "unmasked")][:2] == ["4", "1500"]  # a CTA; median of 1000s and 2000s
  # spans 4 x 1400 - 100 = 5500 (block 0) and 4 x 2400 - 100 = 9500 (block 1): shares 4000 / 5500
  # and 8000 / 9500, median 0.78
  assert rows[("compute0", "unmasked")][2] == f"{(4000 / 5500 + 8000 / 9500) / 2:.1%}"
  assert rows[("compute1", "(outside)")][0] == f"{(300 / 5500 + 300 / 9500) / 2:.1%}"
  assert rows[("compute1", "(outside)")][-1] == f"{9500 / 7500:.3f}"  # busiest CTA / mean
  assert rows[("producer2", "publish")][:2] == ["4", "50"]
  assert rows[("producer2", "(outside)")][0] == f"{400 * 3 / 3600:.1%}"  # nested counted once
  # 10 ranges: 4 x 10 - 3 entries, so a trace of 9 or more regions may have been cut (the compute
  # warpgroups' 12), the producer's 8 not
  assert "6 warpgroup traces, 4 cut at --ranges" in text
  from moba_jax.kernels import moba_mgpu
  monkeypatch.delenv(moba_mgpu.TRACE_ENV, raising=False)
  assert moba_mgpu.trace_params() == {}
  assert not isinstance(moba_mgpu.region("rows"), contextlib.nullcontext)  # lowers to nothing
  monkeypatch.setenv(moba_mgpu.TRACE_ENV, f"{tmp_path}:64")
  params = moba_mgpu.trace_params()
  assert params["profile_space"] == 64 and params["profile_dir"] == str(tmp_path)
  assert not isinstance(moba_mgpu.region("rows"), contextlib.nullcontext)  # every region
  # only the named regions: the others record nothing (more tiles fit in RANGES)
  monkeypatch.setenv(moba_mgpu.TRACE_ENV, f"{tmp_path}:300:finish,keys")
  assert moba_mgpu.trace_params()["profile_space"] == 300
  assert isinstance(moba_mgpu.region("rows"), contextlib.nullcontext)
  assert not isinstance(moba_mgpu.region("keys"), contextlib.nullcontext)
  with pytest.raises(AssertionError):
    moba_mgpu.region("epilogue")  # not a region of the kernels
  with pytest.raises(SystemExit) as e:  # the tool names the bad region and the accepted ones
    mgpu_trace.main(["--regions", "finish,epilogue"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert "--regions: epilogue not among the kernels' regions (rows, unmasked" in err, err


def test_profile_splits_each_synced_call_into_host_and_device_time(tmp_path, capsys):
  """tools/profile_gpu.py --host: per annotated call, the host's time before the first kernel,
  the kernels' span and the wait after the last one; host events outside the calls and the
  device's lines are not counted."""
  import gzip
  import json
  from tools import profile_gpu
  meta = lambda ph_name, pid, tid, name: dict(ph="M", name=ph_name, pid=pid, tid=tid,
                                              args=dict(name=name))
  x = lambda pid, tid, name, ts, dur: dict(ph="X", pid=pid, tid=tid, name=name, ts=ts, dur=dur)
  events = [meta("process_name", 1, 0, "/device:GPU:0"), meta("process_name", 2, 0, "/host:CPU"),
            meta("thread_name", 1, 7, "Stream #14(Compute)"), meta("thread_name", 2, 3, "python3"),
            x(2, 3, "setup", 0, 50)]
  for t0 in (100, 1100):  # two calls of 800 us: kernels from +200 to +700
    events += [x(2, 3, profile_gpu.STEP, t0, 800), x(2, 3, "cuGraphLaunch", t0 + 10, 150),
               x(1, 7, "k1", t0 + 200, 300), x(1, 7, "k2", t0 + 550, 150)]
  path = tmp_path / "perfetto_trace.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  profile_gpu.host_events(str(path), top=5)
  out = capsys.readouterr().out
  assert ("wall 0.800 ms, before the first kernel 0.200 ms, first to last kernel 0.500 ms, "
          "after the last kernel 0.100 ms") in out
  assert "   0.150    1.0  cuGraphLaunch (python3)" in out and "setup" not in out


def test_profile_names_the_source_line_of_each_instruction():
  """tools/profile_gpu.py --sources: an XLA instruction's metadata (through the module's
  stack-frame tables) names the line that made it, and its caller's."""
  from tools import profile_gpu

  def inner(x):
    return jnp.sort(x)  # the line the sort instruction should name

  def outer(x):
    return inner(x) * 2
  line = inner.__code__.co_firstlineno + 1
  text = jax.jit(outer).lower(jnp.arange(8.0)).compile().as_text()
  sources = profile_gpu.hlo_sources(text)
  assert all("." not in name for name in sources)  # '.' -> '_', as a GPU's kernels are named
  names = [name for name, s in sources.items() if name.startswith("sort") and ":" in s]
  assert len(names) == 1, sources  # the sort (its comparator's parameters have no line)
  sort = sources[names[0]]
  assert sort.startswith(f"test_kernels.py:{line} ") and sort.endswith("/sort]"), sort
  if "StackFrames" in text:  # the function names and callers come from the stack-frame tables
    first, caller = sort.split(" [")[0].split(" < ")[:2]
    assert first.endswith("instruction.inner") and caller.startswith(f"test_kernels.py:{line + 3} ")
  for kernel in (f"{names[0]}_1", f"{names[0]}_1__2", f"{names[0]}__2"):  # a sort's passes
    assert profile_gpu.source_of(sources, kernel) == sort, kernel
  # a fusion without a line of its own does not borrow one from a fusion named like it
  assert profile_gpu.source_of({"loop_fusion": "a.py:1"}, "loop_fusion_1") == ""


def test_routing_sorts_every_rows_pairs_in_one_sort_with_each_rows_order():
  """`_routing._flat_order`: one flat sort (CUB's radix sort on a GPU) gives each row's stable
  argsort, ties (many pairs per block) in index order; past int32 offsets, the batched sort.
  `_pair_order` takes it on a GPU only."""
  from moba_jax.kernels import _routing as rt
  seq = 64
  key = jax.random.randint(jax.random.key(3), (5, 300), 0, seq // 16 + 1) * 16  # 0..64: ties
  want = np.stack([np.argsort(np.asarray(r), kind="stable") for r in key])
  for order in (rt._flat_order, rt._row_order, rt._pair_order):
    got = jax.jit(order, static_argnums=1)(key, seq)
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=order.__name__)
  np.testing.assert_array_equal(np.asarray(rt._flat_order(key, 2 ** 30)), want)  # batched
  for order, shape in ((rt._flat_order, "1500"), (rt._row_order, "5x300")):  # one sort each
    text = jax.jit(order, static_argnums=1).lower(key, seq).as_text()
    assert text.count("stablehlo.sort") == 1, order.__name__
    assert f"}}) : (tensor<{shape}xi32>, tensor<{shape}xi32>) -> (" in text, order.__name__
  flat = jax.default_backend() == "gpu" and key.size >= rt.FLAT_SORT_MIN_KEYS
  jaxpr = lambda f: str(jax.make_jaxpr(f, static_argnums=1)(key, seq))
  assert jaxpr(rt._pair_order) == jaxpr(rt._flat_order if flat else rt._row_order)


def test_routing_keys_below_by_search_equal_the_scatter_adds_counts():
  """`_routing.keys_below`: the unrolled binary search (off the CPU) and the scatter-add's
  cumulative counts (the CPU's) both give #(keys < p) for every p in [0, seq], with ties (block
  starts), empty positions, the padding key seq, and keys all 0 or all seq; the search lowers
  without a while loop and without a scatter; the default is the search off the CPU only."""
  from moba_jax.kernels import _routing as rt
  seq = 64
  tied = jax.random.randint(jax.random.key(4), (300,), 0, seq // 16 + 1) * 16
  spread = jax.random.randint(jax.random.key(5), (200,), 0, seq + 1)
  for key in (tied, spread, jnp.zeros((7,), jnp.int32), jnp.full((5,), seq, jnp.int32)):
    key = jnp.sort(key.astype(jnp.int32))
    want = np.array([(np.asarray(key) < p).sum() for p in range(seq + 1)], np.int32)
    for search in (True, False):
      got = jax.jit(rt.keys_below, static_argnums=(1, 2))(key, seq, search)
      np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"search={search}")
  text = jax.jit(lambda k: rt.keys_below(k, seq, search=True)).lower(tied).as_text()
  assert "stablehlo.while" not in text and "scatter" not in text
  jaxpr = lambda **kw: str(jax.make_jaxpr(lambda k: rt.keys_below(k, seq, **kw))(tied))
  assert jaxpr() == jaxpr(search=jax.default_backend() != "cpu")
  assert jaxpr(search=True) != jaxpr(search=False)


@pytest.mark.parametrize("docs", [None, [70, 3, 60, 59]])
def test_routing_groups_are_the_sparse_rows_blocks_in_order(docs):
  """The routing's past-block groups (`group_p`, `group_r0`, `group_r1`): the distinct block
  starts of the sparse rows in ascending order, each with the row range its rows fill, padded
  with seq (no group) and empty ranges; rebuilt here from the rows' own `lo` and `rq`."""
  from moba_jax.kernels import _routing as rt
  q, k, _ = random_qkv(9, 2, 192, 4, 2, 16, jnp.bfloat16)
  seg = None if docs is None else packed_segments(2, docs)
  routing, dims = jax.jit(lambda q, k: rt.route(q, k, seg, block_size=16, topk=4, block_q=16))(
      q, k)
  for b in range(routing.rq.shape[0]):
    rq, lo = np.asarray(routing.rq[b]), np.asarray(routing.lo[b])
    sparse = np.arange(len(rq)) >= dims.dense_rows
    starts = np.unique(lo[sparse & (rq >= 0)])
    gp, r0, r1 = (np.asarray(x[b]) for x in (routing.group_p, routing.group_r0, routing.group_r1))
    np.testing.assert_array_equal(gp[:len(starts)], starts)
    assert (gp[len(starts):] == dims.seq).all() and (r0[len(starts):] == r1[len(starts):]).all()
    for p, a, z in zip(starts, r0, r1):
      rows = np.flatnonzero(sparse & (rq >= 0) & (lo == p))
      assert a <= rows.min() and rows.max() < z and (z - a) % dims.block_q == 0


def test_routing_at_scale_equals_the_routing_of_per_row_sorts(monkeypatch):
  """114688 sparse pairs (4K tokens, GQA 4/2, block 128 top-8): the flat sort is past CUB's
  threshold on a GPU (a batch of 1 above 22000 keys; the small cases elsewhere stay under it).
  Every routing array equals the one built from each row's own stable argsort (the batched
  sort, which is the CPU's and TPU's)."""
  from moba_jax.kernels import _routing as rt
  q, k, _ = random_qkv(4, 1, 4096, 4, 2, 64, jnp.bfloat16)

  def routing(order):
    monkeypatch.setattr(rt, "_pair_order", order)
    return jax.jit(lambda q, k: rt.route(q, k, None, block_size=128, topk=8, block_q=128)[0])(
        q, k)
  got, want = routing(rt._flat_order), routing(rt._row_order)
  for name, a, b in zip(want._fields, got, want):
    if a is not None:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


@helpers.runs_here("pallas_gpu")
def test_kv_head_chunking_keeps_results(retraced):
  from moba_jax.kernels import _routing as rt
  retraced.setattr(rt, "PARTIAL_BYTES", 1)  # one kv head per chunk
  q, k, v = random_qkv(8, 1, 96, 4, 2, 16)
  seg = packed_segments(1, [60, 36])
  cot = jax.random.normal(jax.random.key(2), q.shape)
  kw = dict(block_size=16, topk=3)
  want = vjp_all(lambda q, k, v: moba_lib.moba_reference(q, k, v, seg, **kw), q, k, v, cot)
  got = vjp_all(lambda q, k, v: run("pallas_gpu", q, k, v, seg, **kw), q, k, v, cot)
  assert rt.kv_head_chunks(q.shape, 2, 16, 3) == 2
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    assert rel_err(a, b) < 1e-4, name


@helpers.runs_here("pallas_gpu")
def test_dkdv_of_unaligned_groups_matches_the_reference():
  """dK/dV tiles own their block's past-block group only when the group is aligned to the key
  tile; documents starting off the tile grid (and a one-token document) leave groups to their own
  programs, whose outputs are added by scatter. Both paths, GQA, against the reference."""
  q, k, v = random_qkv(5, 2, 194, 4, 2, 16)
  seg = packed_segments(2, [70, 33, 1, 90])
  cot = jax.random.normal(jax.random.key(6), q.shape)
  kw = dict(block_size=16, topk=3)
  want = vjp_all(lambda q, k, v: moba_lib.moba_reference(q, k, v, seg, **kw), q, k, v, cot)
  got = vjp_all(lambda q, k, v: run("pallas_gpu", q, k, v, seg, tiles=(16, 16, 16, 16), **kw),
                q, k, v, cot)
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    assert rel_err(a, b) < 1e-5, name


@pytest.mark.parametrize("routing_on", ["cpu", "gpu"])
def test_gpu_kernels_lower_for_cuda_without_a_gpu(routing_on):
  """Cross-platform lowering runs the Pallas-to-Triton lowering of every Triton GPU kernel
  (forward, dQ, dK/dV of key tiles with and without unaligned-group contributions, dK/dV of
  unaligned groups) on a CPU-only machine. The tiles pin the Triton kernels: on a Hopper GPU the
  default is the Mosaic ones (their lowering: tests/test_mosaic.py). The routing, traced where
  the process's backend is a GPU, takes the gate kernel, one Triton call more (run 42: the
  compiled suite on an H100 counted it; `_routing._gate_kernel` chooses by the platform traced
  for, `_routing.tracing_for`)."""
  from moba_jax.attention import KernelOptions
  from moba_jax.kernels import _routing as rt
  from moba_jax.kernels import moba_gpu as mg
  seq = 256
  seg = jnp.zeros((1, seq), jnp.int32)
  q = jnp.zeros((1, seq, 4, 64), jnp.bfloat16)
  k = jnp.zeros((1, seq, 2, 64), jnp.bfloat16)
  attn = lambda q, k, v: mg.moba_attention_gpu(q, k, v, seg, block_size=64, topk=3,
                                               options=KernelOptions(tiles=(64,)))
  step = lambda q, k, v: jax.vjp(attn, q, k, v)[1](q)
  # The GPU to lower for (jax >= 0.11's Triton lowering asks for one when none is present).
  hopper = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                       platform="gpu")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",),
                                                                abstract_device=hopper)):
    with rt.tracing_for(routing_on):
      text = jax.jit(step).trace(q, k, k).lower(lowering_platforms=("cuda",)).as_text()
  calls = [line for line in text.splitlines() if "__gpu$xla.gpu.triton" in line]
  names = sorted(re.search(r'name = "(\w+)"', line)[1] for line in calls)
  gate = ["moba_gate"] if routing_on == "gpu" else []
  assert names == gate + ["moba_gpu_dkdv"] * 3 + ["moba_gpu_dq", "moba_gpu_fwd"], names


@pytest.mark.parametrize("dtype,tiles", [(jnp.bfloat16, None), (jnp.float16, None),
                                         (jnp.bfloat16, (256, 128, 8, 3))])
def test_gate_kernel_lowers_for_cuda_without_a_gpu(dtype, tiles):
  """The gate kernel's Pallas-to-Triton lowering (its ops: bitcasts, integer reductions, the
  chunk loop over a tile's precomputed range, the rank merge) on a CPU-only machine: one Triton
  call, 130 table slots (three chunks), top-8, GQA; at the default tiles and the sweep's
  largest (tools/gate_sweep.py)."""
  from moba_jax.kernels import moba_gate
  q = jnp.zeros((1, 8320, 4, 64), dtype)
  pieces = jnp.zeros((3, 1, 130, 2, 64), jnp.bfloat16)
  col = jax.ShapeDtypeStruct((1, 8320), jnp.int32)
  fn = functools.partial(moba_gate.gate_topk, n_sel=8,
                         tiles=moba_gate.GateTiles(*tiles) if tiles else moba_gate.GateTiles())
  hopper = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132,
                                       platform="gpu")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",),
                                                                abstract_device=hopper)):
    text = jax.jit(fn).trace(q, pieces, col, col).lower(
        lowering_platforms=("cuda",)).as_text()
  assert text.count("__gpu$xla.gpu.triton") == 1


def test_jax_triton_module_imports_and_checks_padding_without_a_gpu():
  """kernels/moba_triton.py (the jax-triton side-by-side) must import where Triton is missing;
  its k/v padding and the check that guards the kernel's unmasked key loads work anywhere."""
  from moba_jax.kernels import _routing as rt
  from moba_jax.kernels import moba_triton as mt
  if jax.default_backend() != "gpu":
    assert not mt.available()
  dims = rt.make_dims(100, 2, 16, 3, 16)
  k = jnp.ones((2, 100 + 16, 32))
  padded = mt.pad_kv(k, 100)
  assert padded.shape == (2, 100 + max(mt.KEY_TILES), 32)
  assert float(padded[:, 116:].sum()) == 0.0
  with pytest.raises(ValueError, match="pad them with pad_kv"):  # before jax-triton is needed
    mt.forward_rows(None, dims, jnp.ones((2, 200, 32)), k, k, 0.1)


@pytest.mark.parametrize("seq, block, topk, groups", [(300, 128, 3, 2), (1000, 64, 5, 1),
                                                     (64, 16, 8, 4), (130, 128, 3, 1)])
def test_one_document_rows_are_sized_to_the_past_blocks_there_are(seq, block, topk, groups):
  """Without segment ids a query of block i chooses min(S - 1, i) past blocks: the routing's
  valid sparse rows are exactly that many (none dropped by a too small sparse section), and the
  section holds them with room for each group's padding."""
  q, k, _ = random_qkv(4, 2, seq, 2 * groups, 2, 32)
  kw = dict(block_size=block, topk=topk, block_q=16)
  routing, dims = helpers.route(q, k, None, **kw)
  n_sel = min(topk, -(-seq // block))
  want = groups * sum(min(n_sel - 1, t // block) for t in range(seq))
  assert dims.one_doc and dims.n_sel == n_sel
  got = np.asarray((routing.pos[:, :, 1:] >= 0).sum(axis=(1, 2)))
  np.testing.assert_array_equal(got, want)  # per (batch, kv head)
  assert dims.sparse_rows >= want + dims.max_groups * 15 if n_sel > 1 else dims.sparse_rows == 0
  seg = jnp.zeros((2, seq), jnp.int32)  # zeros are data: sized for S - 1 past blocks a query
  assert helpers.route(q, k, seg, run=False, **kw)[1].sparse_rows >= dims.sparse_rows


def _random_case(rng):
  groups, kv_heads = int(rng.choice([1, 2, 4])), int(rng.choice([1, 2]))
  seq = int(rng.integers(40, 300))
  cuts = np.sort(rng.choice(np.arange(1, seq), int(rng.integers(0, 3)), replace=False))
  seg = np.zeros(seq, np.int32)
  for c in cuts:
    seg[c:] += 1
  return dict(groups=groups, kv_heads=kv_heads, seq=seq, seg=jnp.asarray(np.stack([seg, seg])),
              block=int(rng.choice([16, 24, 48, 64])), topk=int(rng.integers(1, 8)),
              dim=int(rng.choice([16, 24])))


def _random_cases(impl, n=4):
  """The seeded cases of `test_random_layouts_match_the_reference` (pallas_gpu also draws its
  tiles), in their drawing order."""
  rng = np.random.default_rng(2026 if impl == "pallas_gpu" else 11)
  out = []
  for _ in range(n):
    c = _random_case(rng)
    out.append((c, tuple(int(x) for x in rng.choice([16, 32], 4)) if impl == "pallas_gpu" else ()))
  return out


@pytest.mark.parametrize("i", [0, 1, pytest.param(2, marks=pytest.mark.slow),
                               pytest.param(3, marks=pytest.mark.slow)])
@pytest.mark.parametrize("impl", kernel_impls())
def test_random_layouts_match_the_reference(impl, i):
  """Seeded random cases against the reference, forward and gradients: documents anywhere (so
  dK/dV groups both aligned and not), blocks that are not multiples of the tiles, GQA, ragged
  sequence ends, head_dim that needs padding; pallas_gpu also with random tiles. Cases 2 and 3
  are slow-marked (the interpreted kernels take ~30 s a case on 2 cores): the first two, the
  golden cases and the random packed GQA cases of test_moba.py cover the same layouts."""
  c, tiles = _random_cases(impl)[i]
  q, k, v = random_qkv(100 + i, 2, c["seq"], c["groups"] * c["kv_heads"], c["kv_heads"], c["dim"])
  cot = jax.random.normal(jax.random.key(i), q.shape)
  kw = dict(block_size=c["block"], topk=c["topk"])
  want = vjp_all(lambda q, k, v: moba_lib.moba_reference(q, k, v, c["seg"], **kw), q, k, v, cot)
  fn = lambda q, k, v: run(impl, q, k, v, c["seg"], tiles=tiles, **kw)
  got = vjp_all(fn, q, k, v, cot)
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    assert rel_err(a, b) < 1e-5, (name, i, c)


@pytest.mark.parametrize("seg, tiles", [(None, (512, 128, 128, 256, 128)),
                                        ([300, 212, 500], (128, 128, 128, 128, 384))])
@helpers.runs_here("pallas_tpu")
def test_tpu_key_windows_smaller_than_a_block_match_the_reference(seg, tiles):
  """pallas_tpu's forward and dQ walk a window of a tile's keys a grid step, and the dK/dV a
  window of a block's (`moba_tpu.kv_window`, `dkdv_window`): windows of less than the block
  (several a tile, a window's chunks up to the tile's or block's last key), one document and
  packed documents whose tiles cross block starts, GQA 2:1; row tiles of 512 in the first case
  (a dense dK/dV window of 128 keys starts at row 256 c: in a row tile that starts before its
  first query where c is odd), against the reference."""
  seg = None if seg is None else packed_segments(1, seg)
  q, k, v = random_qkv(7, 1, 1012, 4, 2, 64)
  cot = jax.random.normal(jax.random.key(1), q.shape)
  kw = dict(block_size=512, topk=2)
  want = vjp_all(lambda q, k, v: moba_lib.moba_reference(q, k, v, seg, **kw), q, k, v, cot)
  got = vjp_all(lambda q, k, v: run("pallas_tpu", q, k, v, seg, tiles=tiles, **kw), q, k, v, cot)
  for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
    assert rel_err(a, b) < 1e-5, name


def _scatter_add_in_key_order(outs, first_key, routing, dims, seq):
  """The oracle of `moba_tpu.in_key_order`: each pass's rows added onto their keys (rows past
  the keys dropped): the dense rows' keys from first_key on, the sparse rows' from each group's
  block start on, as `_dkdv_dense` and `_dkdv_sparse` lay them out."""
  add = jax.vmap(lambda x, p: jax.ops.segment_sum(x, p, num_segments=seq))
  out = add(outs[0], first_key + jnp.arange(outs[0].shape[1]))
  if len(outs) > 1:
    gp = jnp.concatenate([routing.group_p, jnp.full((first_key.shape[0], 1), seq, jnp.int32)], 1)
    span = outs[1].shape[1] // gp.shape[1]
    out = out + add(outs[1], (gp[:, :, None] + jnp.arange(span)).reshape(gp.shape[0], -1))
  return out


@pytest.mark.parametrize("seg, block, tiles, q_start", [
    (None, 128, (), None),
    ([300, 7, 212, 493], 96, (128, 128, 64), None),  # a group's rows run 32 keys past its block
    ([40, 50], 8, (16, 16, 8), 21),  # queries [21, 33) of the keys: a band of dense key tiles
])
def test_tpu_dkdv_gathers_equal_the_scatter_add(retraced, seg, block, tiles, q_start):
  """pallas_tpu assembles dK and dV in key order by gathers (`moba_tpu.in_key_order`; TPUs are
  reported to run scatter-adds far slower): the gradients equal, to the bit, those of a
  scatter-add of the same rows onto their keys. One document; packed documents with block 96
  and dK/dV windows of 128 keys (each group's last 32 rows lie over the next keys, which its
  rows do not see); and a query offset (the dense pass over a band of key tiles)."""
  from moba_jax.attention import KernelOptions
  from moba_jax.kernels import moba_tpu
  n = 90 if q_start is not None else 1012
  seg = None if seg is None else packed_segments(1, seg)
  q, k, v = random_qkv(11, 1, n, 4, 2, 64)
  if q_start is not None:
    q = q[:, q_start:q_start + 12]
  cot = jax.random.normal(jax.random.key(3), q.shape)
  opts = KernelOptions(interpret=True, tiles=tiles)

  def grads():
    jax.clear_caches()  # the kernel entry is jitted: trace it again with the assembly set
    f = lambda q, k, v: moba_tpu.moba_attention_tpu(q, k, v, seg, block_size=block, topk=3,
                                                    options=opts, q_start=q_start)
    return jax.vjp(f, q, k, v)[1](cot)

  got = grads()
  retraced.setattr(moba_tpu, "in_key_order", _scatter_add_in_key_order)
  want = grads()
  for name, a, b in zip(("dq", "dk", "dv"), got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("impl", moba_impls())
def test_no_segment_ids_is_one_document_without_a_branch(impl, dtype):
  """segment_ids=None is one document per row, known when tracing: the outputs and gradients of
  explicit zeros, and for the kernels no `lax.cond` in the fwd+bwd program (zeros are data:
  XLA's gate branches on them; a GPU cond reads its predicate back to the host, and XLA keeps
  the untaken branch's buffers; on a Hopper GPU the gate kernel and the Mosaic dK/dV take any
  documents without a branch). The kernels' results are equal to the bit (the same
  routing, the same kernels); reference and xla turn None into zeros that XLA sees as a constant
  and may compile differently (on the H200 the xla path differed by 1-ulp roundings), so they are
  held to the suite's bounds against the oracle. T = 300: a ragged last block, and a length off
  the 8-key grid for the Mosaic kernels (compiled on a Hopper GPU)."""
  q, k, v = random_qkv(2, 2, 300, 4, 2, 64, dtype)
  zeros = jnp.zeros((2, 300), jnp.int32)
  kw = dict(block_size=128, topk=3)
  cot = jax.random.normal(jax.random.key(8), q.shape, dtype)
  fn = lambda seg: lambda q, k, v: run(impl, q, k, v, seg, **kw)
  for a, b in zip(vjp_all(fn(None), q, k, v, cot), vjp_all(fn(zeros), q, k, v, cot)):
    if impl in KERNEL_PLATFORM:
      np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    else:
      assert rel_err(a, b) < (1e-5 if dtype == jnp.float32 else 1e-2)
  if impl in KERNEL_PLATFORM:
    from moba_jax.kernels import _routing as rt
    from moba_jax.kernels import moba_mgpu
    step = lambda seg: jax.make_jaxpr(lambda q, k, v: jax.vjp(fn(seg), q, k, v)[1](cot))(q, k, v)
    assert "cond" not in primitives_outside_kernels(step(None).jaxpr)
    with_zeros = "cond" in primitives_outside_kernels(step(zeros).jaxpr)
    if rt._gate_kernel(dtype, 64, 3, 2) is None:  # XLA's gate branches on the ids (the CPU's)
      assert with_zeros
    elif impl == "pallas_gpu" and moba_mgpu.is_default_here():  # the gate kernel and the Mosaic
      assert not with_zeros  # dK/dV take any documents: no branch on the ids


def _gate(platform):
  """The gate kernel of `platform` ("gpu": Triton, "tpu": Mosaic TPU), interpreted on the CPU,
  compiled under `--compiled` on its own platform (skipped on others)."""
  from moba_jax.kernels import moba_gate
  from tests import helpers
  if helpers.COMPILED and jax.default_backend() != platform:
    pytest.skip(f"the {platform} gate kernel compiles on a {platform} only")
  fn = moba_gate.gate_topk if platform == "gpu" else moba_gate.gate_topk_tpu
  return functools.partial(fn, interpret=not helpers.COMPILED)


def _gate_case(case):
  """(q, k, segment ids or None, block, topk) of one gate case: integer-valued keys give exact
  score ties."""
  kq, kk = jax.random.split(jax.random.key(len(case)))
  if case == "ties":  # small integer scores: exact ties, also between chunks (80 slots), lower
    q = jax.random.randint(kq, (2, 320, 4, 64), -1, 2).astype(jnp.bfloat16)  # block first
    k = (jax.random.randint(kk, (2, 320, 2, 64), -1, 2) * 4).astype(jnp.bfloat16)
    return q, k, None, 4, 6
  if case == "zeros":  # every score is 0.0: all ties
    q = jnp.zeros((1, 256, 2, 32), jnp.bfloat16)
    return q, jax.random.normal(kk, (1, 256, 2, 32), jnp.bfloat16), None, 16, 3
  if case == "nan":  # a NaN key: its block ranks above every number (`moba.nan_ranks_high`)
    q, k, _ = random_qkv(11, 1, 300, 4, 2, 64, jnp.bfloat16)
    return q, k.at[0, 40, 1, 3].set(jnp.nan), None, 32, 3
  if case == "many_slots":  # 125 block slots: two chunks of 64, top-17 (16 argmax passes)
    q, k, _ = random_qkv(12, 2, 1000, 4, 4, 16, jnp.bfloat16)
    return q, k, None, 8, 17
  if case == "f16":  # two bf16 pieces of each float16 query
    q, k, _ = random_qkv(13, 2, 256, 4, 1, 32, jnp.float16)
    return q * 3.7, k, None, 8, 8
  if case == "top1":  # the current block only: no past block passes
    q, k, _ = random_qkv(14, 1, 130, 2, 2, 16, jnp.bfloat16)
    return q, k, None, 16, 1
  if case == "tpu_chunks":  # ties again, 264 slots: three chunks of the TPU kernel's 128
    q = jax.random.randint(kq, (1, 1056, 2, 16), -1, 2).astype(jnp.bfloat16)
    k = (jax.random.randint(kk, (1, 1056, 1, 16), -1, 2) * 4).astype(jnp.bfloat16)
    return q, k, None, 4, 6
  if case == "packed":  # documents with ragged last blocks, one shorter than a block, one of
    q, k, _ = random_qkv(18, 2, 530, 4, 2, 32, jnp.bfloat16)  # one token; tiles across them
    return q, k, packed_segments(2, [100, 7, 1, 250, 3, 169]).at[1].set(0), 16, 4
  if case == "packed_ties":  # ties across documents and chunks: 3 documents over 150 full
    q = jax.random.randint(kq, (1, 1210, 2, 16), -1, 2).astype(jnp.bfloat16)  # blocks, a
    k = (jax.random.randint(kk, (1, 1210, 1, 16), -1, 2) * 4).astype(jnp.bfloat16)  # tile's
    return q, k, packed_segments(1, [517, 13, 680]), 8, 6  # chunk range spans two of them
  q, k, _ = random_qkv(15, 1, 200, 2, 2, 64, jnp.bfloat16)  # "wide": topk past the blocks (4)
  return q, k, None, 64, 6


def _kernel_choice(kernel, q, k, seg, block, topk):
  """(starts, valid) of the gate kernel `kernel` for segment ids `seg` (None: one document per
  row), as `_routing.select_chunked` calls it."""
  from moba_jax.kernels import _routing as rt
  layout = moba_lib.doc_layout(moba_lib.segments(seg, k), block)
  table, first = rt.full_block_table(k, layout, block, one_doc=seg is None)
  n_sel = min(topk, -(-k.shape[1] // block))
  blocks, valid = kernel(q, jnp.stack(rt._bf16_pieces(table, 3)), first, layout.block_index,
                         n_sel=n_sel)
  return layout.doc_start[..., None, None] + blocks * block, valid


_GATE_CASES = ["ties", "zeros", "nan", "many_slots", "f16", "top1", "wide", "packed",
               "packed_ties"]


@pytest.mark.parametrize("platform,case", [("gpu", c) for c in _GATE_CASES] + [
    ("tpu", c) for c in ("ties", "nan", "f16", "top1", "tpu_chunks", "packed", "packed_ties")])
def test_gate_kernel_is_the_oracles_choice(platform, case):
  """kernels/moba_gate.py (scores and top-k in one kernel, the gate of GPUs and TPUs) chooses as
  `moba.select_blocks`: the current block first, ties to the lower block (within a chunk of
  slots and between chunks), NaN scores high, the lowest free blocks (invalid) where too few
  past blocks exist; blocks as their starts. Packed documents: a query chooses among its own
  document's full blocks only (tiles and chunks spanning documents, documents without a full
  block)."""
  from moba_jax.kernels import moba_gate
  q, k, seg, block, topk = _gate_case(case)
  n_full = max(q.shape[1] // block, 1)
  assert (moba_gate.supports(q.dtype, q.shape[-1], topk) if platform == "gpu" else
          moba_gate.supports_tpu(q.dtype, q.shape[-1], topk, n_full))
  layout = moba_lib.doc_layout(moba_lib.segments(seg, k), block)
  kbar = moba_lib.block_key_means(k, layout, block_size=block)
  want = jax.jit(functools.partial(moba_lib.select_blocks, block_size=block, topk=topk))(
      q, kbar, layout)
  got = _kernel_choice(_gate(platform), q, k, seg, block, topk)
  for name, a, b in zip(("starts", "valid"), got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
  if case == "nan":
    assert bool(jnp.any(got[0] == 32)), "the NaN block was not chosen"
  if seg is not None:  # every valid past block lies in the query's document, whole
    starts, valid = np.asarray(got[0])[..., 1:], np.asarray(got[1])[..., 1:]
    doc_start = np.asarray(layout.doc_start)[..., None, None]
    doc_end = np.asarray(layout.doc_end)[..., None, None]
    assert ((starts >= doc_start) & (starts + block <= doc_end))[valid].all()
    assert valid.any()


@pytest.mark.parametrize("case,bt,bn", [("ties", 128, 16), ("packed_ties", 16, 128),
                                         ("many_slots", 32, 32)])
def test_gate_kernel_chooses_alike_at_any_tiles(case, bt, bn):
  """`moba_gate.GateTiles` (the GPU gate's queries a program and slots a chunk, which
  tools/gate_sweep.py times) changes the programs, never the choice: the oracle's, with ties
  across chunks of 16 slots and tiles of 16 to 128 queries spanning documents."""
  from moba_jax.kernels import moba_gate
  q, k, seg, block, topk = _gate_case(case)
  layout = moba_lib.doc_layout(moba_lib.segments(seg, k), block)
  kbar = moba_lib.block_key_means(k, layout, block_size=block)
  want = jax.jit(functools.partial(moba_lib.select_blocks, block_size=block, topk=topk))(
      q, kbar, layout)
  kernel = functools.partial(_gate("gpu"), tiles=moba_gate.GateTiles(bt=bt, bn=bn))
  got = _kernel_choice(kernel, q, k, seg, block, topk)
  for name, a, b in zip(("starts", "valid"), got, want):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def test_gate_sweep_times_each_tiles_and_counts_differing_choices(capsys):
  """tools/gate_sweep.py, interpreted: a row per tiles, the first the ratios' reference, no
  choice differing from its; a bad --tiles is one line naming it."""
  from tools import gate_sweep
  gate_sweep.main(["--interpret", "--specs", "256:32:3", "--tiles", "64:64:4:2", "16:32:4:2",
                   "--repeats", "1"])
  rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
  assert [r[3] for r in rows] == ["64:64:4:2", "16:32:4:2"] and rows[0][5] == "1.000"
  assert all(r[6] == "0" and float(r[7]) >= 0 for r in rows), rows  # differ, TF/s
  with pytest.raises(SystemExit, match="--tiles '64:24:4:2': GateTiles bn=24"):
    gate_sweep.main(["--interpret", "--tiles", "64:24:4:2"])


@pytest.mark.parametrize("kw,match", [(dict(bt=48), "bt=48: a power of two from 16 to 256"),
                                      (dict(bn=8), "bn=8"), (dict(num_warps=3), "num_warps=3"),
                                      (dict(num_stages=0), "num_stages=0")])
def test_gate_tiles_name_the_bad_value(kw, match):
  from moba_jax.kernels import moba_gate
  with pytest.raises(ValueError, match=match):
    moba_gate.GateTiles(**kw)


def test_gate_kernel_compares_scores_as_ordered_integers():
  """`moba_gate._order_key` orders float32 as `<` does (-inf lowest, -0.0 equal to 0.0, +inf
  highest; subnormals, which XLA's CPU flushes, left out); the merge of sorted lists keeps the
  earlier list's entry on a tie."""
  from moba_jax.kernels import moba_gate as mg
  x = np.array([-np.inf, -3e38, -2.5, -1e-30, -0.0, 0.0, 1e-30, 2.5, 3e38, np.inf],
               np.float32)
  key = np.asarray(mg._order_key(jnp.asarray(x)))
  for i in range(len(x)):
    for j in range(len(x)):
      assert (key[i] < key[j]) == (x[i] < x[j]) and (key[i] == key[j]) == (x[i] == x[j]), (i, j)
  assert int(mg._order_key(jnp.float32(-np.inf))) == mg._NINF > mg._LOWEST
  vec = lambda *v: jnp.array(v, jnp.int32)
  run = [(vec(5, 7), vec(0, 1)), (vec(3, 7), vec(2, 3))]  # 2 rows, best first
  new = [(vec(5, 9), vec(8, 9)), (vec(4, 1), vec(10, 11))]
  got = [(np.asarray(k).tolist(), np.asarray(s).tolist()) for k, s in mg._merge(run, new)]
  assert got == [([5, 9], [0, 9]), ([5, 7], [8, 1])]  # row 0: the tie at 5 goes to slot 0 first


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="compiled on a GPU only (interpreted, "
                    "a benchmark-scale gate takes hours)")
@pytest.mark.parametrize("seq,block,topk", [(8192, 512, 3), (16384, 128, 8), (32768, 512, 3)])
def test_gate_kernel_at_benchmark_scale_is_xlas_gate(seq, block, topk):
  """The gate kernel against XLA's gate at the benchmark shapes (bf16, 16 heads, head_dim 128):
  both sum exact bf16 products in float32, in different orders, so a choice may differ only at
  a near tie: where they differ, the two blocks' float64 scores are within 1e-5 of each other
  (relative to the query's largest), and such queries are rare."""
  from moba_jax.kernels import _routing as rt
  from moba_jax.kernels import moba_gate
  q, k, _ = random_qkv(17, 1, seq, 16, 16, 128, jnp.bfloat16)
  kbar = moba_lib.slot_means(k, block)
  layout = moba_lib.doc_layout(jnp.zeros((1, seq), jnp.int32), block)
  got = _kernel_choice(moba_gate.gate_topk, q, k, None, block, topk)
  xla = jax.jit(lambda q, k: rt.select_chunked(q, k, layout, block_size=block, topk=topk,
                                               one_doc=True))
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(rt, "_gate_kernel", lambda *_: None)
    want = xla(q, k)
  np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
  g, w = np.asarray(got[0]), np.asarray(want[0])
  diff = np.argwhere((g != w).any(-1))  # [n, 3]: (batch, query, head)
  assert len(diff) <= 1e-4 * g[..., 0].size, len(diff)
  qn, kn = np.asarray(q, np.float64), np.asarray(kbar, np.float64)
  for b, t, h in diff:
    scores = kn[b, :, h] @ qn[b, t, h]  # [N] (kv head h: groups of 1)
    top = np.abs(scores).max()
    for sg, sw in zip(g[b, t, h], w[b, t, h]):
      assert abs(scores[sg // block] - scores[sw // block]) <= 1e-5 * top, (t, h, sg, sw)


@pytest.mark.parametrize("platform,docs,q_start", [
    ("gpu", None, None), ("gpu", [300, 84], None), ("gpu", None, 100), ("gpu", [384], 0),
    ("gpu", [70, 5, 200, 109], 100), ("tpu", None, 100), ("tpu", [70, 5, 200, 109], None)])
def test_routing_with_the_gate_kernel_is_the_routing_of_xlas_gate(monkeypatch, platform, docs,
                                                                  q_start):
  """`_routing.route` with the gate kernel (a GPU's choice; here forced, interpreted) builds the
  same routing as with XLA's gate, for single documents (segment ids or none) and packed rows,
  with a query offset or without. Off a GPU or TPU, and for float32 queries, the choice is
  XLA's gate."""
  from moba_jax.kernels import _routing as rt
  from moba_jax.kernels import moba_gate
  q, k, _ = random_qkv(16, 2, 384, 4, 2, 64, jnp.bfloat16)
  seg = None if docs is None else packed_segments(2, docs).at[1].set(0)  # row 1: one document
  if q_start is not None:  # queries [q_start, q_start + 160) of the 384 keys (a traced offset)
    q = q[:, q_start:q_start + 160]
  kw = dict(block_size=32, topk=4, block_q=32)

  def routing(gate):
    monkeypatch.setattr(rt, "_gate_kernel", gate)
    return jax.jit(lambda q, k, s: rt.route(q, k, seg, q_start=s, **kw)[0])(q, k, q_start)
  kernel = _gate(platform)
  got, want = routing(lambda *_: kernel), routing(lambda *_: None)
  for name, a, b in zip(want._fields, got, want):
    if a is not None:
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
  # under differentiation (the training step's vjp) the gate has no tangent (a Pallas call's own
  # JVP would trace the kernel outside its grid: run 26's first compiled try)
  monkeypatch.setattr(rt, "_gate_kernel", lambda *_: kernel)
  lo = lambda q: rt.route(q, k, seg, q_start=q_start, **kw)[0].lo
  primal, tangent = jax.jit(lambda q: jax.jvp(lo, (q,), (q,)))(q)
  np.testing.assert_array_equal(np.asarray(primal), np.asarray(want.lo))
  assert tangent.dtype == jax.dtypes.float0 or not np.asarray(tangent).any()
  monkeypatch.undo()
  on_device = jax.default_backend() in ("gpu", "tpu")
  assert (rt._gate_kernel(jnp.bfloat16, 64, 4, 12) is not None) == on_device
  assert rt._gate_kernel(jnp.float32, 64, 4, 12) is None
  assert not moba_gate.supports(jnp.bfloat16, 64, moba_gate.MAX_TOPK + 1)
  assert not moba_gate.supports(jnp.bfloat16, 96, 3)
  assert moba_gate.supports_tpu(jnp.bfloat16, 96, 3, 2048)  # head_dim padded to 128
  assert not moba_gate.supports_tpu(jnp.bfloat16, 128, 3, 8192)  # the keys' block past VMEM
