"""`moba-jax plan [EXPERIMENT] [key=value ...] --mesh-devices N`: a pod dry run without the pod.

For each run of the grid (`grid.plan` / `grid.select`, one seed per variant: seeds change no
shape), on N fake CPU devices (the command reruns itself with
XLA_FLAGS=--xla_force_host_platform_device_count=N), it prints:
  * the attention implementation of each layer on the target platform (--platform, default tpu);
  * the train step (moba_jax/train_step.py) traced and lowered for that platform under the
    configured mesh and logical axis rules, with every Pallas TPU kernel's blocks checked against
    Mosaic's tiling rule (moba_jax.kernels.moba_tpu.check_tiles);
  * per-device bytes of parameters and optimizer state: exact, from their shardings' shard shapes;
  * per-device bytes of activations: XLA's compiled memory analysis of the same step compiled for
    the CPU, MoBA's xla path standing in for the kernel (`compiled_memory`: one device's
    temporaries, i.e. activations, gradients, workspace; a CPU buffer assignment, not a TPU's).
    --no-compile skips it;
  * the parameters and optimizer state held whole on every device above --replicated-mib.
A mistake (a mesh that does not fit the devices, a batch or sequence its rule's mesh axes do not
divide, a tile Mosaic refuses) is one line naming the key or rule, exit 2.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import os
import re
import signal
import subprocess
import sys
import time

from moba_jax.cli import OneLineParser, UsageError, number_arg

DEVICES_ENV = "MOBA_JAX_PLAN_DEVICES"  # set in the child that has the fake devices
PLATFORMS = ("tpu", "cpu")  # lowering for gpu needs the GPU toolchain: not offered
MAX_DEVICES = 16384  # 100,000 fake devices ran out of threads after 5 minutes (run 45)


def _parser() -> argparse.ArgumentParser:
  p = OneLineParser(prog="moba-jax plan", description=__doc__.splitlines()[0])
  p.add_argument("args", nargs="*", help="[EXPERIMENT.toml or packaged name] [key=value ...] "
                 "(grid keys as for moba-jax grid: stage=pretrain, only=[1], ...)")
  p.add_argument("--mesh-devices", required=True, help="devices of the mesh (fake)",
                 type=number_arg(int, 1, MAX_DEVICES, " (fake CPU devices, each with its "
                                 "threads; the largest TPU pods have under 9,000 chips)"))
  p.add_argument("--platform", choices=PLATFORMS, default="tpu", help="lower for (default tpu)")
  p.add_argument("--no-compile", action="store_true",
                 help="skip the CPU compile that measures activation memory")
  p.add_argument("--replicated-mib", type=number_arg(float, 0), default=1.0,
                 help="list state arrays held whole on every device above this size")
  return p


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    args = _parser().parse_intermixed_args(argv)
  except UsageError as e:
    print(f"moba-jax plan: {e}", file=sys.stderr)
    return 2
  pos = list(args.args)
  name = pos.pop(0) if pos and "=" not in pos[0] else None
  try:
    if os.environ.get(DEVICES_ENV) != str(args.mesh_devices):
      _check_meshes(name, pos, args.mesh_devices)  # before thousands of fake devices start
      return _rerun_with_devices(argv, args.mesh_devices)
    return _plan(name, pos, args)
  except (ValueError, OSError) as e:
    print(f"moba-jax plan: {str(e).splitlines()[0]}", file=sys.stderr)
    return 2


def _check_meshes(name, overrides, n_devices: int) -> None:
  """ValueError naming the stage and the mesh keys where a planned stage's mesh cannot take
  n_devices (the experiment's own mistakes too): the child's first checks, without its devices."""
  from moba_jax import grid
  from moba_jax.sharding import mesh_shape

  exp, _ = grid.load_experiment(name, overrides)
  pre, runs = grid.plan(exp)
  for spec in grid.select(exp, pre, runs):
    try:
      mesh_shape(spec.cfg.mesh, n_devices)
    except ValueError as e:
      raise ValueError(f"{spec.stage}: {e}") from None


def _rerun_with_devices(argv: list[str], n: int) -> int:
  """This command again, in a process whose CPU backend has n devices (set before jax starts)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", **{DEVICES_ENV: str(n)})
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  # through `moba-jax`'s entry point (a signal is one line there, not a traceback); a SIGTERM or
  # SIGINT to this process goes on to the child, which this one waits for: none outlives it
  proc = subprocess.Popen([sys.executable, "-m", "moba_jax.cli", "plan", *argv], env=env)
  signals = (signal.SIGTERM, signal.SIGINT)
  old = {sig: signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
         for sig in signals}
  try:
    code = proc.wait()
  finally:
    for sig, handler in old.items():
      signal.signal(sig, handler)
  return 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N


def _plan(name, overrides, args) -> int:
  from moba_jax import grid

  exp, source = grid.load_experiment(name, overrides)
  pre, runs = grid.plan(exp)
  specs, seen = [], set()
  for spec in grid.select(exp, pre, runs):
    if (spec.stage, spec.variant) not in seen:
      seen.add((spec.stage, spec.variant))
      specs.append(spec)
  if not specs:
    why = "; grid.init_from is set: no stage 1" if exp.grid.init_from else ""
    raise ValueError(f"no run selected (grid.stage={exp.grid.stage!r}, grid.only="
                     f"{list(exp.grid.only)}{why})")
  import jax

  for spec in specs:  # every run's mistakes before the first one lowers
    try:
      _setup(spec.cfg, args.mesh_devices, args.platform)
    except ValueError as e:
      raise ValueError(f"{spec.name}: {e}") from None
  print(f"plan: {source} on {args.mesh_devices} fake {jax.default_backend()} devices, lowered "
        f"for {args.platform} (jax {jax.__version__})", flush=True)
  for i, spec in enumerate(specs, 1):
    print(f"[{i}/{len(specs)}] {spec.name}", flush=True)
    for line in plan_run(spec.cfg, args.mesh_devices, args.platform,
                         compile_memory=not args.no_compile,
                         replicated_bytes=int(args.replicated_mib * 2**20)):
      print(f"  {line}", flush=True)
  return 0


def _mib(n: int) -> str:
  if n >= 2**30:
    return f"{n / 2**30:.2f} GiB"
  return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def on_platform(cfg, platform: str):
  """cfg with moba.implementation / full_implementation as "auto" resolves them on `platform`;
  unchanged when mesh.context splits the sequence: attention() then resolves "auto" itself
  (`attention.resolve_context_parallel`) on the backend it traces on, the fake CPU devices' xla
  path here; name moba.implementation=pallas_tpu to plan (and tile-check) the kernel there."""
  from moba_jax import attention

  if cfg.mesh.context > 1:
    return cfg
  m = cfg.model
  dense = 4 * cfg.train.batch_size * m.n_heads * cfg.train.seq_len ** 2  # as attention() sizes it
  moba = dataclasses.replace(
      cfg.moba,
      implementation=attention.resolve("moba", cfg.moba.implementation, platform,
                                       dtype=m.dtype, dense_bytes=dense),
      full_implementation=attention.resolve("full", cfg.moba.full_implementation, platform,
                                            dtype=m.dtype, dense_bytes=dense))
  return dataclasses.replace(cfg, moba=moba)


def check_batch_rules(cfg, mesh, rules) -> None:
  """Raises ValueError naming the rule if the mesh axes of `batch` / `length` (mesh.rules) do not
  divide train.batch_size / train.seq_len (jit would refuse the batch's sharding)."""
  from moba_jax import sharding as shd

  spec = shd.batch_sharding(mesh, rules).spec
  sizes = dict(mesh.shape)
  for dim, (rule, key, value) in enumerate((("batch", "train.batch_size", cfg.train.batch_size),
                                            ("length", "train.seq_len", cfg.train.seq_len))):
    axes = spec[dim] if dim < len(spec) else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    n = math.prod(sizes[a] for a in axes)
    if value % n:
      raise ValueError(f"{key}={value} must be divisible by {n}, the mesh axes {axes} that "
                       f"mesh.rules.{rule} splits it over (mesh {_mesh_str(mesh)})")


def _mesh_str(mesh) -> str:
  return " ".join(f"{a}={s}" for a, s in mesh.shape.items())


def per_device_bytes(tree, shardings) -> int:
  """Bytes one device holds of `tree` (shape/dtype leaves) laid out by `shardings` (same tree)."""
  import jax

  total = 0
  for x, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
    total += math.prod(sh.shard_shape(x.shape)) * x.dtype.itemsize
  return total


def replicated(prefix: str, tree, shardings, min_bytes: int) -> list[str]:
  """'prefix/path [shape] dtype size, logical axes' of each array above min_bytes held whole on
  every device (the logical axes name the rules that left it whole: mesh.rules.<axis>)."""
  import jax
  from flax import nnx

  is_var = lambda x: isinstance(x, nnx.Variable)
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_var)
  out = []
  for (path, var), sh in zip(leaves, jax.tree.leaves(shardings), strict=True):
    x = var.get_value() if is_var(var) else var
    size = math.prod(x.shape) * x.dtype.itemsize
    if size > min_bytes and sh.is_fully_replicated and sh.num_devices > 1:
      keys = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
      axes = var.get_metadata().get("out_sharding") if is_var(var) else None
      rules = f", logical axes {tuple(axes)}" if axes else ", no logical axes"
      out.append(f"{'/'.join([prefix] + keys)} {list(x.shape)} {x.dtype.name} {_mib(size)}"
                 f"{rules}")
  return out


def batch_specs(cfg) -> dict:
  import jax
  import jax.numpy as jnp

  from moba_jax import data

  shape = (cfg.train.batch_size, cfg.train.seq_len)
  return {k: jax.ShapeDtypeStruct(shape, jnp.float32 if k == "mask" else jnp.int32)
          for k in data.FIELDS}


def _trace(cfg, mesh, rules):
  """(abstract TrainState, the train step traced); call under shd.activate(mesh, rules)."""
  from moba_jax import train_step as ts

  state = ts.abstract_state(cfg, mesh, rules)
  step = ts.make_train_step(state)
  return state, step.jitted.trace(state.params, state.opt_state, batch_specs(cfg))


def _kernel_summary(names: list[str]) -> str:
  counts = collections.Counter(names)
  return ", ".join(f"{k} x{n}" for k, n in sorted(counts.items())) or "none"


def _setup(cfg, n_devices: int, platform: str):
  """(mesh, rules, cfg with "auto" resolved on `platform`) of one run, checked: the batch over
  the mesh, the config (ValueError naming the key)."""
  import jax

  from moba_jax import sharding as shd
  from moba_jax import train

  mesh = shd.make_mesh(cfg.mesh, jax.devices()[:n_devices])
  rules = shd.rules_from_config(cfg.mesh)
  check_batch_rules(cfg, mesh, rules)
  return mesh, rules, train.validate(on_platform(cfg, platform))


def plan_run(cfg, n_devices: int, platform: str = "tpu", *, compile_memory: bool = True,
             replicated_bytes: int = 2**20) -> list[str]:
  """The plan of one run config on the first n_devices devices -> printable lines."""

  from moba_jax import sharding as shd
  from moba_jax import train
  from moba_jax.kernels import _routing as rt
  from moba_jax.kernels import moba_tpu

  mesh, rules, cfg = _setup(cfg, n_devices, platform)
  lines = [f"mesh: {_mesh_str(mesh)}; batch {cfg.train.batch_size} x {cfg.train.seq_len}",
           f"attention: {train.attention_plan(cfg)}"]
  t0 = time.perf_counter()
  # the kernels' routing chooses its gate kernel, sort and searches for `platform`, as a run
  # there traces it (the TPU gate kernel where it takes the case), not for this CPU
  with shd.activate(mesh, rules), rt.tracing_for(platform):
    state, traced = _trace(cfg, mesh, rules)
    kernels = moba_tpu.check_tiles(traced.jaxpr) if platform == "tpu" else []
    traced.lower(lowering_platforms=(platform,))
  tiles = " (blocks tile for Mosaic on TPU v5e/v5p/v6e)" if kernels else ""
  lines.append(f"lowered for {platform} in {time.perf_counter() - t0:.1f} s; Pallas kernels: "
               f"{_kernel_summary(kernels)}{tiles}")
  params = per_device_bytes(state.params, state.param_shardings)
  opt = per_device_bytes(state.opt_state, state.opt_shardings)
  lines.append(f"per device: params {_mib(params)} ({params} B), optimizer state {_mib(opt)} "
               f"({opt} B), from their shardings")
  if compile_memory:
    lines.append(f"per device: {compiled_memory(cfg, mesh, rules)}")
  big = (replicated("params", state.params, state.param_shardings, replicated_bytes)
         + replicated("opt_state", state.opt_state, state.opt_shardings, replicated_bytes))
  lines.append(f"replicated on all {n_devices} devices, > {_mib(replicated_bytes)}: "
               + (f"{len(big)} arrays" if big else "none"))
  lines += [f"  {b}" for b in big]
  lines += [f"note: {u}" for u in shd.undivided(state.params, mesh, rules)]
  return lines


def compiled_memory(cfg, mesh, rules) -> str:
  """XLA's memory analysis of one device's train step compiled for the CPU, with MoBA's xla path
  in place of a Pallas kernel (a kernel does not compile for the CPU, and its interpret mode's
  callbacks cannot be rematerialized): the layers' saved activations are the same, one layer's
  attention temporaries are the xla path's (chunked to moba.py's budget), not the kernel's."""
  from moba_jax import sharding as shd

  impl = "xla" if cfg.moba.implementation.startswith("pallas") else cfg.moba.implementation
  full = "xla" if cfg.moba.full_implementation == "splash" else cfg.moba.full_implementation
  cpu = dataclasses.replace(cfg, moba=dataclasses.replace(cfg.moba, implementation=impl,
                                                          full_implementation=full))
  t0 = time.perf_counter()
  with shd.activate(mesh, rules):
    _, traced = _trace(cpu, mesh, rules)
    m = traced.lower().compile().memory_analysis()
  return (f"activations and other temporaries {_mib(m.temp_size_in_bytes)}, arguments "
          f"{_mib(m.argument_size_in_bytes)}, outputs {_mib(m.output_size_in_bytes)} (aliased "
          f"{_mib(m.alias_size_in_bytes)}; XLA CPU compile, moba {impl}, full {full}, "
          f"{time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
  sys.exit(main())
