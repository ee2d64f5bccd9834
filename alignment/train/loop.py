"""The training loop shared by every algorithm: state, jitted step, eval, metrics, checkpoints, resume.

Everything that can fail on bad input (config, mesh, data) fails before the workdir is touched.
"""

import functools
import json
import math
import os
import signal
import sys

import jax
import numpy as np
from tqdm import tqdm

from alignment import checkpoint, metrics
from alignment.parallel import batch_sharding, host_batch_to_global, make_mesh, replicated
from alignment.train import gym_eval
from alignment.train import state as state_lib
from alignment.train.gym_eval import GymEvaluator
from alignment.train.optim import make_optimizer
from alignment.train.step import make_eval_step, make_train_step
from alignment.train.task import Task


class _StopRequest:
  """Turns SIGTERM into a flag the loop reads between steps, so the step in flight completes."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    self.requested = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous)


def _all_hosts_data_state(data_state: dict) -> list:
  """Every host's iterator position (they differ: each reads its own shard), in process order."""
  if jax.process_count() == 1:
    return [data_state]
  from jax.experimental import multihost_utils
  encoded = np.frombuffer(json.dumps(data_state).encode(), np.uint8)
  length = int(np.max(multihost_utils.process_allgather(np.array([encoded.size]))))
  padded = np.zeros(length, np.uint8)
  padded[:encoded.size] = encoded
  gathered = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(row).rstrip(b"\0").decode()) for row in np.asarray(gathered)]


def _batch_shardings(batch, mesh):
  return {k: batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}


def evaluate(eval_step, eval_data, mesh, max_batches: int) -> dict:
  """Mean of the loss (and aux) over up to `max_batches` eval batches, normalised by the total count."""
  sums = None
  for i, host_batch in enumerate(eval_data()):
    if max_batches and i >= max_batches:
      break
    out = jax.device_get(eval_step(host_batch_to_global(host_batch, mesh)))
    sums = out if sums is None else {k: sums[k] + out[k] for k in out}
  if sums is None:
    return {}
  denom = max(float(sums.pop("count")), 1.0)
  return {f"eval/{k}": float(v) / denom for k, v in sums.items()}


def train(config, workdir: str, build_task) -> dict:
  """Runs (or resumes) `config.train.steps` steps of `build_task(config, mesh) -> Task` in `workdir`.

  Returns a summary dict (first/final loss, steps, eval metrics) that is also printed as JSON.
  """
  mesh = make_mesh(config.mesh)
  rules = tuple(tuple(r) for r in config.sharding.rules)
  host_batch_size = config.train.batch_size // jax.process_count()
  if config.train.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"] * config.optim.grad_accum_steps):
    raise ValueError(f"config.train.batch_size={config.train.batch_size} must be divisible by data x fsdp "
                     f"({mesh.shape['data'] * mesh.shape['fsdp']}) x config.optim.grad_accum_steps "
                     f"({config.optim.grad_accum_steps})")
  task: Task = build_task(config, mesh, host_batch_size)
  gym = GymEvaluator(config, task, workdir) if config.get("evals") and config.evals.every else None

  tx, schedule = make_optimizer(config.optim, config.train.steps,
                                frozen_layers=config.model.get("frozen_layers", 0),
                                frozen_embeddings=config.model.get("frozen_embeddings", False))
  params_sharding = state_lib.param_shardings(task.spec, mesh, rules)
  shardings = state_lib.state_shardings(tx, task.spec.abstract_params, params_sharding, mesh,
                                        with_frozen=task.load_frozen is not None)

  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), config.train.max_to_keep)
  latest = ckpt.latest_step()
  if latest is None:
    frozen = task.load_frozen(params_sharding) if task.load_frozen else None
    state = state_lib.create_train_state(task.load_params(params_sharding), tx, shardings, config.train.seed,
                                         frozen)
  else:
    state, meta = ckpt.restore(latest, state_lib.abstract_state(shardings, task.spec.abstract_params, tx))
    if len(meta["data"]) != jax.process_count():
      raise ValueError(f"checkpoint at step {latest} was written by {len(meta['data'])} hosts; this job has "
                       f"{jax.process_count()} (the data position is per host)")
    task.train_data.set_state(meta["data"][jax.process_index()])
    print(f"Resumed from {workdir}/checkpoints at step {latest}", file=sys.stderr)

  writer = metrics.MetricsWriter(workdir)
  stop = _StopRequest()
  start = int(jax.device_get(state["step"]))
  summary = {"workdir": os.path.abspath(workdir), "start_step": start, **task.info}
  try:
    with jax.set_mesh(mesh):
      first = next(task.train_data)
      train_step = jax.jit(make_train_step(task.loss_fn, tx, schedule, config.optim.grad_accum_steps,
                                           task.count_name),
                           in_shardings=(shardings, _batch_shardings(first, mesh)),
                           out_shardings=(shardings, replicated(mesh)), donate_argnums=0)
      eval_step = jax.jit(make_eval_step(task.loss_fn),
                          in_shardings=(params_sharding, shardings.get("frozen"), None))
      host_batch = first
      show = jax.process_index() == 0
      bar = tqdm(total=config.train.steps, initial=start, disable=not (show and sys.stderr.isatty()),
                 dynamic_ncols=True, mininterval=1.0, desc="train")
      every = max(1, config.train.steps // 10)  # without a terminal: a plain line every tenth of the run
      if start == 0 and config.train.eval_at_start and (task.eval_data is not None or gym is not None):
        at_start = {}
        if task.eval_data is not None:
          at_start = evaluate(functools.partial(eval_step, state["params"], state.get("frozen")), task.eval_data,
                              mesh, config.train.eval_batches)
          summary.update({k.replace("eval/", "eval_at_start/"): v for k, v in at_start.items()})
        if gym is not None:
          at_start.update(gym.run(0, state["params"], state.get("frozen")))
        writer.write(0, at_start)
      for step in range(start + 1, config.train.steps + 1):
        if step > start + 1:
          host_batch = next(task.train_data)
        state, step_metrics = train_step(state, host_batch_to_global(host_batch, mesh))
        record = {}
        if step % config.train.log_every == 0 or step == config.train.steps or step == start + 1:
          record = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
          if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"loss is {record['loss']} at step {step}")
          summary.setdefault("first_loss", record["loss"])
          summary["final_loss"] = record["loss"]
          bar.set_postfix(loss=f"{record['loss']:.4f}")
          if show and bar.disable and (step % every == 0 or step == start + 1):
            print(f"step {step}/{config.train.steps} loss {record['loss']:.4f}", file=sys.stderr, flush=True)
        if task.eval_data is not None and config.train.eval_every and (
            step % config.train.eval_every == 0 or step == config.train.steps):
          record.update(evaluate(functools.partial(eval_step, state["params"], state.get("frozen")),
                                 task.eval_data, mesh, config.train.eval_batches))
          summary.update({k: v for k, v in record.items() if k.startswith("eval/")})
        if gym is not None:
          gym.observe(record)
          if step % config.evals.every == 0 or step == config.train.steps:
            record.update(gym.run(step, state["params"], state.get("frozen")))
            summary.update({k: v for k, v in record.items() if k.startswith(("gym/", "monitor/"))})
        last = step == config.train.steps
        meta = None
        if last or stop.requested or (config.train.ckpt_every and step % config.train.ckpt_every == 0):
          meta = {"data": _all_hosts_data_state(task.train_data.get_state()), "step": step}
          if last and task.summarize is not None:
            meta["summary"] = task.summarize(state["params"], state.get("frozen"))
            summary.update(meta["summary"])
            record.update(meta["summary"])
        if record:
          writer.write(step, record)
        bar.update(1)
        if meta is not None:
          ckpt.save(step, state, meta)
        if stop.requested and not last:
          ckpt.close()
          print(f"SIGTERM: saved a checkpoint at step {step} in {workdir}/checkpoints; exiting",
                file=sys.stderr)
          raise SystemExit(143)
      bar.close()
  finally:
    stop.restore()
    writer.close()
    ckpt.close()
  summary["steps"] = config.train.steps
  if gym is not None:
    summary["gym_reports"] = gym_eval.reports(workdir)
  return summary
