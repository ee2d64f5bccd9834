"""Runs the ablation grid a config file defines with `get_sweep(arg)`, one workdir per point.

  python launch/sweep.py --config=configs/sft.py:tiny --workdir=workdirs/sweep [--dry_run]
      [-- --config.train.steps=20 ...]   # extra flags passed to every run

Each point is a dict of dotted config keys -> values; every key is checked against the config before
the first run starts. Runs go one after another on this machine; their summaries are collected in
WORKDIR/sweep.jsonl and printed as a table. `--dry_run` prints the commands instead (for a pod or a
cluster, feed them to launch/tpu_pod.sh or launch/gpu_slurm.sh).
"""

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config_module(path: str):
  spec = importlib.util.spec_from_file_location("sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def point_name(point: dict) -> str:
  return ",".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(point.items())) or "base"


def check_point(config, point: dict, where: str) -> None:
  """Fails (naming the key) if a dotted key does not exist or its value has the wrong type."""
  for key, value in point.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node.get(part) if hasattr(node, "get") else None
    if node is None or leaf not in node:
      raise SystemExit(f"error: {where}: sweep key {key!r} is not in the config")
    current = node[leaf]
    if current is not None and not isinstance(value, type(current)) and not (
        isinstance(current, float) and isinstance(value, int)):
      raise SystemExit(f"error: {where}: sweep key {key!r} is {type(current).__name__}, got {value!r}")


def commands(config_arg: str, workdir: str, extra) -> list:
  path, _, arg = config_arg.partition(":")
  module = load_config_module(path)
  if not hasattr(module, "get_sweep"):
    raise SystemExit(f"error: {path} defines no get_sweep(arg)")
  config = module.get_config(arg or None)
  out = []
  for i, point in enumerate(module.get_sweep(arg or None)):
    check_point(config, point, f"{path}:get_sweep()[{i}]")
    run_dir = os.path.join(workdir, point_name(point))
    overrides = [f"--config.{k}={v}" for k, v in sorted(point.items())]
    out.append((point, run_dir, [sys.executable, "-m", "alignment.main", f"--config={config_arg}",
                                 f"--workdir={run_dir}", *overrides, *extra]))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="configs/<algorithm>.py[:preset,...]")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  parser.add_argument("extra", nargs="*", help="flags appended to every run (after --)")
  args = parser.parse_args(argv)
  runs = commands(args.config, args.workdir, args.extra)
  if args.dry_run:
    for _, _, cmd in runs:
      print(shlex.join(cmd))
    return
  os.makedirs(args.workdir, exist_ok=True)
  results = []
  for point, run_dir, cmd in runs:
    print(f"== {point_name(point)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    # The summary JSON comes first; a gym before/after table may follow it.
    summary = json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.index("{"):])[0] if proc.returncode == 0 else {}
    results.append({"point": point, "returncode": proc.returncode, **summary})
    with open(os.path.join(args.workdir, "sweep.jsonl"), "a") as f:
      f.write(json.dumps(results[-1]) + "\n")
  for r in results:
    print(f"{point_name(r['point']):40s} rc={r['returncode']} final_loss={r.get('final_loss', float('nan')):.4f} "
          f"eval_loss={r.get('eval/loss', float('nan')):.4f}")
  if any(r["returncode"] for r in results):
    sys.exit(1)


if __name__ == "__main__":
  main()
