"""PPO pieces: generalised advantage estimation, per-token KL penalties and the adaptive KL coefficient,
clipped policy (token or sequence ratio, asymmetric clip) and value losses, truncated importance weights,
and the aggregation of per-token losses.

Everything is per token over [B, T] with mask [B, T] = 1 on the response tokens that carry loss.
Outputs are per token and zero where the mask is 0; `aggregate` picks the reduction (token mean,
sequence mean, a constant) and returns a (sum, count) pair the trainer normalises by global counts, as
`sft.nll_sum` does.
"""

import jax
import jax.numpy as jnp

from alignment.choices import AGGREGATIONS, RATIO_LEVELS


def gae(rewards, values, mask, *, gamma, lam, segment_ids=None):
  """Generalised advantage estimation (Schulman et al. 2016, Eq. 16) -> (advantages, returns).

  rewards, values, mask [B, T]. An episode is a row, or with `segment_ids` [B, T] (packed rows) the
  positions of one segment id; its steps are its positions where mask == 1, in order. A masked position
  inside an episode (the prompt, a tool's or an observation's tokens in a multi-turn row, padding) is
  not a step: it is skipped, and the next step's value and advantage carry across it (as verl does).
  The state after an episode's last step is terminal: nothing is bootstrapped into the next episode.
  (A truncated episode folds gamma * V(s_T) into its last reward.) Over an episode's steps t, t' = the
  next step:
    delta_t = r_t + gamma * V_{t'} - V_t          (V_{t'} = 0 after the last step)
    A_t     = delta_t + gamma * lam * A_{t'}
  Returns float32 [B, T] advantages and returns = advantages + values (the value targets), zero where
  the mask is 0 and without gradient: both are regression / policy-gradient targets. Values at masked
  positions are never read.
  """
  m = jnp.asarray(mask, bool)
  r = jnp.where(m, jnp.asarray(rewards, jnp.float32), 0.0)
  v = jnp.where(m, jax.lax.stop_gradient(jnp.asarray(values, jnp.float32)), 0.0)
  seg = jnp.zeros(m.shape, jnp.int32) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)

  def step(carry, x):
    next_v, next_advantage, next_seg = carry  # of the next step after this position, in its episode
    r_t, v_t, m_t, seg_t = x
    same = seg_t == next_seg  # else what follows is another episode's: this step is its episode's last
    advantage = r_t + gamma * jnp.where(same, next_v, 0.0) - v_t + gamma * lam * jnp.where(same, next_advantage, 0.0)
    carried = (jnp.where(m_t, v_t, next_v), jnp.where(m_t, advantage, next_advantage), jnp.where(m_t, seg_t, next_seg))
    return carried, jnp.where(m_t, advantage, 0.0)

  b = m.shape[0]
  start = (jnp.zeros(b, jnp.float32), jnp.zeros(b, jnp.float32), jnp.full(b, -1, jnp.int32))
  _, advantages = jax.lax.scan(step, start, (r.T, v.T, m.T, seg.T), reverse=True)
  return advantages.T, jnp.where(m, advantages.T + v, 0.0)


# Per-token estimators of KL(pi || pi_ref) from tokens sampled from pi, in d = logp - ref_logp
# (Schulman 2020, "Approximating KL divergence"): k1 is unbiased, k2 and k3 are low-variance, k3 is
# unbiased and non-negative; `abs` is |d| (TRL's "abs").
KL_ESTIMATORS = {
    "k1": lambda d: d,
    "k2": lambda d: 0.5 * jnp.square(d),
    "k3": lambda d: jnp.expm1(-d) + d,
    "abs": jnp.abs,
}


def kl_penalty(logprobs, ref_logprobs, kind):
  """Per-token KL estimate of `kind` (k1 | k2 | k3 | abs), float32 with the inputs' shape.

  k3 = exp(ref_logp - logp) - 1 - (ref_logp - logp) grows as exp(-d): finite for d > -88 in float32.
  """
  if kind not in KL_ESTIMATORS:
    raise ValueError(f"unknown KL estimator {kind!r}; valid: {', '.join(KL_ESTIMATORS)}")
  d = jnp.asarray(logprobs, jnp.float32) - jnp.asarray(ref_logprobs, jnp.float32)
  return KL_ESTIMATORS[kind](d)


def clipped_policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_eps, clip_eps_high=None,
                        ratio_level="token"):
  """PPO's clipped surrogate (Schulman et al. 2017, Eq. 7), negated to be minimised, per token.

  loss = max(-A ratio, -A clip(ratio, 1 - clip_eps, 1 + clip_eps_high)); `clip_eps_high` defaults to
  `clip_eps` (DAPO, Yu et al. 2025, raises it: clip-higher). The ratio is
    token     exp(logprobs - old_logprobs) at each token;
    sequence  GSPO (Zheng et al. 2025): the length-normalised sequence ratio
              s = exp(mean over the row's masked tokens of (logprobs - old_logprobs)), the same at
              every token of the row, written as s * exp(logprobs - stop_gradient(logprobs)) so that
              each token's gradient is s * d logprobs: averaged over the row's tokens
              (`aggregate(..., 'seq_mean_token_mean')`) it is exactly the gradient of the sequence loss.
  logprobs, old_logprobs, mask [B, T]; advantages [B, T] (or [B, 1] for a sequence-level advantage).
  old_logprobs and advantages carry no gradient. Returns (loss float32 [B, T], metrics [B, T]:
  `clipped` = 1.0 where the clipped term is the larger (the clip fraction's numerator), `ratio`),
  zero where the mask is 0.
  """
  if ratio_level not in RATIO_LEVELS:
    raise ValueError(f"ratio_level={ratio_level!r}; expected one of {RATIO_LEVELS}")
  m = jnp.asarray(mask, bool)
  old_logprobs, advantages = jax.lax.stop_gradient((old_logprobs, advantages))
  logprobs = jnp.asarray(logprobs, jnp.float32)
  # Masked positions may hold garbage log-probs: zero the log-ratio before exp, not the loss after.
  log_ratio = jnp.where(m, logprobs - old_logprobs, 0.0)
  if ratio_level == "sequence":
    sequence = log_ratio.sum(axis=1, keepdims=True) / jnp.maximum(m.sum(axis=1, keepdims=True), 1)
    log_ratio = jnp.where(m, jax.lax.stop_gradient(sequence) + logprobs - jax.lax.stop_gradient(logprobs), 0.0)
  ratio = jnp.exp(log_ratio)
  high = clip_eps if clip_eps_high is None else clip_eps_high
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + high)
  loss = jnp.where(m, jnp.maximum(unclipped, clipped), 0.0)
  metrics = jax.lax.stop_gradient({
      "clipped": (m & (clipped > unclipped)).astype(jnp.float32),
      "ratio": jnp.where(m, ratio, 0.0),
  })
  return loss, metrics


def clipped_value_loss(values, old_values, returns, mask, *, clip_eps):
  """Clipped value loss of PPO2 (OpenAI baselines; TRL's PPOTrainer), per token.

  loss = 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2). values, old_values,
  returns, mask [B, T]; old_values and returns carry no gradient. Returns (loss float32 [B, T],
  metrics [B, T]: `clipped` = 1.0 where the clipped error is the larger), zero where the mask is 0.
  """
  m = jnp.asarray(mask, bool)
  old_values, returns = jax.lax.stop_gradient((old_values, returns))
  values = jnp.asarray(values, jnp.float32)
  clipped_values = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
  unclipped_error = jnp.square(values - returns)
  clipped_error = jnp.square(clipped_values - returns)
  loss = jnp.where(m, 0.5 * jnp.maximum(unclipped_error, clipped_error), 0.0)
  metrics = {"clipped": (m & (clipped_error > unclipped_error)).astype(jnp.float32)}
  return loss, metrics


def adaptive_kl_coef(coef, kl, *, target, horizon, steps=1):
  """The next KL coefficient of Ziegler et al. 2019's adaptive controller (Sec. 2.2): with the error
  e = clip(kl / target - 1, -0.2, 0.2) of the measured KL, coef * (1 + e * steps / horizon), where
  `steps` is the number of samples (or iterations) the measurement covers. A fixed coefficient is
  simply not updated."""
  error = jnp.clip(jnp.asarray(kl, jnp.float32) / target - 1.0, -0.2, 0.2)
  return coef * (1.0 + error * steps / horizon)


def tis_weights(old_logprobs, sampler_logprobs, mask, *, cap):
  """Truncated importance-sampling weights min(exp(old_logprobs - sampler_logprobs), cap) per token,
  without gradient, zero where the mask is 0: they correct the policy gradient for the difference
  between the sampler's token distribution (top-k / top-p, bfloat16, another kernel) and the
  trainer's (Yao et al. 2025). Multiply the per-token loss by them."""
  m = jnp.asarray(mask, bool)
  d = jnp.where(m, jnp.asarray(old_logprobs, jnp.float32) - jnp.asarray(sampler_logprobs, jnp.float32), 0.0)
  return jax.lax.stop_gradient(jnp.where(m, jnp.minimum(jnp.exp(d), cap), 0.0))


def aggregate(per_token, mask, mode, *, max_len=None):
  """Reduces a per-token loss [B, T] over the mask to (sum, count); the loss is sum / count once both
  are summed over micro-batches and hosts, so every mode normalises by global counts:
    token_mean               every valid token weighs the same (DAPO):
                             sum of the tokens' losses, count = valid tokens
    seq_mean_token_mean      every sequence weighs the same, its tokens averaged (GRPO, GSPO):
                             sum over rows of the row's token mean, count = rows with a valid token
    seq_mean_token_sum_norm  Dr. GRPO (Liu et al. 2025): each row's token sum over the constant
                             `max_len` (no length bias), count = rows
  """
  m = jnp.asarray(mask, jnp.float32)
  values = jnp.where(m > 0, jnp.asarray(per_token, jnp.float32), 0.0)
  if mode == "token_mean":
    return values.sum(), m.sum()
  if mode == "seq_mean_token_mean":
    tokens = m.sum(axis=1)
    return (values.sum(axis=1) / jnp.maximum(tokens, 1.0)).sum(), (tokens > 0).sum().astype(jnp.float32)
  if mode == "seq_mean_token_sum_norm":
    if not max_len:
      raise ValueError("aggregate('seq_mean_token_sum_norm') needs max_len (the constant each row's sum is divided by)")
    return values.sum() / max_len, jnp.float32(values.shape[0])
  raise ValueError(f"aggregation {mode!r}; expected one of {AGGREGATIONS}")
