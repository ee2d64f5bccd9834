"""The one entry point: python -m alignment.main --config=configs/<algo>.py:<preset> --workdir=DIR.

Overrides: --config.optim.lr=1e-5 (unknown keys, wrong types and values outside a key's choices are
refused before anything runs). Re-running the command resumes the workdir's run; a config that changes
what the run computes is refused then, unless --accept_config_changes. --verbosity=info shows the
libraries' logs.
"""

import faulthandler
import json
import signal
import sys

from absl import app, flags
from ml_collections import config_flags

from alignment import console

config_flags.DEFINE_config_file("config", None, "configs/<algorithm>.py:<preset>[,key=value]",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics.jsonl and TensorBoard files go.")
flags.DEFINE_bool("accept_config_changes", False, "resume a workdir with a config that changes what the run "
                  "computes (the changes are recorded in WORKDIR/config_changes.jsonl)")
flags.mark_flags_as_required(["config", "workdir"])


def run(config, workdir: str, accept_config_changes: bool = False) -> dict:
  """Runs `config.algorithm` (found in `alignment.train.registry`) in `workdir`; returns its summary."""
  from alignment import choices
  from alignment.train import registry
  choices.check_config(config)
  registry.check_name(config.algorithm)
  from alignment.parallel import initialize_distributed  # imported here so that --help and flag errors stay fast
  algorithm = registry.get(config.algorithm)
  initialize_distributed()
  return algorithm(config, workdir, accept_config_changes=accept_config_changes)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: every thread's stack, on stderr
  try:
    summary = run(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.accept_config_changes)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(summary, indent=2))
  print_gym_comparison(summary)


def print_gym_comparison(summary: dict) -> None:
  """With gym evals at two or more steps: the first and the last side by side, and where they are."""
  paths = summary.get("gym_reports") or []
  if len(paths) < 2:
    return
  from alignment.evals import harness
  first, last = harness.read_report(paths[0]), harness.read_report(paths[-1])
  print(f"\nAlignment gym ({first['num_probes']} probes of {flags.FLAGS.config.evals.suite or 'evals.probes'}, "
        f"greedy), step {first['step']} vs step {last['step']}:")
  print(harness.format_comparison(first, last, names=(f"step {first['step']}", f"step {last['step']}")))
  print(f"\nRun: {summary['workdir']} (reports: {paths[-1].rsplit('/', 1)[0]}, metrics.jsonl, TensorBoard)")


if __name__ == "__main__":
  console.run(main, flags_parser=console.parse_config_flags)
