"""What an online-RL update computes from a batch of scored rollouts: the policy's (and the value
model's) loss, and the no-gradient pass that scores the rollouts before it.

A batch holds the rows the model reads and, per completion (N of them, L tokens, right-padded), what the
loss reads. The rows are either one per completion, its prompt (left-padded to width P) followed by it,
the layout the sampler produced:

  inputs, positions, segment_ids  [N, P + L - 1]  the model's input (the last completion token is never one)

or prefix-shared (`alignment.rl.prefix`: a group's prompt once, then its completions, each seeing the
prompt and itself; groups packed into R rows of T tokens), with the way back to the completions:

  inputs, positions, segment_ids, prefix_ids  [R, T]
  row [N], cols [N, L]                        completion i's token t is predicted at cell (row[i], cols[i, t])

and per completion:

  completion, mask                [N, L]          the sampled tokens and 1 on those that carry loss
  old_logprobs                    [N, L]          the trainer's log-probs before the update (the ratio's base); or,
  sampler_logprobs                [N, L]          with one update a rollout, the sampler's (the loss detaches its own
                                                  as the base, and measures the mismatch and TIS weights there)
  advantages                      [N, L]          (a sequence advantage repeated over the row's tokens)
  ref_logprobs, kl_coef           [N, L], [N]     when the KL to the reference is a loss term (the coefficient
                                                  an input: the adaptive controller moves it between steps)
  tis                             [N, L]          truncated importance weights, when `config.rl.tis_cap`
  old_values, returns             [N, L]          PPO: the value model's estimates before the update, and targets

Per-token quantities are read at the completion's cells only (column P - 1 + t of a row of the first layout
predicts completion token t), so the unembedding runs over N x L cells, never the prompt's.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from alignment.kernels import token_logprobs
from alignment.losses import ppo


def _model_inputs(batch):
  """The model's arguments for the batch's rows (prefix-shared rows carry `prefix_ids`)."""
  extra = {"prefix_ids": batch["prefix_ids"]} if "prefix_ids" in batch else {}
  return (batch["inputs"], batch["positions"], batch["segment_ids"]), extra


def _at_completions(x, batch):
  """x [rows, T, ...] -> [N, L, ...]: the cells whose outputs predict each completion token, in order."""
  if "cols" in batch:  # prefix-shared rows: completion i's cells are (row[i], cols[i, :])
    return x[batch["row"][:, None], batch["cols"]]
  length = batch["completion"].shape[1]  # prompt + completion rows: the last L columns
  return x[:, x.shape[1] - length:]


def completion_stats(graphdef, params, batch, *, impl: str, temperature: float = 1.0, ref_params=None):
  """LogprobStats of the completion tokens, each field [N, L] (with the reference's when given), under
  softmax(logits / temperature): the distribution the sampler drew from before any top-k / top-p."""
  model = nnx.merge(graphdef, params)
  inputs, extra = _model_inputs(batch)
  hidden = _at_completions(model(*inputs, **extra), batch)
  n, length, d = hidden.shape
  ref = {}
  if ref_params is not None:
    ref_model = nnx.merge(graphdef, jax.lax.stop_gradient(ref_params))
    ref = dict(ref_hidden=_at_completions(ref_model(*inputs, **extra), batch).reshape(n * length, d),
               ref_unembed=ref_model.unembed_matrix())
  stats = token_logprobs(hidden.reshape(n * length, d), model.unembed_matrix(), batch["completion"].reshape(-1),
                         impl=impl, temperature=temperature, **ref)
  return jax.tree.map(lambda a: None if a is None else a.reshape(n, length), stats)


def completion_values(value_graphdef, value_params, batch):
  """The value model's V(s_t) [N, L]: its score at the position before each completion token."""
  inputs, extra = _model_inputs(batch)
  return _at_completions(nnx.merge(value_graphdef, value_params)(*inputs, **extra), batch)


def make_score_fn(graphdef, value_graphdef, *, impl: str, temperature: float = 1.0, policy_pass: bool = True):
  """(parts, batch) -> {[old_logprobs, entropy], [ref_logprobs], [values]} [N, L], no gradient: the
  trainer's view of the rollouts before the update (with `parts['ref']`, `parts['value']` if present).

  Without `policy_pass` (one update a rollout, nothing read from the policy before it) the policy is not
  run: its log-probs before the update are the ones the loss computes, detached (`make_loss_fn`)."""

  def score(parts, batch):
    out = {}
    if policy_pass:
      stats = completion_stats(graphdef, parts["policy"], batch, impl=impl, temperature=temperature,
                               ref_params=parts.get("ref"))
      out.update(old_logprobs=stats.logprobs, entropy=stats.entropy)
      if "ref" in parts:
        out["ref_logprobs"] = stats.ref_logprobs
    elif "ref" in parts:
      out["ref_logprobs"] = completion_stats(graphdef, parts["ref"], batch, impl=impl,
                                             temperature=temperature).logprobs
    if "value" in parts:
      out["values"] = completion_values(value_graphdef, parts["value"], batch)
    return jax.lax.stop_gradient(out)

  return score


def make_loss_fn(graphdef, value_graphdef, rl, *, impl: str):
  """(parts, batch, rng) -> (loss sum, (count, metric sums)) for `alignment.train.step.make_train_step`.

  Log-probs are at the sampling temperature `rl.temperature`. Per token: the clipped surrogate (`rl.clip_eps`, `rl.clip_eps_high`, `rl.ratio_level`), times the
  TIS weight when present, plus the batch's `kl_coef` x the `rl.kl_estimator` KL to the reference when
  the KL is a loss term (`rl.kl_in == 'loss'`), minus `rl.entropy_coef` x the entropy; reduced by
  `rl.aggregation`. With a value part, `rl.vf_coef` x its clipped value loss, reduced the same way.
  Metric sums are reduced the same way too, so metric / count is each one's mean in that weighting (the
  mismatch and TIS figures of an on-policy batch included: token means under `token_mean`)."""
  kl_in_loss = rl.kl_in == "loss" and rl.kl_coef > 0

  def reduce(per_token, mask):
    return ppo.aggregate(per_token, mask, rl.aggregation, max_len=rl.max_new_tokens)

  def loss_fn(parts, batch, rng):
    del rng
    mask = batch["mask"]
    stats = completion_stats(graphdef, parts["policy"], batch, impl=impl, temperature=rl.temperature)
    aux_tokens = {}
    if "old_logprobs" in batch:
      old = batch["old_logprobs"]
    else:  # one update a rollout: the log-probs before it are these; the sampler's are compared with them here
      old = jax.lax.stop_gradient(stats.logprobs)
      gap = jnp.where(mask > 0, batch["sampler_logprobs"] - old, 0.0)
      aux_tokens.update({"rollout/logprob_mismatch": jnp.abs(gap), "rollout/mismatch_kl": jnp.expm1(-gap) + gap})
      if rl.tis_cap:
        tis = ppo.tis_weights(old, batch["sampler_logprobs"], mask, cap=rl.tis_cap)
        aux_tokens.update({"rollout/tis_weight": tis, "rollout/tis_capped": (tis >= rl.tis_cap).astype(jnp.float32)})
    per_token, m = ppo.clipped_policy_loss(stats.logprobs, old, batch["advantages"], mask,
                                           clip_eps=rl.clip_eps, clip_eps_high=rl.clip_eps_high or None,
                                           ratio_level=rl.ratio_level)
    if rl.tis_cap:
      per_token = per_token * (batch["tis"] if "tis" in batch else aux_tokens["rollout/tis_weight"])
    aux_tokens.update({"policy/clip_frac": m["clipped"], "policy/ratio": m["ratio"], "policy/entropy": stats.entropy})
    if kl_in_loss:
      kl = ppo.kl_penalty(stats.logprobs, batch["ref_logprobs"], rl.kl_estimator)
      per_token = per_token + batch["kl_coef"][:, None] * kl
      aux_tokens["policy/kl_loss"] = kl
    if rl.entropy_coef:
      per_token = per_token - rl.entropy_coef * stats.entropy
    loss_sum, count = reduce(per_token, mask)
    aux = {"policy/loss": loss_sum}
    if "value" in parts:
      values = completion_values(value_graphdef, parts["value"], batch)
      value_token, vm = ppo.clipped_value_loss(values, batch["old_values"], batch["returns"], mask,
                                               clip_eps=rl.vf_clip)
      value_sum, _ = reduce(value_token, mask)
      loss_sum = loss_sum + rl.vf_coef * value_sum
      aux["value/loss"] = value_sum
      aux_tokens["value/clip_frac"] = vm["clipped"]
    aux.update({k: reduce(v, mask)[0] for k, v in aux_tokens.items()})
    return loss_sum, (count, aux)

  return loss_fn
