"""`moba-jax plan`: the grid's train step lowered for TPU on a 64-device fake CPU mesh, per-device
state bytes against a hand count of the model's parameters, the arrays held whole on every device,
and the batch rule's error. The paper-scale run is in docs/tpu.md (it takes minutes)."""

import re
import subprocess
import sys

import jax
import pytest

from moba_jax import config, plan

# 2 layers (variant 1: layer 1 full), GQA 4:2; mesh 4 x 8 x 2 = 64 devices. The rules put embed
# and vocab on no mesh axis, so the embedding and the head are held whole on every device.
# bfloat16 activations (float32 parameters), as on a TPU: the routing's TPU gate kernel takes
# 16-bit queries.
TOML = """
[model]
dtype = "bfloat16"
vocab_size = 256
d_model = 64
n_layers = 2
n_heads = 4
n_kv_heads = 2
head_dim = 16
mlp_dim = 128
[moba]
block_size = 64
topk = 2
[train]
steps = 2
batch_size = {batch}
seq_len = 256
warmup_steps = 0
[data]
task = "lm"
[eval]
trailing_tokens = 64
[mesh]
data = -1
fsdp = 8
tensor = 2
[mesh.rules]
embed = []
vocab = []
[grid]
out_dir = "{out}"
seeds = [0]
variants = [1]
"""


def run_plan(tmp_path, batch, *extra):
  path = tmp_path / "tiny.toml"
  path.write_text(TOML.format(batch=batch, out=tmp_path / "grid"))
  cmd = [sys.executable, "-m", "moba_jax.cli", "plan", str(path), "stage=sft", "--mesh-devices",
         "64", *extra]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def _bytes(out, what):
  return int(re.search(rf"{what} [\d.]+ [KMG]iB \((\d+) B\)", out).group(1))


def test_plan_on_64_fake_devices(tmp_path):
  r = run_plan(tmp_path, 32, "--no-compile", "--replicated-mib", "0.01")
  assert r.returncode == 0, r.stderr
  out = r.stdout
  assert "on 64 fake cpu devices, lowered for tpu" in out
  assert "mesh: data=4 fsdp=8 context=1 tensor=2" in out
  assert "attention: layer 0: moba -> pallas_tpu; layer 1: full -> splash" in out
  # the routing traced as on a TPU (`_routing.tracing_for`): the TPU gate kernel, not XLA's gate
  assert ("Pallas kernels: moba_gate_tpu x1, moba_tpu_dkdv_dense x1, moba_tpu_dkdv_sparse x1, "
          "moba_tpu_dq x1, moba_tpu_fwd x1, splash_mha_dkv_segmented_no_residuals x1, "
          "splash_mha_dq_segmented_no_residuals x1, splash_mha_fwd_segmented_residuals x1 "
          "(blocks tile for Mosaic") in out
  # hand count: q/k/v/o and the MLP split over tensor (heads, kv_heads, mlp), norms, embedding
  # and head whole (float32)
  e, h, k, d, m, v, tensor = 64, 4, 2, 16, 128, 256, 2
  layer = (e * h * d + 2 * e * k * d + h * d * e + 3 * e * m) // tensor + 2 * e
  params = 4 * (2 * layer + 2 * v * e + e)
  assert _bytes(out, "params") == params
  opt = _bytes(out, "optimizer state")  # AdamW mu and nu like the params, plus step counts
  assert 2 * params <= opt <= 2 * params + 64
  assert "replicated on all 64 devices, > 10.2 KiB: 6 arrays" in out  # params, mu, nu
  assert "note:" not in out  # every rule's mesh axes divide their dimensions (sharding.undivided)
  for name in ("params/embed [256, 64] float32 64.0 KiB, logical axes ('vocab', 'embed')",
               "params/head [64, 256]", "opt_state/1/0/nu/embed"):
    assert name in out


def test_every_runs_mistake_is_named_before_the_first_lowers(tmp_path):
  """Stage 1 fits the mesh, stage 2's batch does not: the plan stops before lowering either,
  naming the run and the key."""
  r = run_plan(tmp_path, 32, "--no-compile", "stage=all", "grid.sft.train.batch_size=48")
  assert r.returncode == 2 and "[1/" not in r.stdout, (r.stdout, r.stderr)
  assert r.stderr.startswith("moba-jax plan: sft hybrid-1 seed 0: train.batch_size=48 must be "
                             "divisible by 32"), r.stderr
  assert r.stderr.count("\n") == 1


def test_a_signal_stops_the_plan_and_its_process_with_fake_devices(tmp_path):
  """`moba-jax plan` reruns itself with fake devices: a SIGTERM to it reaches that process, which
  stops with one line (exit 143), and the command waits for it: no process outlives it."""
  import os
  import signal
  import time
  path = tmp_path / "tiny.toml"
  path.write_text(TOML.format(batch=32, out=tmp_path / "grid"))
  proc = subprocess.Popen([sys.executable, "-m", "moba_jax.cli", "plan", str(path), "stage=sft",
                           "--mesh-devices", "64"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  assert proc.stdout.readline().startswith("plan: ")  # the child runs (its first line)
  children = open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()
  assert len(children) == 1
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143 and "Traceback" not in err, err
  assert "moba-jax: stopped by SIGTERM (exit 143)" in err
  time.sleep(0.5)
  assert not os.path.exists(f"/proc/{children[0]}")


def test_batch_rule_error_names_the_rule():
  """In-process on an abstract mesh (the command prints it as one line and exits 2)."""
  mesh = jax.sharding.AbstractMesh((4, 8, 1, 2), config.MESH_AXES)
  cfg = config.load_config(None, ["train.batch_size=16"])
  with pytest.raises(ValueError, match=r"train.batch_size=16 must be divisible by 32, the mesh "
                     r"axes \('data', 'fsdp'\) that mesh.rules.batch"):
    plan.check_batch_rules(cfg, mesh, cfg.mesh.rules.as_tuples())
  plan.check_batch_rules(config.load_config(None, ["train.batch_size=64"]), mesh,
                         cfg.mesh.rules.as_tuples())


@pytest.mark.parametrize("argv, message", [
    (["--mesh-devices", "0"], "argument --mesh-devices: '0' must be an integer >= 1"),
    (["--mesh-devices", "x"], "argument --mesh-devices: 'x' must be an integer >= 1"),
    ([], "the following arguments are required: --mesh-devices"),
    (["--mesh-devices", "8", "--replicated-mib", "nan"], "'nan' must be a finite number >= 0"),
    (["--mesh-devices", "100000"], "argument --mesh-devices: '100000' must be at most 16384 (fake "
                                   "CPU devices"),
])
def test_cli_mistake_is_one_line(capsys, argv, message):
  assert plan.main(argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and message in err, err


def test_a_mesh_that_cannot_take_the_devices_is_named_before_they_start(tmp_path, capsys,
                                                                        monkeypatch):
  """The planned stages' meshes are checked before the command reruns itself with N fake
  devices (8,192 of them took 12.6 s to start before saying so)."""
  monkeypatch.setattr(plan, "_rerun_with_devices", lambda *a: pytest.fail("devices started"))
  path = tmp_path / "tiny.toml"
  path.write_text(TOML.format(batch=48, out=tmp_path / "grid"))
  assert plan.main([str(path), "stage=sft", "mesh.data=3", "--mesh-devices", "8192"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("moba-jax plan: sft: mesh.data * mesh.fsdp * mesh.context * mesh.tensor "
                        "= 48 ({'data': 3, ") and err.endswith(
                            "must equal the device count 8192\n") and err.count("\n") == 1, err


@pytest.mark.slow
def test_plan_compiled_memory(tmp_path):
  r = run_plan(tmp_path, 32)
  assert r.returncode == 0, r.stderr
  assert re.search(r"activations and other temporaries [\d.]+ [MG]iB", r.stdout)


def test_a_context_parallel_plan_keeps_auto_and_says_so():
  """With mesh.context > 1 the dispatcher runs the context-parallel path before resolving, so the
  plan must not pin a kernel name (one that cannot run context parallel would be refused)."""
  from moba_jax import train
  cfg = config.load_config(None, ["mesh.context=2", "train.seq_len=256", "model.n_layers=2",
                                  "moba.hybrid_full_layers=1"])
  assert plan.on_platform(cfg, "tpu") is cfg
  # "auto" runs the platform's MoBA kernel with the sequence split (run 46 on an H100: pallas_gpu),
  # full attention xla's chunks everywhere
  moba = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(jax.default_backend(), "xla")
  assert train.attention_plan(cfg) == (f"layer 0: moba -> {moba}, context parallel over 2; "
                                       "layer 1: full -> xla, context parallel over 2")
  one = config.load_config(None, ["model.n_layers=2", "moba.hybrid_full_layers=1"])
  assert plan.on_platform(one, "tpu").moba.implementation == "pallas_tpu"
