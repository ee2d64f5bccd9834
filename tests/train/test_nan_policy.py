"""A non-finite loss or gradient at one step: `skip` leaves params and optimizer state as they were and
goes on; `halt` stops naming the step, with the last good checkpoint intact.

The NaN comes from the data: a registered algorithm ('sft_poisoned', SFT with a `poison` feature that
is NaN in one batch and 0 elsewhere) multiplies the loss by (1 + poison), so loss and gradients are both
NaN at exactly that step and untouched at every other."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from alignment import checkpoint, metrics
from alignment.main import run
from alignment.train import registry, sft
from configs import sft as sft_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BAD_STEP = 5


class _Poisoned:
  """The SFT batches, the `step`-th (1-based) with a NaN poison feature; the position round-trips."""

  def __init__(self, inner, step: int):
    self.inner, self.step, self.count = inner, step, 0

  def __next__(self):
    batch = dict(next(self.inner))
    self.count += 1
    batch["poison"] = np.full(batch["inputs"].shape[:1], np.nan if self.count == self.step else 0.0, np.float32)
    return batch

  def get_state(self):
    return {"inner": self.inner.get_state(), "count": self.count}

  def set_state(self, state):
    self.inner.set_state(state["inner"])
    self.count = state["count"]


def register_poisoned():
  @registry.supervised("sft_poisoned")
  def build_task(config, mesh):
    task = sft.build_task(config, mesh)
    inner_loss = task.loss_fn

    def loss_fn(parts, batch, rng):
      loss, (count, aux) = inner_loss(parts, batch, rng)
      return loss * (1.0 + batch["poison"].sum()), (count, aux)

    task.loss_fn = loss_fn
    task.train_data = _Poisoned(task.train_data, int(os.environ.get("POISON_STEP", BAD_STEP)))
    return task


def _config(tmp_path, policy):
  config = sft_config.get_config("tiny")
  config.algorithm = "sft_poisoned"
  config.train.steps, config.train.ckpt_every, config.train.max_to_keep = 8, 1, 10
  config.train.eval_every, config.train.nan_policy = 0, policy
  config.kernel.impl = "naive"
  config.data.data_dir = str(tmp_path / "tfds")
  return config


@pytest.mark.slow
def test_skip_leaves_params_and_optimizer_state_untouched_and_goes_on(tmp_path):
  register_poisoned()
  workdir = str(tmp_path / "run")
  summary = run(_config(tmp_path, "skip"), workdir)
  logged = metrics.read_metrics(workdir)
  assert summary["skipped_steps"] == 1 and summary["steps"] == 8
  assert [logged[s]["train/skipped_steps"] for s in range(1, 9)] == [0] * (BAD_STEP - 1) + [1] * (9 - BAD_STEP)
  assert np.isnan(logged[BAD_STEP]["loss"]) and np.isnan(logged[BAD_STEP]["grad_norm"])
  assert all(np.isfinite(logged[s]["loss"]) for s in range(1, 9) if s != BAD_STEP)

  directory = os.path.join(workdir, "checkpoints")
  entry = lambda key, step: jax.device_get(checkpoint.restore_entry(directory, key, step=step)[0])
  equal = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)
  for key in ("policy", "opt_state"):
    equal(entry(key, BAD_STEP), entry(key, BAD_STEP - 1))  # the bad step changed nothing
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), entry("policy", BAD_STEP + 1), entry("policy", BAD_STEP))
  assert all(jax.tree.leaves(moved))  # and the next one trained as usual
  assert logged[BAD_STEP + 1]["loss"] < logged[BAD_STEP - 1]["loss"]


@pytest.mark.slow
def test_halt_exits_nonzero_naming_the_step_with_the_last_checkpoint_intact(tmp_path):
  config = _config(tmp_path, "halt")
  config.train.ckpt_every = 2
  workdir = tmp_path / "run"
  code = ("import sys; from tests.train.test_nan_policy import register_poisoned; register_poisoned(); "
          "from absl import app; from alignment import console, main; app.run(main.main, flags_parser=console.parse_config_flags)")
  args = ["--config=configs/sft.py:tiny", f"--workdir={workdir}", "--config.algorithm=sft_poisoned",
          "--config.train.steps=8", "--config.train.ckpt_every=2", "--config.train.eval_every=0",
          "--config.train.nan_policy=halt", "--config.kernel.impl=naive", f"--config.data.data_dir={tmp_path / 'tfds'}"]
  proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode != 0
  assert lines[-1].startswith("error: ") and f"step {BAD_STEP}:" in lines[-1] and "nan_policy=halt" in lines[-1], \
      proc.stderr[-2000:]
  assert "last checkpoint (4) is intact" in lines[-1] and "Traceback" not in proc.stderr
  assert sorted(int(s) for s in os.listdir(workdir / "checkpoints")) == [2, 4]
  logged = metrics.read_metrics(str(workdir))
  assert max(logged) == BAD_STEP and logged[BAD_STEP]["train/skipped_steps"] == 1  # the bad step is in the log

  # The checkpoint at 4 is the state a clean run has at 4.
  clean = str(tmp_path / "clean")
  config.train.nan_policy = "skip"
  os.environ["POISON_STEP"] = "0"
  try:
    register_poisoned()
    run(config, clean)
  finally:
    del os.environ["POISON_STEP"]
  get = lambda w: jax.device_get(checkpoint.restore_entry(os.path.join(w, "checkpoints"), "policy", step=4)[0])
  jax.tree.map(np.testing.assert_array_equal, get(str(workdir)), get(clean))
