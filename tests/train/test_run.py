"""The shared run object under the supervised loop: a resumed run logs each step once, timing metrics
count the tokens that were really trained, a workdir of another algorithm is refused before anything is
written, and algorithms come from the registry."""

import json
import os
import time

import numpy as np
import pytest

from alignment import metrics
from alignment.data import chat, pipeline, sft as sft_data
from alignment.main import run
from alignment.train import loop, registry
from configs import dpo as dpo_config, sft as sft_config


def _config(tmp_path, module=sft_config, **train):
  config = module.get_config("tiny")
  config.kernel.impl = "naive"
  config.data.data_dir = str(tmp_path / "tfds")
  config.train.eval_every = 0
  for key, value in train.items():
    config.train[key] = value
  return config


def _lines(workdir):
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _run_crashing_after(monkeypatch, config, workdir, last_step):
  """`run` with a crash right after step `last_step`'s metrics line is written."""
  original = metrics.MetricsWriter.write

  def write_then_crash(self, step, values):
    original(self, step, values)
    if step == last_step:
      raise RuntimeError("simulated crash")

  with monkeypatch.context() as patched:
    patched.setattr(metrics.MetricsWriter, "write", write_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
      run(config, workdir)


@pytest.mark.slow
def test_a_resumed_run_logs_each_step_once(tmp_path, monkeypatch):
  config, workdir = _config(tmp_path, steps=6, ckpt_every=3), str(tmp_path / "run")
  _run_crashing_after(monkeypatch, config, workdir, 5)
  assert [r["step"] for r in _lines(workdir)] == [1, 2, 3, 4, 5]  # 4 and 5 came after the checkpoint at 3
  run(config, workdir)
  assert [r["step"] for r in _lines(workdir)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_timing_metrics_count_the_real_tokens_of_each_step(tmp_path, monkeypatch):
  config, workdir = _config(tmp_path, steps=4, eval_at_start=True), str(tmp_path / "run")
  evaluate = loop.evaluate
  monkeypatch.setattr(loop, "evaluate", lambda *a, **k: (time.sleep(2.0), evaluate(*a, **k))[1])  # a long eval
  run(config, workdir)
  records = {r["step"]: r for r in _lines(workdir)}
  assert "time/first_step_s" in records[1] and "time/step_s" not in records[1]
  # The eval before the first step is timed apart, and not taken out of the first step's time again:
  # the first step's time is what passed between the two metrics lines.
  assert records[0]["time/eval_s"] >= 2.0
  assert abs(records[1]["time/first_step_s"] - (records[1]["time"] - records[0]["time"])) < 1.0
  d = config.data
  sources = sft_data.prepare_sft(d.train_path, data_dir=d.data_dir, eval_fraction=d.eval_fraction)
  batches = pipeline.make_sft_iterator(sources["train"], tokenizer=chat.load_tokenizer(), template=chat.load_template(),
                                       seq_len=d.seq_len, batch_size=config.train.batch_size, seed=d.seed)
  real = [int(np.count_nonzero(next(batches)["segment_ids"])) for _ in range(4)]
  for step in (2, 3, 4):
    r = records[step]
    assert r["time/step_s"] > 0
    assert r["time/tokens_per_s"] * r["time/step_s"] == pytest.approx(real[step - 1], rel=1e-6)


def test_a_workdir_of_another_algorithm_is_refused_and_keeps_its_config(tmp_path):
  workdir = str(tmp_path / "run")
  run(_config(tmp_path, steps=1), workdir)
  with pytest.raises(ValueError, match=r"run holds a 'sft' run \(trained to step 1\); this config is 'dpo': "
                                       r"use a new workdir"):
    run(_config(tmp_path, dpo_config, steps=1), workdir)
  assert json.load(open(os.path.join(workdir, "config.json")))["algorithm"] == "sft"


def test_unknown_algorithm_names_the_known_ones():
  with pytest.raises(ValueError, match=r"config.algorithm='ppo_typo'; expected one of \['classifier', 'dpo', 'grpo', 'ppo', 'rm', 'sft'"):
    registry.get("ppo_typo")
  assert registry.get("sft") is registry.get("sft")


def test_what_a_job_cannot_do_is_refused_before_anything_loads(monkeypatch):
  import jax
  from alignment.parallel import make_mesh
  from alignment.train.loop import check_run_config
  mesh = make_mesh({"data": 4, "fsdp": 2})
  config = dpo_config.get_config("tiny")
  config.evals.every = 5
  check_run_config(config, mesh)  # one host: fine
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match=r"config.evals.every=5: gym evals during training run on one host; this job "
                                       r"has 2: set it to 0"):
    check_run_config(config, mesh)
  config.evals.every, config.train.nan_policy = 0, "ignore"
  with pytest.raises(ValueError, match=r"config.train.nan_policy='ignore'; expected one of 'skip', 'halt'"):
    check_run_config(config, mesh)
  config.train.nan_policy, config.train.batch_size = "skip", 12
  with pytest.raises(ValueError, match=r"config.train.batch_size=12 must be divisible by data x fsdp \(8\)"):
    check_run_config(config, mesh)


@pytest.mark.slow
def test_a_run_with_a_frozen_embedding_resumes_with_the_losses_of_one_that_was_not_stopped(tmp_path, monkeypatch):
  """The frozen embedding keeps no optimizer state (`optim.make_optimizer`): the saved state still restores."""
  config = _config(tmp_path, steps=5, ckpt_every=3)
  config.model.frozen_layers, config.model.frozen_embeddings = 1, True
  losses = lambda workdir: [r["loss"] for r in _lines(workdir)]
  run(config, str(tmp_path / "whole"))
  _run_crashing_after(monkeypatch, config, str(tmp_path / "resumed"), 4)
  assert run(config, str(tmp_path / "resumed"))["start_step"] == 3
  assert [r["step"] for r in _lines(str(tmp_path / "resumed"))] == [1, 2, 3, 4, 5]
  np.testing.assert_allclose(losses(str(tmp_path / "resumed")), losses(str(tmp_path / "whole")), rtol=1e-6)
