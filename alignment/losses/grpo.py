"""Sequence-level advantages from the rewards of several completions per prompt, registered by name.

rewards [N] hold `group_size` consecutive completions per prompt (N = prompts * group_size, the
layout a sampler produces when it repeats each prompt group_size times). Estimators:

  grpo          (r - group mean) / (group std + EPS)   DeepSeekMath GRPO (Shao et al. 2024), std with
                                                      Bessel's correction as TRL and verl compute it
  dr_grpo       r - group mean                          Dr. GRPO (Liu et al. 2025): no std scaling
  rloo          r - mean of the other group members     RLOO (Ahmadian et al. 2024)
  reinforce_pp  (r - batch mean) / (batch std + EPS)    REINFORCE++ (Hu 2025), outcome reward only: any
                                                      KL penalty is added to the rewards or the loss
                                                      by the caller

A new estimator is one function `fn(groups [prompts, group_size]) -> advantages of that shape` under
`@register(name)`. Advantages carry no gradient.
"""

import jax
import jax.numpy as jnp

EPS = 1e-4  # TRL's; keeps a group whose rewards are all equal at advantage 0 rather than 0 / 0

ESTIMATORS = {}


def register(name):
  def add(fn):
    ESTIMATORS[name] = fn
    return fn
  return add


@register("grpo")
def _grpo(groups):
  mean = jnp.mean(groups, axis=1, keepdims=True)
  return (groups - mean) / (jnp.std(groups, axis=1, ddof=1, keepdims=True) + EPS)


@register("dr_grpo")
def _dr_grpo(groups):
  return groups - jnp.mean(groups, axis=1, keepdims=True)


@register("rloo")
def _rloo(groups):
  size = groups.shape[1]
  baseline = (jnp.sum(groups, axis=1, keepdims=True) - groups) / (size - 1)
  return groups - baseline


@register("reinforce_pp")
def _reinforce_pp(groups):
  return (groups - jnp.mean(groups)) / (jnp.std(groups, ddof=1) + EPS)


def group_advantages(rewards, group_size, *, kind):
  """Advantages float32 [N] of estimator `kind` for rewards [N] in consecutive groups of group_size."""
  if kind not in ESTIMATORS:
    raise ValueError(f"unknown advantage estimator {kind!r}; valid: {', '.join(ESTIMATORS)}")
  rewards = jnp.asarray(rewards, jnp.float32)
  if group_size < 2 or rewards.shape[0] % group_size:
    raise ValueError(f"group_size must be >= 2 and divide the number of rewards ({rewards.shape[0]}), "
                     f"got {group_size}")
  groups = jax.lax.stop_gradient(rewards).reshape(-1, group_size)
  return ESTIMATORS[kind](groups).reshape(-1)


def informative_groups(rewards, group_size):
  """bool [prompts]: the groups whose rewards are not all equal. DAPO's dynamic sampling (Yu et al. 2025)
  keeps only these (a group of equal rewards has zero advantage and no gradient) and draws more prompts
  until the batch is full."""
  groups = jnp.asarray(rewards, jnp.float32).reshape(-1, group_size)
  return jnp.max(groups, axis=1) > jnp.min(groups, axis=1)


def overlong_penalty(lengths, *, max_len, cache_len):
  """DAPO's soft overlong punishment (Yu et al. 2025, Eq. 13), float32 like `lengths` [N]: 0 up to
  max_len - cache_len tokens, then a linear ramp to -1 at max_len, and -1 beyond; added to the reward."""
  lengths = jnp.asarray(lengths, jnp.float32)
  ramp = (max_len - cache_len - lengths) / cache_len
  return jnp.where(lengths <= max_len - cache_len, 0.0, jnp.where(lengths <= max_len, ramp, -1.0))
