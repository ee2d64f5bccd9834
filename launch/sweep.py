"""Runs the ablation grid a config file defines with `get_sweep(arg)`, one workdir per point and seed.

  python launch/sweep.py --config=configs/sft.py:tiny --workdir=workdirs/sweep [--seeds=3] [--parallel=2]
      [--dry_run [--launcher=local|slurm|tpu_pod]] [--config.train.steps=20 ...]   # extra flags: every run

Each point is a dict of dotted config keys -> values; every key is checked against the config before
the first run starts. With `--seeds=N` each point runs N times (`config.seed` and `config.train.seed` set
to 0..N-1) in WORKDIR/POINT/seed_K. Runs go one after another, or `--parallel` side by side (with
`--devices_per_run`, each on its own GPUs through CUDA_VISIBLE_DEVICES). Their summaries are collected in
WORKDIR/sweep.jsonl (one row per run, the latest) and printed as a table: per point, each final metric's
mean over seeds and its 95% interval (Student's t), also drawn in WORKDIR/sweep.png. Re-running the sweep
resumes unfinished runs and reprints finished ones from their saved summaries (`alignment.main` on a
finished workdir). `--dry_run` prints what would run instead, for `--launcher`:
  local     one `python -m alignment.main ...` line per run (the default);
  slurm     a SLURM job-array script, one array task per run on a node of its own:
            `python launch/sweep.py ... --dry_run --launcher=slurm > sweep.sbatch && sbatch sweep.sbatch`
            (GPUS_PER_NODE, PARTITION, TIME and ACCOUNT, read when it is printed, as launch/gpu_slurm.sh reads them);
  tpu_pod   one launch/tpu_pod.sh job per run, each on its own slice named TPU-<run index> (TPU, ZONE and
            the script's other variables are read when the lines run; WORKDIR should then be a gs:// path).
"""

import argparse
import concurrent.futures
import importlib.util
import json
import os
import queue
import shlex
import subprocess
import sys
import threading

import numpy as np
import scipy.stats

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


def commands(config_arg: str, workdir: str, extra, python: str = sys.executable, seeds: int = 1) -> list:
  """[(point, seed, run directory, command)]: a run per point, or per point and seed when seeds > 1."""
  path, _, arg = config_arg.partition(":")
  module = load_config_module(path)
  if not hasattr(module, "get_sweep"):
    raise SystemExit(f"error: {path} defines no get_sweep(arg)")
  config = module.get_config(arg or None)
  out = []
  for i, point in enumerate(module.get_sweep(arg or None)):
    check_point(config, point, f"{path}:get_sweep()[{i}]")
    overrides = [f"--config.{k}={v}" for k, v in sorted(point.items())]
    for seed in range(seeds) if seeds > 1 else [None]:
      run_dir = os.path.join(workdir, point_name(point), *([] if seed is None else [f"seed_{seed}"]))
      seeded = [] if seed is None else [f"--config.seed={seed}", f"--config.train.seed={seed}"]
      out.append((point, seed, run_dir, [python, "-m", "alignment.main", f"--config={config_arg}",
                                         f"--workdir={run_dir}", *overrides, *seeded, *extra]))
  return out


LAUNCHERS = ("local", "slurm", "tpu_pod")


def dry_run(launcher: str, runs: list) -> str:
  """What `--dry_run` prints for `runs` (from `commands`, with python='python'): module docstring."""
  if launcher == "local":  # for another machine: its `python`, not this one's venv
    return "\n".join(shlex.join(cmd) for *_, cmd in runs)
  if launcher == "tpu_pod":  # tpu_pod.sh installs the checkout on every worker and runs alignment.main there
    return "\n".join(f'TPU="$TPU-{i}" ' + shlex.join(["launch/tpu_pod.sh", cmd[3].split("=", 1)[1], run_dir, *cmd[5:]])
                     for i, (_, _, run_dir, cmd) in enumerate(runs))
  sbatch = [f"--gpus-per-node={os.environ.get('GPUS_PER_NODE', '8')}"] + [
      f"--{name.lower()}={os.environ[name]}" for name in ("PARTITION", "TIME", "ACCOUNT") if os.environ.get(name)]
  venv = [os.path.join(".venv", "bin", "python")]  # the checkout's venv on the shared filesystem (make install-cuda)
  lines = ["#!/usr/bin/env bash",
           f"#SBATCH --job-name=sweep --array=0-{len(runs) - 1} --nodes=1 --ntasks=1 --exclusive",
           f"#SBATCH {shlex.join(sbatch)} --chdir={shlex.quote(REPO)}",
           f"#SBATCH --output={shlex.quote(os.path.join(REPO, 'slurm-%A_%a.out'))}",
           "set -euo pipefail", "runs=("]
  lines += [f"  {shlex.quote(shlex.join(venv + cmd[1:]))}" for *_, cmd in runs]
  lines += [")", 'eval "${runs[$SLURM_ARRAY_TASK_ID]}"']
  return "\n".join(lines)


def write_results(path: str, row: dict) -> None:
  """Adds `row` to the JSONL file at `path`, replacing an earlier row of the same point and seed."""
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      rows = [json.loads(line) for line in f if line.strip()]
  rows = [r for r in rows if (r["point"], r.get("seed")) != (row["point"], row.get("seed"))] + [row]
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  os.replace(tmp, path)


def final_metrics(summary: dict) -> dict:
  """A run summary's final metrics: its `final_*` numbers and its `prefix/name` ones (evals)."""
  return {k: float(v) for k, v in summary.items()
          if (k.startswith("final_") or "/" in k) and isinstance(v, (int, float)) and not isinstance(v, bool)}


def interval(values) -> tuple[float, float, float]:
  """(mean, low, high): the 95% interval of the mean by Student's t (n - 1 degrees of freedom); one value
  gives a point, not an interval."""
  values = np.asarray(values, np.float64)
  mean = float(values.mean())
  if len(values) < 2:
    return mean, mean, mean
  half = float(scipy.stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
  return mean, mean - half, mean + half


def table(rows: list) -> tuple[list, str]:
  """Per point (in the order first seen) and final metric: n, mean and interval over its finished
  runs; and the same as a printed table."""
  by_point = {}
  for r in rows:
    by_point.setdefault(point_name(r["point"]), []).append(r)
  stats, lines = [], []
  for name, runs in by_point.items():
    done = [final_metrics(r) for r in runs if r["returncode"] == 0]
    failed = len(runs) - len(done)
    keys = sorted(set.intersection(*(set(m) for m in done))) if done else []
    for key in keys:
      mean, low, high = interval([m[key] for m in done])
      stats.append({"point": name, "metric": key, "n": len(done), "mean": mean, "low": low, "high": high})
      lines.append(f"{name:36s} {key:24s} n={len(done)}  {mean:10.4f}  [{low:.4f}, {high:.4f}]")
    if failed:
      lines.append(f"{name:36s} {failed} run(s) failed")
  return stats, "\n".join([f"{'point':36s} {'metric':24s} {'n':3s}  {'mean':>10s}  95% interval", *lines])


def plot(stats: list, path: str) -> None:
  """One panel per metric: each point's mean with its 95% interval."""
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt
  metrics = sorted({s["metric"] for s in stats})
  if not metrics:
    return
  fig, axes = plt.subplots(len(metrics), 1, figsize=(8, 2.2 * len(metrics) + 0.8), squeeze=False)
  for ax, metric in zip(axes[:, 0], metrics):
    rows = [s for s in stats if s["metric"] == metric]
    ax.errorbar([s["mean"] for s in rows], range(len(rows)), fmt="o", capsize=4,
                xerr=[[s["mean"] - s["low"] for s in rows], [s["high"] - s["mean"] for s in rows]])
    ax.set_yticks(range(len(rows)), [f"{s['point']} (n={s['n']})" for s in rows], fontsize=8)
    ax.set_title(metric, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _run_one(run, workdir, results_lock, env):
  point, seed, run_dir, cmd = run
  print(f"== {point_name(point)}{'' if seed is None else f' seed {seed}'}", file=sys.stderr, flush=True)
  proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True, env=env)
  # The summary JSON comes first; a gym before/after table may follow it.
  summary = json.JSONDecoder().raw_decode(proc.stdout[proc.stdout.index("{"):])[0] if proc.returncode == 0 else {}
  row = {"point": point, "seed": seed, "returncode": proc.returncode, **summary}
  with results_lock:
    write_results(os.path.join(workdir, "sweep.jsonl"), row)
  return row


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="configs/<algorithm>.py[:preset,...]")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--seeds", type=int, default=1, help="runs per point, seeds 0..N-1")
  parser.add_argument("--parallel", type=int, default=1, help="runs side by side")
  parser.add_argument("--devices_per_run", type=int, default=0,
                      help="with --parallel: GPUs each run gets (CUDA_VISIBLE_DEVICES); 0 leaves them shared")
  parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
  parser.add_argument("--launcher", choices=LAUNCHERS, default="local",
                      help="with --dry_run: plain commands, a SLURM job array, or a TPU pod job per run")
  args, extra = parser.parse_known_args(argv)
  extra = [a for a in extra if a != "--"]
  unknown = [a for a in extra if not a.startswith("--config.")]
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)} (extra flags are --config.KEY=VALUE overrides)")
  if args.seeds < 1 or args.parallel < 1 or args.devices_per_run < 0:
    parser.error(f"--seeds={args.seeds}, --parallel={args.parallel} (at least 1), "
                 f"--devices_per_run={args.devices_per_run} (at least 0)")
  if args.dry_run:
    print(dry_run(args.launcher, commands(args.config, args.workdir, extra, python="python", seeds=args.seeds)))
    return
  runs = commands(args.config, args.workdir, extra, seeds=args.seeds)
  os.makedirs(args.workdir, exist_ok=True)
  lock = threading.Lock()
  slots = queue.Queue()
  for slot in range(args.parallel):
    slots.put(slot)

  def run_in_a_slot(run):
    slot = slots.get()
    try:
      env = dict(os.environ)
      if args.devices_per_run:
        first = slot * args.devices_per_run
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in range(first, first + args.devices_per_run))
      return _run_one(run, args.workdir, lock, env)
    finally:
      slots.put(slot)

  with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
    results = list(pool.map(run_in_a_slot, runs))
  stats, text = table(results)
  print(text)
  with open(os.path.join(args.workdir, "sweep_table.json"), "w") as f:
    json.dump(stats, f, indent=1)
  plot(stats, os.path.join(args.workdir, "sweep.png"))
  if any(r["returncode"] for r in results):
    sys.exit(1)


if __name__ == "__main__":
  main()
