"""Turns a grid's stage-1 run dir (made on a GPU) into the params-only checkpoint shipped with the
package, so that a CPU grid can start at stage 2 (experiments/layerwise_hybrid_cpu.toml).

  python tools/ship_stage1.py RUN_DIR experiments/stage1/layerwise_hybrid_cpu --command "..."

Writes DEST/checkpoints/<step> (Orbax: params and meta only, saved by this machine's Orbax),
DEST/summary.json and DEST/metrics.jsonl (the run's), DEST/config.toml, and DEST/RECIPE.md (the
command that made it, the machine, the corpus fingerprint, the losses). Dev-only: not installed.
"""

import argparse
import json
import os
import shutil
import sys

import jax
import orbax.checkpoint as ocp
from flax import nnx

from moba_jax import checkpoint as ckpt
from moba_jax import sharding as shd
from moba_jax import train_step as ts
from moba_jax.config import load_config


def main(argv):
  p = argparse.ArgumentParser()
  p.add_argument("run_dir")
  p.add_argument("dest")
  p.add_argument("--command", required=True, help="the command that made RUN_DIR")
  p.add_argument("--machine", required=True)
  args = p.parse_args(argv)
  cfg = load_config(os.path.join(args.run_dir, "config.toml"))
  mesh = shd.make_mesh(cfg.mesh)
  state = ts.init_state(cfg, mesh, shd.rules_from_config(cfg.mesh))
  abstract = ckpt.abstract_like(nnx.to_pure_dict(state.params))
  step, params = ckpt.restore_params(args.run_dir, abstract)
  with open(os.path.join(args.run_dir, "summary.json")) as f:
    summary = json.load(f)
  shutil.rmtree(args.dest, ignore_errors=True)
  os.makedirs(args.dest)
  mngr = ckpt.manager(os.path.join(args.dest, "checkpoints"), keep=1, async_save=False,
                      with_data=False)
  meta = {"step": step, "source_run": os.path.abspath(args.run_dir), "command": args.command,
          "checksums": {"params": ckpt.checksums(params)}}
  mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                          meta=ocp.args.JsonSave(meta)))
  mngr.wait_until_finished()
  mngr.close()
  for name in ("summary.json", "metrics.jsonl", "config.toml"):
    shutil.copy(os.path.join(args.run_dir, name), args.dest)
  n = sum(x.size for x in jax.tree.leaves(params))
  recipe = f"""# Stage-1 weights of layerwise_hybrid_cpu.toml

Made on {args.machine} with:

```bash
{args.command}
```

- step {step}, {n:,} parameters (float32), all-MoBA pretraining (LM loss on every byte)
- corpus fingerprint (sha256): `{summary.get('corpus_fingerprint')}`
- final training loss {summary.get('final_train_loss'):.4f}; held-out LM loss {summary.get('eval_loss'):.4f}
  (trailing {summary.get('trailing_loss'):.4f}); {summary.get('tokens_per_s'):,.0f} tokens/s
- config.toml, metrics.jsonl and summary.json here are that run's; checkpoints/ holds its
  parameters only, re-saved on the CPU by `python tools/ship_stage1.py`.
"""
  open(os.path.join(args.dest, "RECIPE.md"), "w").write(recipe)
  print(f"wrote {args.dest}: step {step}, {n} params")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
