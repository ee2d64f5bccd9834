"""One training run's side effects, shared by every loop (supervised here, online RL in `alignment.rl`):
the workdir and its config.json, creating or restoring the state, checkpoints, metrics, timers,
progress, and the stop decision.

    resume = check_workdir(config, workdir)                   # before any data: a changed config stops here
    if resume.finished: return resume.summary
    run = Run(config, workdir, resume)
    state, meta = run.restore_or_create(parts, shardings)      # meta: what the last save stored, or None
    for step in run.steps():
      state, metrics = train_step(state, batch)
      run.count_tokens(n)
      stop = run.stop_requested(step)                          # read once per step, agreed by all hosts
      ...
      if run.should_log(step) or stop:
        run.log(step, run.step_metrics(step, metrics))
      if stop or ...: run.save(step, state, data_state)
      if stop: run.exit_stopped(step)                           # waits for the save, exits 143 (130: Ctrl-C)
    run.finish(summary)                                         # WORKDIR/summary.json, what a re-run prints

Only process 0 writes files other than checkpoints (orbax coordinates those across hosts).
"""

import contextlib
import dataclasses
import json
import os
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
INTERRUPTED_EXIT_CODE = 130  # 128 + SIGINT (Ctrl-C)
CONSOLE_EVERY_S = 30.0  # without a terminal: a progress line at least this often (on logged steps)

# Config keys a resumed run may change freely: how the run is laid out, checked, logged and saved, not
# what it computes (a prefix ending in '.' covers a whole block). `train.steps` has its own rule.
NEUTRAL_KEYS = ("mesh.", "sharding.", "kernel.", "model.remat", "model.scan_layers", "optim.grad_accum_steps",
                "train.log_every", "train.eval_every", "train.eval_at_start", "train.eval_batches",
                "train.ckpt_every", "train.ckpt_every_s", "train.max_to_keep", "train.nan_policy", "evals.",
                "data.data_dir", "dpo.ref_cache_dir", "dpo.logit_capacity", "rl.share_prompts", "rl.pack_len")


# --- a workdir's earlier run ---------------------------------------------------------------------------

@dataclasses.dataclass
class Resume:
  """What `check_workdir` found: the config changes since the run started ({key: [before, now]}; none for
  a new run), and for a finished run its saved summary."""
  changes: dict = dataclasses.field(default_factory=dict)
  finished: bool = False
  summary: Optional[dict] = None


def flat_config(config) -> dict:
  """{'optim.lr': 0.003, ...}: a config (ConfigDict or the dict config.json holds) as JSON values by dotted key."""
  tree = json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else config
  out = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, dict):
        walk(value, f"{prefix}{key}.")
      else:
        out[f"{prefix}{key}"] = value
  walk(tree, "")
  return out


def config_changes(before: dict, now: dict) -> dict:
  """{key: [before, now]} of the flat configs' differing keys (a key only one side has: None on the other)."""
  return {k: [before.get(k), now.get(k)] for k in sorted(before.keys() | now.keys()) if before.get(k) != now.get(k)}


def is_neutral(key: str) -> bool:
  return any(key == n or (n.endswith(".") and key.startswith(n)) for n in NEUTRAL_KEYS)


def started_config(workdir) -> dict:
  """The flat config a run started with, with the changes accepted since applied in order."""
  root = workdir_lib.resolve(workdir)
  config = flat_config(json.loads((root / "config.json").read_text()))
  changes_file = root / "config_changes.jsonl"
  if changes_file.exists():
    for line in changes_file.read_text().splitlines():
      if line.strip():
        config.update({k: now for k, (_, now) in json.loads(line)["changes"].items()})
  return config


def check_workdir(config, workdir, accept_changes: bool = False) -> Resume:
  """Compares `config` with the config the workdir's run started with, before anything is loaded or
  written. A change to what the run computes (model, algorithm, data, optimizer, seed, batch size) is a
  ValueError naming the keys, unless `accept_changes`; `train.steps` may grow (the line printed says what
  that does to the learning-rate schedule). A run already at its last step is `finished`, with its summary."""
  root = workdir_lib.resolve(workdir)
  latest = checkpoint.latest_step(root / "checkpoints")
  if latest is None:
    return Resume()
  if not (root / "config.json").exists():
    raise ValueError(f"{root}: has checkpoints but no config.json: use a new workdir")
  changes = config_changes(started_config(root), flat_config(config))
  if "algorithm" in changes:
    raise ValueError(f"{root} holds a {changes['algorithm'][0]!r} run (trained to step {latest}); this config is "
                     f"{changes['algorithm'][1]!r}: use a new workdir")
  trajectory = {k: v for k, v in changes.items() if not is_neutral(k) and k != "train.steps"}
  if trajectory and not accept_changes:
    listed = "; ".join(f"{k} {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in list(trajectory.items())[:6])
    listed += f"; {len(trajectory) - 6} more" if len(trajectory) > 6 else ""
    raise ValueError(f"{root} was trained to step {latest} with another config ({listed}): these change what the run "
                     f"computes; use a new --workdir, or add --accept_config_changes to continue from step {latest} "
                     f"with them (recorded in {root}/config_changes.jsonl)")
  if "train.steps" in changes:
    _say(steps_change(config, *changes["train.steps"], latest))
  if trajectory:
    _say(f"continuing from step {latest} with changed "
         f"{', '.join(f'{k} ({json.dumps(a)} -> {json.dumps(b)})' for k, (a, b) in trajectory.items())}")
  resume = Resume(changes=changes)
  if latest >= int(config.train.steps):
    resume.finished = True
    summary_file = root / "summary.json"
    resume.summary = json.loads(summary_file.read_text()) if summary_file.exists() else {"workdir": str(root)}
    _say(f"{root}: this run finished at step {latest} (train.steps={config.train.steps}); nothing to do. "
         f"To train further, raise train.steps (--config.train.steps={2 * latest}); to start over, use a new --workdir")
  return resume


def steps_change(config, before: int, now: int, latest: int) -> str:
  """What raising (or lowering) train.steps does to the learning rate from the next step on."""
  from alignment.train.optim import learning_rate_schedule
  o = config.optim
  old = float(learning_rate_schedule(o, int(before))(latest))  # optax counts from 0: step latest+1 reads count latest
  new = float(learning_rate_schedule(o, int(now))(latest))
  return (f"train.steps {before} -> {now}: the {o.schedule} schedule (warmup {o.warmup_steps}) now spans {now} steps; "
          f"the learning rate at step {latest + 1} is {new:.3g} ({old:.3g} over the former {before} steps)")


def _say(line: str) -> None:
  if jax.process_index() == 0:
    print(line, file=sys.stderr, flush=True)


# --- the stop decision -----------------------------------------------------------------------------------

class StopSignal:
  """SIGTERM (and Ctrl-C) -> a stop decision, taken once per step and the same on every host.

  One process: a handler sets a flag; `decide` reads it once. A second Ctrl-C aborts at once, without
  saving (a save in flight is left incomplete, which orbax ignores on restore). Several processes: JAX's
  preemption service (started by `jax.distributed.initialize`) catches SIGTERM on any host and picks a
  step every host reaches; `decide` asks it (orbax's `reached_preemption`), so all hosts save the same
  step. Installing a Python handler there would replace the service's own; Ctrl-C keeps its default."""

  def __init__(self, ckpt: checkpoint.Checkpointer):
    self._ckpt = ckpt
    self._multihost = jax.process_count() > 1
    self.signal = None  # the signal that asked to stop
    self._previous = {}
    if not self._multihost:
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum, frame):
    if signum == signal.SIGINT and self.signal == signal.SIGINT:
      print("\nCtrl-C again: exiting without a checkpoint", file=sys.stderr, flush=True)
      os._exit(INTERRUPTED_EXIT_CODE)
    if self.signal is None or signum == signal.SIGINT:
      self.signal = signum
    if signum == signal.SIGINT:
      print("\nCtrl-C: finishing this step and saving a checkpoint (Ctrl-C again to exit without one)",
            file=sys.stderr, flush=True)

  def decide(self, step: int) -> bool:
    if self._multihost:
      stop = self._ckpt.reached_preemption(step)
      if stop:
        self.signal = signal.SIGTERM
      return stop
    return self.signal is not None

  def close(self) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}


# --- the run ---------------------------------------------------------------------------------------------

class Run:
  """The workdir of one run and everything a loop does besides computing (module docstring)."""

  def __init__(self, config, workdir, resume: Optional[Resume] = None):
    self.config = config
    self.workdir = workdir_lib.resolve(workdir)
    self.resume = resume if resume is not None else Resume()
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
    self._steady = [0.0, 0]  # seconds and steps of logged windows after the first step (for the ETA)
    self._printed_at = 0.0
    self._last_save = time.monotonic()

  # --- state ---------------------------------------------------------------------------------------

  def restore_or_create(self, parts, shardings) -> tuple:
    """The latest checkpoint's state (re-sharded onto `shardings`) and its meta, or a new state from the
    parts' initial params and None. A new run writes config.json; a resumed one keeps it and appends the
    changes it runs with (if any) to config_changes.jsonl, with the step they take effect."""
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
      _say(f"Resumed from {self.workdir}/checkpoints at step {latest}")
    if self.is_main:  # after the checks: a run refused leaves the workdir's files as they were
      self.workdir.mkdir(parents=True, exist_ok=True)
      if latest is None:
        (self.workdir / "config.json").write_text(self.config.to_json_best_effort(indent=2))
      elif self.resume.changes:
        line = json.dumps({"step": latest + 1, "time": round(time.time(), 3), "changes": self.resume.changes})
        changes_file = self.workdir / "config_changes.jsonl"
        old = changes_file.read_text() if changes_file.exists() else ""
        changes_file.write_text(old + line + "\n")
    self.start_step = int(jax.device_get(state["step"]))
    self.writer = metrics.MetricsWriter(self.workdir, self.start_step)
    return state, meta

  def save(self, step: int, state, meta: dict) -> None:
    """An async checkpoint of `state` with `meta` (JSON: the data position, a summary)."""
    with self.timed("save"):
      if self.writer is not None:
        self.writer.flush()
      self.ckpt.save(step, state, {"step": step, **meta})
    self._last_save = time.monotonic()

  def should_save(self, step: int, stop: bool) -> bool:
    """At the last step, on a stop, every `train.ckpt_every` steps, and on a logged step once
    `train.ckpt_every_s` seconds have passed since the last save (process 0's clock, shared with every host)."""
    t = self.config.train
    if step == self.total_steps or stop or (t.ckpt_every and step % t.ckpt_every == 0):
      return True
    if not t.get("ckpt_every_s") or not self.should_log(step):
      return False
    due = time.monotonic() - self._last_save >= t.ckpt_every_s
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      due = bool(multihost_utils.broadcast_one_to_all(due))
    return due

  # --- the step loop -------------------------------------------------------------------------------

  def steps(self) -> Iterator[int]:
    """The steps still to run, with a progress bar on a terminal (plain lines otherwise, see `log`)."""
    show = self.is_main
    self.bar = tqdm(total=self.total_steps, initial=self.start_step, disable=not (show and sys.stderr.isatty()),
                    dynamic_ncols=True, mininterval=1.0, desc="train")
    self._window, self._excluded = (time.perf_counter(), self.start_step, 0), 0.0  # evals before: not in a step
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
      self._steady[0] += seconds
      self._steady[1] += step - then_step
    self._window, self._excluded = (now, step, self._tokens), 0.0
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

  def log_samples(self, step: int, samples: list) -> None:
    """Sample generations of a step, to WORKDIR/samples.jsonl (what `alignment.report` shows)."""
    if self.writer is not None and samples:
      self.writer.write_samples(step, samples)

  def log(self, step: int, record: dict) -> None:
    """Writes a logged step's record and shows it: the loss on the progress bar (a terminal), or a plain
    line on the first, every tenth and the last step and at least every CONSOLE_EVERY_S seconds; eval
    losses always (gym evals print their own line)."""
    if not record:
      return
    if self.writer is not None:
      self.writer.write(step, record)
    if not self.is_main:
      return
    evals = {k: v for k, v in record.items() if k.startswith("eval/")}  # gym evals print their own line
    if self.bar is not None and not self.bar.disable:
      if "loss" in record:
        self.bar.set_postfix(loss=f"{record['loss']:.4f}")
      if evals:
        self.bar.write(_eval_line(step, evals))
      return
    every = max(1, self.total_steps // 10)
    due = (step == self.start_step + 1 or step % every == 0 or step == self.total_steps
           or time.monotonic() - self._printed_at >= CONSOLE_EVERY_S)
    if "loss" in record and due:
      print(self._progress_line(step, record), file=sys.stderr, flush=True)
      self._printed_at = time.monotonic()
    if evals:
      print(_eval_line(step, evals), file=sys.stderr, flush=True)

  def _progress_line(self, step: int, record: dict) -> str:
    line = f"step {step}/{self.total_steps}  loss {record['loss']:.4f}"
    if "time/first_step_s" in record:
      return line + f"  first step {record['time/first_step_s']:.1f} s (compiling)"
    seconds, steps = self._steady
    if steps:
      per_step = seconds / steps
      line += f"  {per_step:.3g} s/step  ETA {_duration(per_step * (self.total_steps - step))}"
    return line

  def exit_stopped(self, step: int) -> None:
    """After a stop's save: waits for it to be on disk, then exits with 143 (SIGTERM) or 130 (Ctrl-C)."""
    interrupted = self.stop.signal == signal.SIGINT
    self.close()
    print(f"{'Ctrl-C' if interrupted else 'SIGTERM'}: saved a checkpoint at step {step} in {self.workdir}/checkpoints; "
          f"exiting (run the same command to resume)", file=sys.stderr, flush=True)
    raise SystemExit(INTERRUPTED_EXIT_CODE if interrupted else PREEMPTED_EXIT_CODE)

  def finish(self, summary: dict) -> None:
    """Closes the run and keeps its summary in WORKDIR/summary.json (what re-running a finished run prints)."""
    self.close()
    if self.is_main:
      (self.workdir / "summary.json").write_text(json.dumps(summary, indent=2))

  def close(self) -> None:
    """Waits for checkpoints in flight, closes the metrics; safe to call more than once."""
    self.stop.close()
    try:
      self.ckpt.close()
    finally:
      if self.writer is not None:
        self.writer.close()
        self.writer = None


def _eval_line(step: int, evals: dict) -> str:
  return f"step {step}  " + "  ".join(f"{k} {v:.4g}" for k, v in evals.items())


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  if seconds < 60:
    return f"{seconds} s"
  if seconds < 3600:
    return f"{seconds // 60} min {seconds % 60:02d} s"
  return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
