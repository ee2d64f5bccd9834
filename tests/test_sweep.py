"""launch/sweep.py: the grid a config defines becomes one validated command per point."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "launch"))
import sweep  # noqa: E402  (launch/ is a folder of scripts, not a package)


@pytest.mark.parametrize("separator", [[], ["--"]])
def test_dry_run_prints_one_command_per_grid_point(separator):
  out = subprocess.run([sys.executable, "launch/sweep.py", "--config=configs/sft.py:tiny", "--workdir=W",
                        "--dry_run", *separator, "--config.train.steps=5"], cwd=REPO, capture_output=True,
                       text=True, check=True).stdout.splitlines()
  assert len(out) == 4
  assert len(set(out)) == 4
  for line in out:  # for another machine: its own python, not this checkout's venv
    assert line.startswith("python -m alignment.main --config=configs/sft.py:tiny --workdir=W/")
    assert line.endswith("--config.train.steps=5")
  assert any("--config.optim.lr=0.001" in l and "--config.data.pack=False" in l for l in out)


def _stub(path, body):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("#!/usr/bin/env bash\n" + body + "\n")
  path.chmod(0o755)


def _printed(argv, env=None):
  return subprocess.run([sys.executable, "launch/sweep.py", "--config=configs/sft.py:tiny", *argv], cwd=REPO,
                        capture_output=True, text=True, check=True, env=env).stdout


def test_dry_run_for_slurm_is_a_job_array_that_runs_each_point_once(tmp_path):
  local = [shlex.split(line) for line in _printed(["--workdir=W", "--dry_run", "--config.train.steps=5"]).splitlines()]
  script = tmp_path / "sweep.sbatch"
  script.write_text(_printed(["--workdir=W", "--dry_run", "--launcher=slurm", "--config.train.steps=5"],
                             env=dict(os.environ, PARTITION="gpu", GPUS_PER_NODE="4")))
  head = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
  assert "--array=0-3" in head[0] and head[1].startswith("#SBATCH --gpus-per-node=4 --partition=gpu --chdir=")
  if shutil.which("shellcheck"):
    subprocess.run(["shellcheck", str(script)], check=True)
  # Each array task, run by bash where the checkout's venv python prints the arguments it was given.
  _stub(tmp_path / ".venv" / "bin" / "python", 'printf "%s\\n" "$@"')
  for task, command in enumerate(local):
    out = subprocess.run(["bash", str(script)], cwd=tmp_path, env=dict(os.environ, SLURM_ARRAY_TASK_ID=str(task)),
                         capture_output=True, text=True, check=True).stdout
    assert out.splitlines() == command[1:]


def test_dry_run_for_tpu_pods_is_one_pod_job_per_run(tmp_path):
  lines = _printed(["--workdir=gs://bucket/sweep", "--dry_run", "--launcher=tpu_pod", "--seeds=2"]).splitlines()
  assert len(lines) == 8
  _stub(tmp_path / "launch" / "tpu_pod.sh", 'printf "%s\\n" "$TPU" "$@"')
  jobs = [subprocess.run(["bash", "-c", line], cwd=tmp_path, env=dict(os.environ, TPU="slice"), capture_output=True,
                         text=True, check=True).stdout.splitlines() for line in lines]
  assert [job[0] for job in jobs] == [f"slice-{i}" for i in range(8)]  # a slice of its own each
  assert all(job[1] == "configs/sft.py:tiny" for job in jobs)
  assert len({job[2] for job in jobs}) == 8 and all(job[2].startswith("gs://bucket/sweep/") for job in jobs)
  assert ["--config.data.pack=False", "--config.optim.lr=0.003", "--config.seed=1", "--config.train.seed=1"] in [
      job[3:] for job in jobs]


def test_an_extra_argument_that_is_not_an_override_is_refused():
  proc = subprocess.run([sys.executable, "launch/sweep.py", "--config=configs/sft.py:tiny", "--workdir=W",
                         "--dry_run", "--steps=5"], cwd=REPO, capture_output=True, text=True)
  assert proc.returncode == 2 and "unrecognized arguments: --steps=5 (extra flags are --config.KEY=VALUE" in proc.stderr


def test_a_point_naming_a_missing_key_or_a_wrong_type_is_refused():
  from configs import sft
  config = sft.get_config("tiny")
  sweep.check_point(config, {"optim.lr": 1, "data.pack": False}, "here")  # an int is a fine float
  with pytest.raises(SystemExit, match="here: sweep key 'optim.lrr' is not in the config"):
    sweep.check_point(config, {"optim.lrr": 0.1}, "here")
  with pytest.raises(SystemExit, match="here: sweep key 'data.pack' is bool, got 'yes'"):
    sweep.check_point(config, {"data.pack": "yes"}, "here")


T_975_DF2 = 4.302652729911275  # Student's t, 97.5th percentile, 2 degrees of freedom (a printed table's value)


def test_two_points_three_seeds_resume_after_an_interruption_and_print_intervals(tmp_path):
  config = tmp_path / "two_points.py"
  config.write_text("from configs import sft\n\n\ndef get_config(arg=None):\n  c = sft.get_config('tiny')\n"
                    "  c.train.steps = 6\n  return c\n\n\ndef get_sweep(arg=None):\n"
                    "  return [{'optim.lr': 0.001}, {'optim.lr': 0.003}]\n")
  workdir = tmp_path / "sweep"
  cmd = [sys.executable, "launch/sweep.py", f"--config={config}", f"--workdir={workdir}", "--seeds=3"]
  # Interrupted (the sweep and the run it is in, killed) once two runs have finished.
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
  results = workdir / "sweep.jsonl"
  deadline = time.time() + 600
  while not (results.exists() and len(results.read_text().splitlines()) >= 2):
    assert proc.poll() is None and time.time() < deadline, "the sweep stopped before two runs finished"
    time.sleep(0.5)
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  finished = {json.loads(line)["workdir"] for line in results.read_text().splitlines()}
  stamps = {w: os.path.getmtime(os.path.join(w, "summary.json")) for w in finished}

  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-2000:]
  assert {w: os.path.getmtime(os.path.join(w, "summary.json")) for w in finished} == stamps  # not trained again
  rows = [json.loads(line) for line in results.read_text().splitlines()]
  assert sorted((r["point"]["optim.lr"], r["seed"]) for r in rows) == [(lr, s) for lr in (0.001, 0.003) for s in range(3)]

  for lr in ("0.001", "0.003"):
    losses = [json.loads((workdir / f"lr={lr}" / f"seed_{s}" / "summary.json").read_text())["final_loss"]
              for s in range(3)]
    assert len(set(losses)) == 3  # the seed reached the run
    mean = sum(losses) / 3
    half = T_975_DF2 * (sum((x - mean) ** 2 for x in losses) / 2) ** 0.5 / 3 ** 0.5
    (line,) = [l for l in out.stdout.splitlines() if l.startswith(f"lr={lr} ") and "final_loss" in l]
    assert line.split()[2] == "n=3"
    printed_mean, low, high = float(line.split()[3]), *map(float, line.split("[")[1].rstrip("]").split(", "))
    assert abs(printed_mean - mean) < 1e-4 and abs(low - (mean - half)) < 1e-4 and abs(high - (mean + half)) < 1e-4
  assert (workdir / "sweep.png").stat().st_size > 1000
