"""SIGTERM at every kind of moment of a run (and Ctrl-C at some): each exit leaves a checkpoint at the last
logged step, exits 143 (130), and the resumed run's losses equal the uninterrupted run's.

The signal is sent to this very process from inside the run, at the moment named (Python runs the
handler right after the call that sent it), so each window is hit on purpose, every time."""

import json
import os
import signal

import numpy as np
import pytest

from alignment import checkpoint, metrics
from alignment.main import run
from alignment.train import loop
from alignment.train.run import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, Run
from configs import sft as sft_config

STEPS = 8


def _config(tmp_path):
  config = sft_config.get_config("tiny")
  config.train.steps, config.train.ckpt_every, config.train.eval_every = STEPS, 2, 0
  config.kernel.impl = "naive"
  config.data.data_dir = str(tmp_path.parent / "tfds")
  return config


def _losses(workdir):
  return {step: r["loss"] for step, r in metrics.read_metrics(workdir).items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("preempt")
  workdir = str(tmp / "full")
  run(_config(tmp / "x"), workdir)
  return _losses(workdir)


# moment -> (what to patch, a wrapper that sends the signal at step k)
def _patch(monkeypatch, moment: str, k: int, signum=signal.SIGTERM):
  send = lambda: os.kill(os.getpid(), signum)

  if moment == "compile":  # while the train step is traced and compiled, before the first step ran
    original = loop.make_train_step

    def make(*args, **kwargs):
      step = original(*args, **kwargs)

      def traced(state, batch):
        send()
        return step(state, batch)
      return traced
    monkeypatch.setattr(loop, "make_train_step", make)
  elif moment == "mid_step":  # step k dispatched and computing (dispatch is asynchronous)
    original = Run.count_tokens
    calls = []

    def count(self, n):
      calls.append(n)
      original(self, n)
      if len(calls) == k:
        send()
    monkeypatch.setattr(Run, "count_tokens", count)
  elif moment == "after_stop_read":  # step k's stop decision just read: no stop; the next one must be
    original = Run.stop_requested

    def read(self, step):
      decision = original(self, step)
      if step == k:
        send()
      return decision
    monkeypatch.setattr(Run, "stop_requested", read)
  elif moment == "after_metrics_line":  # step k's line is in metrics.jsonl
    original = metrics.MetricsWriter.write

    def write(self, step, values):
      original(self, step, values)
      if step == k:
        send()
    monkeypatch.setattr(metrics.MetricsWriter, "write", write)
  elif moment == "during_async_save":  # the save of step k started and is writing in the background
    original = checkpoint.Checkpointer.save

    def save(self, step, state, meta):
      original(self, step, state, meta)
      if step == k:
        send()
    monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
  else:
    raise ValueError(moment)


@pytest.mark.slow
@pytest.mark.parametrize("moment, k, signum", [
    ("compile", 1, signal.SIGTERM), ("mid_step", 1, signal.SIGTERM), ("mid_step", 3, signal.SIGTERM),
    ("after_stop_read", 2, signal.SIGTERM), ("after_stop_read", 5, signal.SIGTERM),
    ("after_metrics_line", 1, signal.SIGTERM), ("after_metrics_line", 4, signal.SIGTERM),
    ("during_async_save", 2, signal.SIGTERM), ("during_async_save", 6, signal.SIGTERM),
    ("mid_step", 3, signal.SIGINT), ("after_metrics_line", 4, signal.SIGINT)])
def test_sigterm_saves_the_last_logged_step_and_the_resumed_losses_equal(tmp_path, monkeypatch, uninterrupted,
                                                                        moment, k, signum):
  config, workdir = _config(tmp_path), str(tmp_path / "run")
  handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  with monkeypatch.context() as patched:
    _patch(patched, moment, k, signum)
    with pytest.raises(SystemExit) as stopped:
      run(config, workdir)
  assert stopped.value.code == (PREEMPTED_EXIT_CODE if signum == signal.SIGTERM else INTERRUPTED_EXIT_CODE)
  logged = _losses(workdir)
  last = max(logged)
  assert last < STEPS, "the run stopped early"
  assert last == (1 if moment == "compile" else k + 1 if moment in ("after_stop_read", "after_metrics_line",
                                                                      "during_async_save") else k)
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert saved[-1] == last, (saved, last)
  assert checkpoint.restore_meta(os.path.join(workdir, "checkpoints"), last)["step"] == last
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # the run put them back

  summary = run(config, workdir)
  assert summary["start_step"] == last
  resumed = _losses(workdir)
  assert sorted(resumed) == list(range(1, STEPS + 1))
  assert [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))] == sorted(resumed)
  np.testing.assert_allclose([resumed[s] for s in resumed], [uninterrupted[s] for s in resumed], rtol=1e-6, atol=0)
