"""The online loop: sample, reward, score, update, on the shared `Run` (algorithms `ppo` and `grpo`).

One iteration (one `train.steps` step):
  1. generate  G completions for each of `rl.prompts_per_step` prompts with the live policy (DAPO's dynamic
               sampling draws again, up to `rl.max_draws` times, until the batch holds groups whose rewards differ)
  2. reward    the named rewards on the decoded text (`alignment.rl.rewards`), mixed with their weights
  3. score     the trainer's log-probs of the sampled tokens (the ratio's base; their gap to the sampler's
               is `rollout/logprob_mismatch`), the reference's and the value model's
  4. advantages critic-free from the sequence rewards, or GAE over token rewards (PPO)
  5. update    `rl.epochs` passes over `rl.minibatches` shuffled minibatches, one optimizer step each,
               for every trained part (policy; PPO's value model with its own optimizer)
The sampling key of step s is fold_in(seed, s) and the prompt stream's position and the adaptive KL
coefficient are saved with each checkpoint, so a resumed run continues the uninterrupted one.
"""

import time
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from alignment import checkpoint, choices
from alignment.losses import grpo as grpo_losses
from alignment.losses import ppo as ppo_losses
from alignment.models import sampler as sampler_lib
from alignment.models.tokenizer import Tokenizer, with_chat_template
from alignment.parallel import make_mesh, replicated, shard_batch
from alignment.rl import objective, presets, prompts as prompts_lib, rewards as rewards_lib, rollout
from alignment.train import gym_eval, registry
from alignment.train import rm as rm_lib
from alignment.train import state as state_lib
from alignment.train.loop import check_finite, finish
from alignment.train.model import check_model_source, setup_model
from alignment.train.optim import make_optimizer
from alignment.train.run import Run, check_workdir
from alignment.train.step import make_train_step, split_micro_batches
from alignment.train.task import tokenizer_and_template


def chat_tokenizer(config, model_tokenizer) -> Tokenizer:
  """The policy's tokenizer with a chat template and an end-of-turn id that stops sampling: the model's
  own, or (a plain tokenizer.json, e.g. tiny-random's) wrapped with `config.data`'s template, ending at
  its `<|im_end|>`."""
  if isinstance(model_tokenizer, Tokenizer) and model_tokenizer.chat_template and not config.data.chat_template:
    return model_tokenizer
  tokenizer, template, _ = tokenizer_and_template(config.data, model_tokenizer, config.model.name)
  return with_chat_template(tokenizer, template)


def check_rl_config(config, mesh) -> None:
  """What the config asks, checked before any model or data is loaded."""
  choices.check_config(config)
  rl = presets.resolve(config)
  rewards_lib.check_spec(rl.rewards)
  check_model_source(config.model.name, "config.model.name", generating=True)
  rows = mesh.shape["data"] * mesh.shape["fsdp"]
  if rl.prompts_per_step % rows:
    raise ValueError(f"config.rl.prompts_per_step={rl.prompts_per_step} must be divisible by data x fsdp ({rows})")
  if rl.group_size < (1 if config.algorithm == "ppo" else 2):
    raise ValueError(f"config.rl.group_size={rl.group_size}; expected >= 2 (the group is the baseline)")
  n = rl.prompts_per_step * rl.group_size
  if n % (rl.minibatches * rows * config.optim.grad_accum_steps):
    raise ValueError(f"config.rl.minibatches={rl.minibatches}: {n} completions a step must divide into minibatches "
                     f"of a multiple of data x fsdp ({rows}) x config.optim.grad_accum_steps")
  if config.evals.every and jax.process_count() > 1:
    raise ValueError(f"config.evals.every={config.evals.every}: gym evals during training run on one host; this "
                     f"job has {jax.process_count()}: set it to 0")
  if config.algorithm == "ppo" and rl.value_init == "reward_model" and not rl.reward_model:
    raise ValueError("config.rl.value_init='reward_model' needs config.rl.reward_model (a reward-model workdir)")


def make_update(loss_fn, optimizers, *, epochs: int, minibatches: int, grad_accum_steps: int):
  """`update(state, batch) -> (state, metrics)`: `epochs` passes, each over `minibatches` minibatches of a
  fresh shuffle of the batch's rows (one minibatch: the batch as it is), one optimizer step per minibatch
  (a scan: compiled once; a single step runs without the loop). The state's `step` counts iterations;
  each optimizer schedule counts its own steps (epochs x minibatches an iteration). Metrics are the
  minibatch steps' means (`train/skipped_steps`: the run's total)."""
  inner = make_train_step(loss_fn, optimizers, grad_accum_steps, "num_tokens")
  per_iteration = epochs * minibatches

  def update(state, batch):
    iteration = state["step"]
    rng, shuffle_rng = jax.random.split(state["rng"])
    state = dict(state, step=iteration * per_iteration, rng=rng)
    if per_iteration == 1:  # the batch as it is, one optimizer step: no loop around the step's collectives
      state, metrics = inner(state, batch)
      return dict(state, step=iteration + 1), metrics
    passes = []
    for key in jax.random.split(shuffle_rng, epochs):
      rows = jax.random.permutation(key, batch["mask"].shape[0]) if minibatches > 1 else None
      shuffled = batch if rows is None else jax.tree.map(lambda x: x[rows], batch)
      passes.append(split_micro_batches(shuffled, minibatches) if minibatches > 1
                    else jax.tree.map(lambda x: x[None], shuffled))
    stacked = jax.tree.map(lambda *xs: jnp.concatenate(xs), *passes)
    state, metrics = jax.lax.scan(inner, state, stacked)
    metrics = {k: (v[-1] if k == "train/skipped_steps" else v.mean()) for k, v in metrics.items()}
    return dict(state, step=iteration + 1), metrics

  return update


def _value_part(config, rl, policy, total_steps: int):
  """PPO's value model: the reward model's weights (`rl.value_init='reward_model'`) or the policy's with a
  fresh scalar head, trained by its own optimizer (`rl.value_lr`, else `optim.lr`)."""
  optim = ml_collections.ConfigDict(config.optim.to_dict())
  optim.lr = rl.value_lr or config.optim.lr
  optimizer = make_optimizer(optim, total_steps)
  if rl.value_init == "policy":
    model = setup_model(config.model, config.seed + 1, reward_head=True)
    return state_lib.Part(model.spec, model.load_params, optimizer)
  workdir, _, model = rm_lib.reward_model_run(rl.reward_model)
  if model.cfg.vocab_size != policy.cfg.vocab_size:
    raise ValueError(f"config.rl.value_init='reward_model': {rl.reward_model} has a vocabulary of "
                     f"{model.cfg.vocab_size}, the policy {policy.cfg.vocab_size}; the value model reads the "
                     f"policy's tokens: use value_init='policy'")
  load = lambda shardings: checkpoint.restore_entry(workdir / "checkpoints", "reward", sharding=shardings)[0]
  return state_lib.Part(model.spec, load, optimizer)


class _Collector:
  """Draws prompts and samples, rewards and filters their rollouts (generate and reward phases)."""

  def __init__(self, config, rl, prompt_set, stream, rewards, tokenizer, sampler_fn, mesh):
    self.config, self.rl, self.prompts, self.stream = config, rl, prompt_set, stream
    self.rewards, self.tokenizer, self.sampler_fn, self.mesh = rewards, tokenizer, sampler_fn, mesh
    self.eos_ids = sampler_lib.stop_and_pad_ids(tokenizer)[0]

  def collect(self, params, step: int, times: dict) -> tuple:
    """(rollouts, {reward name: [N]} incl. 'total' and 'score' (before KL / shaping), info)."""
    rl = self.rl
    base = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), step)
    pool, draws = [], 0  # (rollouts, groups kept, scores) per draw
    while True:
      index = self.stream.take(rl.prompts_per_step)
      start = time.perf_counter()
      r = rollout.sample(self.sampler_fn, params, [self.prompts.ids[i] for i in index], index, rl.group_size,
                         jax.random.fold_in(base, draws), self.tokenizer, self.eos_ids, self.mesh)
      times["generate"] += time.perf_counter() - start
      start = time.perf_counter()
      records = [self.prompts.records[i] for i in np.repeat(index, rl.group_size)]
      scores = rewards_lib.score(self.rewards, records, r.texts)
      times["reward"] += time.perf_counter() - start
      draws += 1
      if not rl.dynamic_sampling:
        return r, scores, {"rollout/draws": 1}
      keep = np.flatnonzero(np.asarray(grpo_losses.informative_groups(scores["total"], rl.group_size)))
      pool.append((r, keep, scores))
      informative = sum(len(k) for _, k, _ in pool)
      if informative >= rl.prompts_per_step or draws >= rl.max_draws:
        break
    if informative < rl.prompts_per_step:  # still short: the last draw's other groups fill up (zero advantage)
      r, keep, scores = pool[-1]
      pool.append((r, np.setdiff1d(np.arange(rl.prompts_per_step), keep), scores))
    parts, part_scores, taken = [], [], 0
    for r, groups, scores in pool:
      groups = groups[:rl.prompts_per_step - taken]
      taken += len(groups)
      if len(groups):
        parts.append(rollout.select_groups(r, groups, rl.group_size))
        rows = rollout.group_rows(groups, rl.group_size)
        part_scores.append({k: v[rows] for k, v in scores.items()})
    scores = {k: np.concatenate([s[k] for s in part_scores]) for k in part_scores[0]}
    return rollout.concat(parts), scores, {"rollout/draws": draws,
                                           "rollout/informative_groups": min(informative, rl.prompts_per_step)}


def _advantages(rl, r: rollout.Rollouts, scores, scored, kl_coef: float) -> tuple:
  """(batch additions, metrics): the advantages (and PPO's returns), the KL to the reference and the
  mismatch between the sampler's and the trainer's log-probs."""
  mask = r.mask
  valid = mask > 0
  metrics = {}
  total = scores["total"].astype(np.float32)
  if rl.missing_eos_penalty:
    total = total - rl.missing_eos_penalty * (~r.finished)
  if rl.overlong_cache:
    total = total + np.asarray(grpo_losses.overlong_penalty(r.lengths, max_len=rl.max_new_tokens,
                                                            cache_len=rl.overlong_cache))
  if rl.reward_clip:
    total = np.clip(total, -rl.reward_clip, rl.reward_clip)
  tokens = max(int(valid.sum()), 1)
  on_policy = "old_logprobs" not in scored  # the update measures the mismatch (and weighs TIS) itself
  # The trainer's log-probs before the update; on policy, the sampler's stand in for the KL figures (they
  # differ by rollout/logprob_mismatch, ~1e-6 in float32 without top-k / top-p).
  old = r.sampler_logprobs if on_policy else scored["old_logprobs"]
  if not on_policy:
    diff = np.where(valid, r.sampler_logprobs - old, 0.0)
    metrics["rollout/logprob_mismatch"] = float(np.abs(diff).sum() / tokens)
    metrics["rollout/mismatch_kl"] = float((np.expm1(-diff) + diff).sum() / tokens)  # k3 of KL(sampler || trainer)
  kl_tokens = np.zeros_like(old)
  if "ref_logprobs" in scored:
    kl_tokens = np.where(valid, np.asarray(ppo_losses.kl_penalty(old, scored["ref_logprobs"], rl.kl_estimator)), 0.0)
    metrics["kl/ref"] = float(np.where(valid, old - scored["ref_logprobs"], 0.0).sum() / len(old))  # k1, per sequence
    metrics[f"kl/{rl.kl_estimator}_token"] = float(kl_tokens.sum() / tokens)
  add = {}
  if rl.advantage == "gae":
    rewards = rollout.token_rewards(total, kl_coef * kl_tokens if rl.kl_in == "reward" else 0 * kl_tokens, mask)
    advantages, returns = rollout.gae_advantages(rewards, scored["values"], mask, gamma=rl.gamma, lam=rl.lam,
                                                 whiten=rl.whiten_advantages)
    add.update(advantages=advantages, returns=returns.astype(np.float32), old_values=scored["values"])
    metrics["value/explained_variance"] = rollout.explained_variance(scored["values"], returns, mask)
    metrics["value/mean"] = float(scored["values"][valid].mean())
  else:
    sequence = total - (kl_coef * kl_tokens.sum(axis=1) if rl.kl_in == "reward" else 0.0)
    advantages = rollout.sequence_advantages(sequence, rl.group_size, rl.advantage)
    add["advantages"] = np.where(valid, advantages[:, None], 0.0).astype(np.float32)
  add["sampler_logprobs" if on_policy else "old_logprobs"] = old
  if rl.kl_in == "loss" and "ref_logprobs" in scored:
    add["ref_logprobs"] = scored["ref_logprobs"]
    add["kl_coef"] = np.full(len(old), kl_coef, np.float32)
  if rl.tis_cap and not on_policy:
    add["tis"] = np.asarray(ppo_losses.tis_weights(old, r.sampler_logprobs, mask, cap=rl.tis_cap))
    metrics["rollout/tis_weight"] = float(add["tis"].sum() / tokens)
    metrics["rollout/tis_capped"] = float((add["tis"] >= rl.tis_cap).sum() / tokens)
  if rl.missing_eos_penalty or rl.overlong_cache or rl.reward_clip:
    metrics["reward/shaped"] = float(total.mean())
  metrics["reward/std"] = float(scores["total"].std())
  return add, metrics


class Learner:
  """What an iteration needs, built once from the config (model parts and their shardings, prompts, rewards,
  the compiled sampler, scoring pass and update), and the iteration itself. Its mutable position (the prompt
  stream and the KL coefficient) is `position()`, saved with each checkpoint and given back by `resume`."""

  def __init__(self, config, mesh):
    self.config, self.mesh = config, mesh
    self.rl = rl = presets.resolve(config)
    rules = tuple(tuple(r) for r in config.sharding.rules)
    self.policy = policy = setup_model(config.model, config.seed)
    self.tokenizer = chat_tokenizer(config, policy.tokenizer)
    self.prompts = prompts_lib.load_prompts(rl, self.tokenizer)
    rewards = rewards_lib.make_rewards(config, mesh)
    total_steps = config.train.steps * rl.epochs * rl.minibatches
    parts = {"policy": policy.part(make_optimizer(config.optim, total_steps,
                                                  frozen_layers=config.model.get("frozen_layers", 0),
                                                  frozen_embeddings=config.model.get("frozen_embeddings", False)))}
    if rl.kl_coef > 0:
      parts["ref"] = policy.part()
    if config.algorithm == "ppo":
      parts["value"] = _value_part(config, rl, policy, total_steps)
    self.parts = parts
    self.shardings = shardings = state_lib.state_shardings(parts, mesh, rules)
    parts_sharding = {name: shardings[name] for name in parts}
    value_graphdef = parts["value"].spec.graphdef if "value" in parts else None
    eos_ids = sampler_lib.stop_and_pad_ids(self.tokenizer)[0]
    sampling = sampler_lib.SamplingConfig(max_new_tokens=rl.max_new_tokens, temperature=rl.temperature,
                                          top_k=rl.top_k, top_p=rl.top_p, eos_ids=eos_ids, pad_id=0)
    sampler_fn = sampler_lib.make_sampler(policy.cfg, sampling, mesh, rl.group_size, replicated(mesh))
    # One update a rollout, no value model, no KL in the reward: nothing needs the policy's log-probs before
    # the update but the loss, which computes them anyway (TRL's shortcut too): the scoring pass skips it.
    on_policy = rl.epochs * rl.minibatches == 1 and "value" not in parts and not (rl.kl_in == "reward" and "ref" in parts)
    self.score_fn = jax.jit(objective.make_score_fn(policy.spec.graphdef, value_graphdef, impl=config.kernel.impl,
                                                    temperature=rl.temperature, policy_pass=not on_policy),
                            in_shardings=(parts_sharding, None), out_shardings=replicated(mesh))
    loss_fn = objective.make_loss_fn(policy.spec.graphdef, value_graphdef, rl, impl=config.kernel.impl)
    self.update = jax.jit(make_update(loss_fn, state_lib.trained(parts), epochs=rl.epochs,
                                      minibatches=rl.minibatches, grad_accum_steps=config.optim.grad_accum_steps),
                          in_shardings=(shardings, None), out_shardings=(shardings, replicated(mesh)),
                          donate_argnums=0)
    # Prefix-shared rows need the batch whole in each optimizer step (the rows and the completions index
    # each other); otherwise a row per completion.
    self.share_prompts = rl.share_prompts and rl.minibatches == 1 and config.optim.grad_accum_steps == 1
    self.stream = prompts_lib.PromptStream(len(self.prompts.ids), config.seed)
    self.kl_coef = rl.kl_coef
    self.collector = _Collector(config, rl, self.prompts, self.stream, rewards, self.tokenizer, sampler_fn, mesh)

  def position(self) -> dict:
    return {"data": self.stream.get_state(), "kl_coef": self.kl_coef}

  def resume(self, meta: dict) -> None:
    self.stream.set_state(meta["data"])
    self.kl_coef = meta["kl_coef"]

  def iteration(self, state, step: int) -> tuple:
    """One iteration (module docstring) -> (state, the update's metrics on the devices, the host's metrics:
    rewards, rollout and KL figures, and the time of each phase)."""
    rl, times = self.rl, {"generate": 0.0, "reward": 0.0}
    r, scores, info = self.collector.collect(state["policy"], step, times)
    start = time.perf_counter()
    if self.share_prompts:
      batch = rollout.shared_batch(r, rl.group_size, pack_len=rl.pack_len,
                                   rows_multiple=self.mesh.shape["data"] * self.mesh.shape["fsdp"])
    else:
      batch = rollout.training_batch(r, rl.group_size)
    scored = jax.device_get(self.score_fn(state_lib.parts_of(state), shard_batch(batch, self.mesh)))
    scored = {k: np.asarray(v) for k, v in scored.items()}
    score_s = time.perf_counter() - start
    add, record = _advantages(rl, r, scores, scored, self.kl_coef)
    start = time.perf_counter()
    batch.update(add)
    state, step_metrics = self.update(state, shard_batch(batch, self.mesh))
    jax.block_until_ready(step_metrics)
    train_s = time.perf_counter() - start
    record.update(info)
    record.update({f"reward/{k}": float(v.mean()) for k, v in scores.items() if k != "total"})
    record["reward/mean"] = float(scores["total"].mean())
    record["kl_coef"] = self.kl_coef
    record["rollout/response_len"] = float(r.lengths.mean())
    record["rollout/eos_rate"] = float(r.finished.mean())
    record["rollout/tokens"] = int(r.mask.sum())
    record["train/row_tokens"] = int(np.count_nonzero(batch["segment_ids"]))  # what the model reads a pass
    record["rollout/tokens_per_s"] = float(r.mask.sum() / max(times["generate"], 1e-9))
    record.update({"time/generate_s": times["generate"], "time/reward_s": times["reward"], "time/score_s": score_s,
                   "time/train_s": train_s})
    self.samples = self._samples(r, scores, step)
    if rl.kl_target and "kl/ref" in record:
      self.kl_coef = float(ppo_losses.adaptive_kl_coef(self.kl_coef, record["kl/ref"], target=rl.kl_target,
                                                       horizon=rl.kl_horizon, steps=len(r.texts)))
    return state, step_metrics, record


  def _samples(self, r: rollout.Rollouts, scores: dict, step: int) -> list:
    """`rl.log_samples` completions of this step, drawn at random: prompt, response and rewards."""
    rows = np.random.default_rng(step).permutation(len(r.texts))[:self.rl.log_samples]
    prompt = lambda row: self.collector.prompts.records[r.prompt_index[row // self.rl.group_size]]["prompt"]
    return [{"prompt": prompt(row), "response": r.texts[row], "reward": float(scores["total"][row]),
             "rewards": {k: float(v[row]) for k, v in scores.items() if k not in ("total", "score")}}
            for row in sorted(rows)]


def run(config, workdir: str, accept_config_changes: bool = False) -> dict:
  """Runs (or resumes) `config.train.steps` iterations of online RL in `workdir`; returns the summary."""
  mesh = make_mesh(config.mesh)
  check_rl_config(config, mesh)
  resume = check_workdir(config, workdir, accept_config_changes)
  if resume.finished:
    return resume.summary
  learner = Learner(config, mesh)
  gym = None
  if config.evals.every:
    gym = gym_eval.GymEvaluator(config, types.SimpleNamespace(model_cfg=learner.policy.cfg, tokenizer=learner.tokenizer,
                                                              reward_metric="reward/mean"), workdir)
  run = Run(config, workdir, resume)
  try:
    state, meta = run.restore_or_create(learner.parts, learner.shardings)
    if meta is not None:
      learner.resume(meta)
    summary = {"workdir": str(run.workdir), "start_step": run.start_step, **learner.prompts.info}
    skipped = int(jax.device_get(state["skipped_steps"]))
    with jax.set_mesh(mesh):
      if run.start_step == 0 and config.train.eval_at_start and gym is not None:
        at_start = {}
        with run.timed("gym_eval", at_start):
          at_start.update(gym.run(0, state_lib.parts_of(state)))
        summary.update({k.replace("gym/", "gym_at_start/"): v for k, v in at_start.items() if k.startswith("gym/")})
        run.log(0, at_start)
      for step in run.steps():
        state, step_metrics, host_metrics = learner.iteration(state, step)
        run.count_tokens(host_metrics["rollout/tokens"])
        stop = run.stop_requested(step)
        last = step == config.train.steps
        save = run.should_save(step, stop)
        record = {}
        if run.should_log(step) or save:
          record = run.step_metrics(step, step_metrics)
          skipped = check_finite(config, run, state, step, record, skipped)
          record.update(host_metrics)
          run.log_samples(step, learner.samples)
          summary.setdefault("first_reward", record["reward/mean"])
          summary["final_reward"] = record["reward/mean"]
          summary["final_kl"] = record.get("kl/ref", 0.0)
        if gym is not None:
          gym.at_step(run, step, last, lambda: state_lib.parts_of(state), record, summary)
        run.log(step, record)
        if save:
          run.save(step, state, learner.position())
        if stop and not last:
          run.exit_stopped(step)
    finish(run, config, summary, skipped, gym)
  finally:
    run.close()
  return summary


registry.register("ppo")(run)
registry.register("grpo")(run)
