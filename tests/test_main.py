"""The entry point end to end: a tiny SFT run, resume after SIGTERM or a crash, and bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from alignment import metrics
from configs import sft as sft_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(workdir, *overrides, config="configs/sft.py:tiny", data_dir=None, wait=True):
  cmd = [sys.executable, "-m", "alignment.main", f"--config={config}", f"--workdir={workdir}",
         f"--config.data.data_dir={data_dir or os.path.join(os.path.dirname(str(workdir)), 'tfds')}",
         "--config.kernel.impl=naive", *overrides]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  if not wait:
    return proc
  out, err = proc.communicate(timeout=600)
  return proc.returncode, out, err


def _losses(workdir):
  return {step: r["loss"] for step, r in metrics.read_metrics(str(workdir)).items()}


@pytest.mark.slow
def test_tiny_sft_halves_the_loss_and_writes_metrics_tensorboard_and_a_checkpoint(tmp_path):
  workdir = tmp_path / "run"
  rc, out, err = _main(workdir)
  assert rc == 0, err[-3000:]
  summary = json.loads(out[out.index("{"):])
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, summary["steps"] + 1))
  assert losses[summary["steps"]] < 0.5 * losses[1], (losses[1], losses[summary["steps"]])
  assert summary["final_loss"] == pytest.approx(losses[summary["steps"]])
  assert "eval/loss" in metrics.read_metrics(str(workdir))[summary["steps"]]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
  assert os.listdir(workdir / "checkpoints") == [str(summary["steps"])]
  assert (workdir / "checkpoints" / str(summary["steps"]) / "state").is_dir()


RESUME = ("--config.train.steps=30", "--config.train.ckpt_every=5", "--config.train.eval_every=0")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("resume") / "full"
  rc, _, err = _main(workdir, *RESUME)
  assert rc == 0, err[-3000:]
  return _losses(workdir)


@pytest.mark.slow
def test_resume_after_sigterm_reproduces_the_losses(tmp_path, uninterrupted):
  workdir = tmp_path / "run"
  proc = _main(workdir, *RESUME, wait=False)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(workdir / "metrics.jsonl") and len(_losses(workdir)) >= 3:
      proc.send_signal(signal.SIGTERM)
      break
    time.sleep(0.02)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 143, err[-3000:]
  assert "Traceback" not in err
  stopped_at = max(_losses(workdir))
  assert stopped_at < 30 and os.listdir(workdir / "checkpoints")  # it stopped early and saved
  assert str(stopped_at) in os.listdir(workdir / "checkpoints")
  rc, _, err = _main(workdir, *RESUME)
  assert rc == 0, err[-3000:]
  resumed = _losses(workdir)
  assert sorted(resumed) == list(range(1, 31))
  lines = [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]
  assert lines == list(range(1, 31))  # one row per step, none twice
  np.testing.assert_allclose([resumed[s] for s in range(1, 31)], [uninterrupted[s] for s in range(1, 31)],
                             rtol=0, atol=1e-6)


@pytest.mark.slow
def test_resume_after_an_exception_reproduces_the_losses(tmp_path, uninterrupted, monkeypatch):
  from alignment.main import run
  config = sft_config.get_config("tiny")
  config.train.steps, config.train.ckpt_every, config.train.eval_every = 30, 5, 0
  config.kernel.impl = "naive"
  config.data.data_dir = str(tmp_path / "tfds")
  workdir = str(tmp_path / "run")

  original = metrics.MetricsWriter.write

  def crash_at_step_13(self, step, values):
    if step == 13:
      raise RuntimeError("simulated crash")
    original(self, step, values)

  monkeypatch.setattr(metrics.MetricsWriter, "write", crash_at_step_13)
  with pytest.raises(RuntimeError, match="simulated crash"):
    run(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "5"]
  monkeypatch.setattr(metrics.MetricsWriter, "write", original)
  run(config, workdir)
  resumed = _losses(workdir)
  np.testing.assert_allclose([resumed[s] for s in range(1, 31)], [uninterrupted[s] for s in range(1, 31)],
                             rtol=0, atol=1e-6)


def _bad_jsonl(tmp_path):
  path = tmp_path / "bad.jsonl"
  good = json.dumps({"prompt": "hi", "completion": "hello"})
  path.write_text("\n".join([good, good, '{"prompt": "hi", "completion": ']) + "\n")
  return path


CHOICE_ERRORS = {  # a value outside a key's choices: refused before anything is imported beyond the config
    "bad_kernel_impl": (["--config.kernel.impl=fast"], "config.kernel.impl='fast'; expected one of 'auto', 'naive'"),
    "bad_remat": (["--config.model.remat=some"], "config.model.remat='some'; expected one of 'none', 'full'"),
    "bad_schedule": (["--config.optim.schedule=cos"], "config.optim.schedule='cos'; expected one of 'cosine'"),
    "bad_preset_arg": ([], "config argument 'steps=abc': steps takes an int, got 'abc'"),
}


@pytest.mark.parametrize("case", ["unknown_key", "wrong_type", "bad_mesh", "malformed_jsonl", "missing_comma_jsonl",
                                  "empty_dataset", *CHOICE_ERRORS])
def test_bad_input_fails_with_one_line_and_writes_nothing(tmp_path, case):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  swapped = tmp_path / "swapped.jsonl"
  swapped.write_text(json.dumps({"prompt": "hi", "completion": "hello"}) + '\n{"prompt": "hi" "completion": "x"}\n')
  args, expected = {
      "unknown_key": (["--config.optim.lrr=0.1"], "--config.optim.lrr: no such config key 'lrr'"),
      "wrong_type": (["--config.train.steps=ten"], "--config.train.steps=ten"),
      "bad_mesh": (["--config.mesh.data=3"], "config.mesh {'data': 3, 'fsdp': 1, 'tensor': 1} needs 3 devices"),
      "malformed_jsonl": ([f"--config.data.train_path={_bad_jsonl(tmp_path)}"],
                          f"{tmp_path / 'bad.jsonl'}:3: malformed JSON (Expecting value at the end of the line)"),
      "missing_comma_jsonl": ([f"--config.data.train_path={swapped}"],  # column 17: where "completion" starts
                          f"{swapped}:2: malformed JSON (Expecting ',' delimiter at column 17)"),
      "empty_dataset": ([f"--config.data.train_path={empty}"], str(empty)),
      **CHOICE_ERRORS,
  }[case]
  workdir = tmp_path / "run"
  start = time.perf_counter()
  rc, out, err = _main(workdir, *args, config="configs/sft.py:tiny,steps=abc" if case == "bad_preset_arg" else
                       "configs/sft.py:tiny")
  seconds = time.perf_counter() - start
  lines = [line for line in err.splitlines() if line.strip()]
  assert rc == 2
  assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err[-2000:]
  if case in CHOICE_ERRORS:  # decided from the config alone: no JAX, no data (0.2 s on a 2-core machine)
    assert seconds < 1.0, seconds
  assert not workdir.exists()
  assert not list((tmp_path / "tfds").rglob("dataset_info.json"))  # no prepared dataset either
