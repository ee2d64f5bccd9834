"""Reward modelling: the Bradley-Terry loss on the scalar rewards of chosen and rejected completions."""

import jax
import jax.numpy as jnp


def bradley_terry_loss(r_chosen, r_rejected, *, margin=None, center_coef=0.0):
  """Per-pair Bradley-Terry negative log-likelihood, float32 [B]; the trainer averages over pairs.

  loss = -log sig(r_c - r_r - margin) + center_coef * (r_c + r_r)^2

  Bradley & Terry 1952 as used for RLHF reward models (Ouyang et al. 2022); `margin` [B] is the
  dataset's preference strength, subtracted inside the sigmoid as in Llama 2 (Touvron et al. 2023);
  `center_coef` pulls the pair's reward sum towards 0 (reward centring, Eisenstein et al. 2023, as
  TRL's `center_rewards_coefficient`), so rewards are comparable across prompts.

  r_chosen, r_rejected: float [B]. Returns (loss [B], metrics of float32 [B] without gradient:
  `accuracy` = 1.0 where r_c > r_r, `margin` = r_c - r_r, `rewards/chosen`, `rewards/rejected`).
  """
  r_chosen = jnp.asarray(r_chosen, jnp.float32)
  r_rejected = jnp.asarray(r_rejected, jnp.float32)
  diff = r_chosen - r_rejected
  logit = diff if margin is None else diff - jnp.asarray(margin, jnp.float32)
  loss = jax.nn.softplus(-logit)
  if center_coef:
    loss = loss + center_coef * jnp.square(r_chosen + r_rejected)
  metrics = jax.lax.stop_gradient({
      "accuracy": (diff > 0).astype(jnp.float32),
      "margin": diff,
      "rewards/chosen": r_chosen,
      "rewards/rejected": r_rejected,
  })
  return loss, metrics
