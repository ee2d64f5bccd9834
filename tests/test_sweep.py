"""launch/sweep.py: the grid a config defines becomes one validated command per point."""

import os
import subprocess
import sys

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
