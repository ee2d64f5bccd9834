"""Runs the ablation grid a config file defines with `get_sweep(arg)`, one workdir per point.

  python launch/sweep.py --config=configs/sft.py:tiny --workdir=workdirs/sweep [--dry_run]
      [--config.train.steps=20 ...]   # extra flags passed to every run

Each point is a dict of dotted config keys -> values; every key is checked against the config before
the first run starts. Runs go one after another on this machine; their summaries are collected in
WORKDIR/sweep.jsonl (one row per point, the latest) and printed as a table. Re-running the sweep
resumes unfinished points and reprints finished ones from their saved summaries (`alignment.main` on a
finished workdir). `--dry_run` prints the commands instead (for a pod or a cluster, feed them to
launch/tpu_pod.sh or launch/gpu_slurm.sh).
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


def commands(config_arg: str, workdir: str, extra, python: str = sys.executable) -> list:
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
    out.append((point, run_dir, [python, "-m", "alignment.main", f"--config={config_arg}",
                                 f"--workdir={run_dir}", *overrides, *extra]))
  return out


def write_results(path: str, row: dict) -> None:
  """Adds `row` to the JSONL file at `path`, replacing an earlier row of the same point."""
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      rows = [json.loads(line) for line in f if line.strip()]
  rows = [r for r in rows if r["point"] != row["point"]] + [row]
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  os.replace(tmp, path)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="configs/<algorithm>.py[:preset,...]")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  args, extra = parser.parse_known_args(argv)
  extra = [a for a in extra if a != "--"]
  unknown = [a for a in extra if not a.startswith("--config.")]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)} (extra flags are --config.KEY=VALUE overrides)")
  if args.dry_run:  # commands for another machine: its `python`, not this one's venv
    for _, _, cmd in commands(args.config, args.workdir, extra, python="python"):
      print(shlex.join(cmd))
    return
  runs = commands(args.config, args.workdir, extra)
  os.makedirs(args.workdir, exist_ok=True)
  results = []
  for point, run_dir, cmd in runs:
    print(f"== {point_name(point)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    # The summary JSON comes first; a gym before/after table may follow it.
    summary = json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.index("{"):])[0] if proc.returncode == 0 else {}
    results.append({"point": point, "returncode": proc.returncode, **summary})
    write_results(os.path.join(args.workdir, "sweep.jsonl"), results[-1])
  for r in results:
    print(f"{point_name(r['point']):40s} rc={r['returncode']} final_loss={r.get('final_loss', float('nan')):.4f} "
          f"eval_loss={r.get('eval/loss', float('nan')):.4f}")
  if any(r["returncode"] for r in results):
    sys.exit(1)


if __name__ == "__main__":
  main()
