"""PPO pieces: generalised advantage estimation, per-token KL penalties, clipped policy and value losses.

Everything is per token over [B, T] with mask [B, T] = 1 on the response tokens that carry loss.
Outputs are per token and zero where the mask is 0, so the trainer picks the reduction (token mean,
sequence mean, a constant) and normalises by global counts, as `sft.nll_sum` does.
"""

import jax
import jax.numpy as jnp


def gae(rewards, values, mask, *, gamma, lam):
  """Generalised advantage estimation (Schulman et al. 2016, Eq. 16) -> (advantages, returns).

  rewards, values, mask [B, T]. Each contiguous run of mask == 1 in a row is one episode (a row may
  hold several, packed); the state after an episode's last step is terminal, so nothing is
  bootstrapped across a 0 in the mask. (A truncated episode folds gamma * V(s_T) into its last reward.)
    delta_t = r_t + gamma * m_{t+1} V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * m_{t+1} A_{t+1}
  Returns float32 [B, T] advantages and returns = advantages + values (the value targets), zero where
  the mask is 0 and without gradient: both are regression / policy-gradient targets.
  """
  m = jnp.asarray(mask, jnp.float32)
  r = jnp.where(m > 0, jnp.asarray(rewards, jnp.float32), 0.0)
  v = jnp.where(m > 0, jax.lax.stop_gradient(jnp.asarray(values, jnp.float32)), 0.0)
  next_v = jnp.pad(v[:, 1:], ((0, 0), (0, 1)))  # 0 after an episode's last step: v is masked

  def step(next_advantage, x):
    delta_t, m_t = x
    advantage = (delta_t + gamma * lam * next_advantage) * m_t  # 0 at a gap: nothing flows across
    return advantage, advantage

  delta = r + gamma * next_v - v
  _, advantages = jax.lax.scan(step, jnp.zeros(m.shape[0], jnp.float32), (delta.T, m.T), reverse=True)
  return advantages.T, advantages.T + v


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


def clipped_policy_loss(logprobs, old_logprobs, advantages, mask, *, clip_eps):
  """PPO's clipped surrogate (Schulman et al. 2017, Eq. 7), negated to be minimised, per token.

  ratio = exp(logprobs - old_logprobs); loss = max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)).
  logprobs, old_logprobs, mask [B, T]; advantages [B, T] (or [B, 1] for a sequence-level advantage).
  old_logprobs and advantages carry no gradient. Returns (loss float32 [B, T], metrics [B, T]:
  `clipped` = 1.0 where the clipped term is the larger (the clip fraction's numerator), `ratio`),
  zero where the mask is 0.
  """
  m = jnp.asarray(mask, bool)
  old_logprobs, advantages = jax.lax.stop_gradient((old_logprobs, advantages))
  # Masked positions may hold garbage log-probs: zero the log-ratio before exp, not the loss after.
  log_ratio = jnp.where(m, jnp.asarray(logprobs, jnp.float32) - old_logprobs, 0.0)
  ratio = jnp.exp(log_ratio)
  unclipped = -advantages * ratio
  clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
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
