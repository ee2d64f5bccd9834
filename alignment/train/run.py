"""One training run's side effects, shared by every loop (supervised here, online RL in `alignment.rl`):
the workdir and its config.json, creating or restoring the state, checkpoints, metrics, timers,
progress, and the stop decision.

    run = Run(config, workdir)
    state, meta = run.restore_or_create(parts, shardings)      # meta: what the last save stored, or None
    for step in run.steps():
      state, metrics = train_step(state, batch)
      run.count_tokens(n)
      stop = run.stop_requested(step)                          # read once per step, agreed by all hosts
      ...
      if run.should_log(step) or stop:
        run.log(step, run.step_metrics(step, metrics))
      if stop or ...: run.save(step, state, data_state)
      if stop: run.exit_preempted(step)                         # waits for the save, exits 143
    run.close()

Only process 0 writes files other than checkpoints (orbax coordinates those across hosts).
"""

import contextlib
import signal
import sys
import time
from typing import Iterator, Optional

import jax
from tqdm import tqdm

from alignment import checkpoint, metrics
from alignment import workdir as workdir_lib
from alignment.train import state as state_lib

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM, what schedulers expect from a job that stopped on SIGTERM


class StopSignal:
  """SIGTERM -> a stop decision, taken once per step and the same on every host.

  One process: a handler sets a flag; `decide` reads it once. Several: JAX's preemption service (started
  by `jax.distributed.initialize`) catches SIGTERM on any host and picks a step every host reaches;
  `decide` asks it (orbax's `reached_preemption`), so all hosts save the same step. Installing a Python
  handler there would replace the service's own."""

  def __init__(self, ckpt: checkpoint.Checkpointer):
    self._ckpt = ckpt
    self._multihost = jax.process_count() > 1
    self._requested = False
    self._previous = None if self._multihost else signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self._requested = True

  def decide(self, step: int) -> bool:
    if self._multihost:
      return self._ckpt.reached_preemption(step)
    return self._requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class Run:
  """The workdir of one run and everything a loop does besides computing (module docstring)."""

  def __init__(self, config, workdir):
    self.config = config
    self.workdir = workdir_lib.resolve(workdir)
    self.is_main = jax.process_index() == 0
    self.total_steps = int(config.train.steps)
    self.ckpt = checkpoint.Checkpointer(self.workdir / "checkpoints", config.train.max_to_keep)
    self.stop = StopSignal(self.ckpt)
    self.start_step = 0
    self.writer: Optional[metrics.MetricsWriter] = None
    self.bar = None
    self._window = None  # (time, step, tokens) at the last logged step
    self._tokens = 0
    self._excluded = 0.0  # seconds spent in timed phases since the last logged step
    self._first_step_started = None

  # --- state ---------------------------------------------------------------------------------------

  def restore_or_create(self, parts, shardings) -> tuple:
    """The latest checkpoint's state (re-sharded onto `shardings`) and its meta, or a new state from the
    parts' initial params and None."""
    latest = self.ckpt.latest_step()
    if latest is None:
      state, meta = state_lib.create_train_state(parts, shardings, self.config.train.seed), None
    else:
      abstract = state_lib.abstract_state(parts, shardings)
      saved = self.ckpt.saved_keys(latest)
      if saved != sorted(abstract):
        raise ValueError(f"{self.workdir}/checkpoints/{latest} holds a state of {saved}; this run's state is "
                         f"{sorted(abstract)} (another algorithm, or a workdir from before the state had named "
                         f"parts): use a new workdir")
      state, meta = self.ckpt.restore(latest, abstract)
      print(f"Resumed from {self.workdir}/checkpoints at step {latest}", file=sys.stderr)
    if self.is_main:  # after the checks: a run refused leaves the workdir's config as it was
      self.workdir.mkdir(parents=True, exist_ok=True)
      (self.workdir / "config.json").write_text(self.config.to_json_best_effort(indent=2))
    self.start_step = int(jax.device_get(state["step"]))
    self.writer = metrics.MetricsWriter(self.workdir, self.start_step)
    return state, meta

  def save(self, step: int, state, meta: dict) -> None:
    """An async checkpoint of `state` with `meta` (JSON: the data position, a summary)."""
    with self.timed("save"):
      if self.writer is not None:
        self.writer.flush()
      self.ckpt.save(step, state, {"step": step, **meta})

  # --- the step loop -------------------------------------------------------------------------------

  def steps(self) -> Iterator[int]:
    """The steps still to run, with a progress bar on a terminal and a plain line every tenth of the
    run otherwise."""
    show = self.is_main
    self.bar = tqdm(total=self.total_steps, initial=self.start_step, disable=not (show and sys.stderr.isatty()),
                    dynamic_ncols=True, mininterval=1.0, desc="train")
    self._window = (time.perf_counter(), self.start_step, 0)
    self._first_step_started = time.perf_counter()
    for step in range(self.start_step + 1, self.total_steps + 1):
      yield step
      self.bar.update(1)
    self.bar.close()

  def count_tokens(self, n: int) -> None:
    """Adds a step's real (non-padding) tokens, counted on the host, to the tokens/s figure."""
    self._tokens += int(n)

  def stop_requested(self, step: int) -> bool:
    return self.stop.decide(step)

  def should_log(self, step: int) -> bool:
    return step % self.config.train.log_every == 0 or step == self.total_steps or step == self.start_step + 1

  def step_metrics(self, step: int, step_metrics) -> dict:
    """The step's metrics on the host (the one device-to-host read of a logged step) with the timing since
    the last logged step: time/step_s (time in timed phases excluded) and time/tokens_per_s; the first
    step of a process, which compiles, is logged as time/first_step_s instead."""
    record = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    now = time.perf_counter()
    then, then_step, then_tokens = self._window
    seconds = now - then - self._excluded
    if then_step == self.start_step and step == self.start_step + 1:
      record["time/first_step_s"] = seconds
    elif step > then_step:
      record["time/step_s"] = seconds / (step - then_step)
      record["time/tokens_per_s"] = (self._tokens - then_tokens) / max(seconds, 1e-9)
    self._window, self._excluded = (now, step, self._tokens), 0.0
    if "loss" in record:
      self.bar.set_postfix(loss=f"{record['loss']:.4f}")
      every = max(1, self.total_steps // 10)
      if self.is_main and self.bar.disable and (step % every == 0 or step == self.start_step + 1):
        print(f"step {step}/{self.total_steps} loss {record['loss']:.4f}", file=sys.stderr, flush=True)
    return record

  @contextlib.contextmanager
  def timed(self, phase: str, into: Optional[dict] = None):
    """Times a phase that is not a train step (eval, save): left out of time/step_s; its seconds go to
    `into['time/<phase>_s']` when given."""
    start = time.perf_counter()
    try:
      yield
    finally:
      seconds = time.perf_counter() - start
      self._excluded += seconds
      if into is not None:
        into[f"time/{phase}_s"] = into.get(f"time/{phase}_s", 0.0) + seconds

  def log(self, step: int, record: dict) -> None:
    if record and self.writer is not None:
      self.writer.write(step, record)

  def exit_preempted(self, step: int) -> None:
    """After a stop's save: waits for it to be on disk, then exits with 143."""
    self.close()
    print(f"SIGTERM: saved a checkpoint at step {step} in {self.workdir}/checkpoints; exiting",
          file=sys.stderr, flush=True)
    raise SystemExit(PREEMPTED_EXIT_CODE)

  def close(self) -> None:
    """Waits for checkpoints in flight, closes the metrics; safe to call more than once."""
    self.stop.close()
    try:
      self.ckpt.close()
    finally:
      if self.writer is not None:
        self.writer.close()
        self.writer = None
