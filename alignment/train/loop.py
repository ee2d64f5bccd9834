"""The supervised loop (SFT, reward modeling, DPO): a batch, a step, on the shared `Run`.

Everything that can fail on bad input (config, mesh, data) fails before the workdir is touched.
"""

import functools
import sys

import jax
import numpy as np

from alignment import choices
from alignment.parallel import batch_sharding, make_mesh, replicated, shard_batch
from alignment.train import gym_eval
from alignment.train import state as state_lib
from alignment.train.gym_eval import GymEvaluator
from alignment.train.model import check_model_source
from alignment.train.run import Run, check_workdir
from alignment.train.step import make_eval_step, make_train_step
from alignment.train.task import Task


def check_run_config(config, mesh) -> None:
  """What the config asks of the job, checked before any data or model is loaded."""
  rows = mesh.shape["data"] * mesh.shape["fsdp"] * config.optim.grad_accum_steps
  if config.train.batch_size % rows:
    raise ValueError(f"config.train.batch_size={config.train.batch_size} must be divisible by data x fsdp "
                     f"({mesh.shape['data'] * mesh.shape['fsdp']}) x config.optim.grad_accum_steps "
                     f"({config.optim.grad_accum_steps})")
  choices.check_config(config)
  check_model_source(config.model.name, "config.model.name", generating=False)
  if config.get("evals") and config.evals.every and jax.process_count() > 1:
    raise ValueError(f"config.evals.every={config.evals.every}: gym evals during training run on one host; this "
                     f"job has {jax.process_count()}: set it to 0 and evaluate the checkpoints with "
                     f"`python -m alignment.evaluate --model=WORKDIR`")


def batch_tokens(batch) -> int:
  """Real (non-padding) tokens of a global batch, counted on the host."""
  return int(np.count_nonzero(batch["segment_ids"]))


def evaluate(eval_step, eval_data, mesh, max_batches: int) -> dict:
  """Mean of the loss (and aux) over up to `max_batches` eval batches, normalised by the total count.
  Every host walks the same global batches, so all run the same number of steps."""
  sums = None
  for i, batch in enumerate(eval_data()):
    if max_batches and i >= max_batches:
      break
    out = jax.device_get(eval_step(shard_batch(batch, mesh)))
    sums = out if sums is None else {k: sums[k] + out[k] for k in out}
  if sums is None:
    return {}
  denom = max(float(sums.pop("count")), 1.0)
  return {f"eval/{k}": float(v) / denom for k, v in sums.items()}


def check_finite(config, run: Run, state, step: int, record: dict, seen: int) -> int:
  """Reports updates skipped for a non-finite loss or gradient norm since the last logged step (the step
  itself left params and optimizer state alone); with nan_policy 'halt', logs this step and stops the run,
  naming the first such step. Returns the number skipped so far."""
  skipped = int(record["train/skipped_steps"])
  if skipped == seen:
    return skipped
  first = int(jax.device_get(state["first_skipped_step"]))
  where = f"step {first}" if skipped - seen == 1 else f"{skipped - seen} steps up to {step} (the first: {first})"
  if config.train.nan_policy == "halt":
    run.log(step, record)
    latest = run.ckpt.latest_step()
    raise FloatingPointError(f"{where}: the loss or the gradient norm is not finite (config.train.nan_policy=halt); "
                             f"the last checkpoint ({'none' if latest is None else latest}) is intact")
  print(f"warning: {where}: the loss or the gradient norm is not finite; the update was skipped "
        f"(config.train.nan_policy=skip)", file=sys.stderr, flush=True)
  return skipped


def train(config, workdir: str, build_task, accept_config_changes: bool = False) -> dict:
  """Runs (or resumes) `config.train.steps` steps of `build_task(config, mesh) -> Task` in `workdir`.

  Returns a summary dict (first/final loss, steps, eval metrics) that is also printed as JSON; a run
  already finished returns the summary it saved, and a resume with a changed config is refused unless
  `accept_config_changes` (`alignment.train.run.check_workdir`).
  """
  mesh = make_mesh(config.mesh)
  check_run_config(config, mesh)
  resume = check_workdir(config, workdir, accept_config_changes)
  if resume.finished:
    return resume.summary
  rules = tuple(tuple(r) for r in config.sharding.rules)
  task: Task = build_task(config, mesh)
  shardings = state_lib.state_shardings(task.parts, mesh, rules)
  parts_sharding = {name: shardings[name] for name in task.parts}
  optimizers = state_lib.trained(task.parts)

  gym = GymEvaluator(config, task, workdir) if config.get("evals") and config.evals.every else None
  run = Run(config, workdir, resume)
  try:
    state, meta = run.restore_or_create(task.parts, shardings)
    if meta is not None:
      task.train_data.set_state(meta["data"])
    summary = {"workdir": str(run.workdir), "start_step": run.start_step, **task.info}
    with jax.set_mesh(mesh):
      first = next(task.train_data)
      train_step = jax.jit(make_train_step(task.loss_fn, optimizers, config.optim.grad_accum_steps, task.count_name),
                           in_shardings=(shardings, {k: batch_sharding(mesh, np.ndim(v)) for k, v in first.items()}),
                           out_shardings=(shardings, replicated(mesh)), donate_argnums=0)
      eval_step = jax.jit(make_eval_step(task.loss_fn), in_shardings=(parts_sharding, None),
                          out_shardings=replicated(mesh))
      parts = lambda: state_lib.parts_of(state)
      run_eval = lambda: evaluate(functools.partial(eval_step, parts()), task.eval_data, mesh,
                                  config.train.eval_batches)
      if run.start_step == 0 and config.train.eval_at_start and (task.eval_data is not None or gym is not None):
        at_start = {}
        with run.timed("eval", at_start):
          if task.eval_data is not None:
            at_start.update(run_eval())
            summary.update({k.replace("eval/", "eval_at_start/"): v for k, v in at_start.items()
                            if k.startswith("eval/")})
          if gym is not None:
            at_start.update(gym.run(0, parts()))
        run.log(0, at_start)
      batch, skipped = first, int(jax.device_get(state["skipped_steps"]))
      for step in run.steps():
        if step > run.start_step + 1:
          batch = next(task.train_data)
        state, step_metrics = train_step(state, shard_batch(batch, mesh))
        run.count_tokens(batch_tokens(batch))
        stop = run.stop_requested(step)
        last = step == config.train.steps
        save = run.should_save(step, stop)
        record = {}
        if run.should_log(step) or save:  # a save follows a logged step, whose checks it relies on
          record = run.step_metrics(step, step_metrics)
          skipped = check_finite(config, run, state, step, record, skipped)
          summary.setdefault("first_loss", record["loss"])
          summary["final_loss"] = record["loss"]
        if task.eval_data is not None and config.train.eval_every and (
            step % config.train.eval_every == 0 or last):
          with run.timed("eval", record):
            record.update(run_eval())
          summary.update({k: v for k, v in record.items() if k.startswith("eval/")})
        if gym is not None:
          gym.at_step(run, step, last, parts, record, summary)
        save_meta = None
        if save:
          save_meta = {"data": task.train_data.get_state()}
          if last and task.summarize is not None:
            save_meta["summary"] = task.summarize(parts())
            summary.update(save_meta["summary"])
            record.update(save_meta["summary"])
        run.log(step, record)
        if save_meta is not None:
          run.save(step, state, save_meta)
        if stop and not last:
          run.exit_stopped(step)
    finish(run, config, summary, skipped, gym)
  finally:
    run.close()
  return summary


def finish(run: Run, config, summary: dict, skipped: int, gym) -> None:
  """Completes a finished run's summary (steps, skipped updates, gym reports) and saves it."""
  summary["steps"] = config.train.steps
  summary["skipped_steps"] = skipped
  if gym is not None:
    summary["gym_reports"] = [str(p) for p in gym_eval.reports(run.workdir)]
  run.finish(summary)
