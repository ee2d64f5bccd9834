"""launch/sweep.py: the grid a config defines becomes one validated command per point."""

import json
import os
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
