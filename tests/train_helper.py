"""Runs one tiny training in a fresh process (fake CPU devices, optional jax.distributed).

  python tests/train_helper.py DEVICES [--process-id I --num-processes N --port P] key=value ...

Prints one JSON line: {"losses": [...], "summary": {...}} (process 0; others print too).
"""

import json
import os
import sys


def main(argv):
  devices = int(argv[0])
  args, overrides = argv[1:], []
  opts = {}
  while args:
    a = args.pop(0)
    if a.startswith("--"):
      opts[a[2:]] = args.pop(0)
    else:
      overrides.append(a)
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax

  if "num-processes" in opts:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{opts['port']}", int(opts["num-processes"]),
                               int(opts["process-id"]))
  from moba_jax import config, train

  cfg = config.load_config(None, overrides)
  summary = train.run(cfg, progress=False)
  losses = []
  path = os.path.join(cfg.run_dir, "metrics.jsonl")
  if os.path.exists(path):
    losses = [json.loads(line)["loss"] for line in open(path)]
  print(json.dumps({"devices": jax.device_count(), "processes": jax.process_count(),
                    "losses": losses, "summary": summary}), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
