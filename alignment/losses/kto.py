"""KTO (Ethayarajh et al. 2024): a loss for unpaired completions labelled desirable or undesirable.

With the implicit reward r = logp - ref_logp (sequence sums of completion-token log-probs) and the
reference point z0, an estimate of KL(pi || pi_ref) that carries no gradient:

  desirable    loss = desirable_weight   * (1 - sig(beta * (r - z0)))
  undesirable  loss = undesirable_weight * (1 - sig(beta * (z0 - r)))

i.e. the paper's lambda_y - v(x, y), as TRL's KTOTrainer computes it. z0 is estimated from mismatched
pairs (prompt x_i with the completion of another example j), which the trainer scores with the
policy and the reference; `reference_point` turns those into z0 over the whole (global) batch.
"""

import jax
import jax.numpy as jnp


def reference_point(kl_logps, kl_ref_logps, mask=None):
  """z0 = max(0, mean of (logp - ref_logp)) over the mismatched completions, float32 scalar.

  kl_logps, kl_ref_logps: float [B] sequence sums for mismatched (prompt, completion) pairs; mask [B]
  marks the real ones. Clamped at 0 (a KL is non-negative; the paper and TRL) and detached, so the
  policy cannot lower its loss by moving the reference point.
  """
  log_ratio = jnp.asarray(kl_logps, jnp.float32) - jnp.asarray(kl_ref_logps, jnp.float32)
  if mask is None:
    mean = jnp.mean(log_ratio)
  else:
    mask = jnp.asarray(mask, jnp.float32)
    mean = jnp.sum(log_ratio * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  return jax.lax.stop_gradient(jnp.maximum(mean, 0.0))


def kto_loss(policy_logps, ref_logps, desirable, kl_estimate, *, beta, desirable_weight=1.0,
             undesirable_weight=1.0):
  """Per-example KTO loss, float32 [B]; the trainer averages over the valid examples.

  policy_logps, ref_logps: float [B] sums of completion-token log-probs; desirable: bool [B];
  kl_estimate: the reference point z0 (scalar or [B]), from `reference_point`; it is detached here
  too. Returns (loss [B], metrics without gradient: `rewards` = beta * r [B], `logps` [B],
  `desirable` [B] as float, `kl` = z0). TRL reports rewards/chosen and rewards/rejected as the mean
  of `rewards` over the desirable and the undesirable examples.
  """
  log_ratio = jnp.asarray(policy_logps, jnp.float32) - jnp.asarray(ref_logps, jnp.float32)
  z0 = jax.lax.stop_gradient(jnp.asarray(kl_estimate, jnp.float32))
  desirable = jnp.asarray(desirable, bool)
  # 1 - sig(x) = sig(-x), evaluated stably through the sign flip.
  value = jax.nn.sigmoid(jnp.where(desirable, z0 - log_ratio, log_ratio - z0) * beta)
  loss = jnp.where(desirable, desirable_weight, undesirable_weight) * value
  metrics = jax.lax.stop_gradient({
      "rewards": beta * log_ratio,
      "logps": jnp.asarray(policy_logps, jnp.float32),
      "desirable": desirable.astype(jnp.float32),
      "kl": z0,
  })
  return loss, metrics
