"""GAE against a plain-Python backward loop on ragged masks; KL estimators and the clipped PPO losses
against NumPy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignment.losses.ppo import clipped_policy_loss, clipped_value_loss, gae, kl_penalty

T = 12
# Rows: full, right-padded, left-padded (prompt first), two packed episodes, one step, empty.
MASK = np.array([
    [1] * 12,
    [1] * 7 + [0] * 5,
    [0] * 4 + [1] * 8,
    [0] * 2 + [1] * 4 + [0] * 2 + [1] * 3 + [0],
    [0] * 5 + [1] + [0] * 6,
    [0] * 12,
], np.float32)


def gae_loop(rewards, values, mask, gamma, lam):
  """Schulman et al. 2016: A_t = sum_l (gamma lam)^l delta_{t+l} within an episode, backwards."""
  advantages = np.zeros_like(rewards, dtype=np.float64)
  for b in range(rewards.shape[0]):
    running = 0.0
    for t in reversed(range(rewards.shape[1])):
      if not mask[b, t]:
        running = 0.0  # a gap ends the episode: nothing flows across it
        continue
      last = t + 1 == rewards.shape[1] or not mask[b, t + 1]
      next_value = 0.0 if last else float(values[b, t + 1])
      delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
      running = delta + gamma * lam * running
      advantages[b, t] = running
  return advantages, np.where(mask > 0, advantages + values, 0.0)


@pytest.mark.parametrize("gamma,lam", ((0.99, 0.95), (1.0, 1.0), (0.9, 0.0)))
def test_gae_matches_python_loop_on_ragged_masks(gamma, lam):
  rng = np.random.default_rng(0)
  rewards = rng.normal(size=MASK.shape).astype(np.float32)
  values = rng.normal(size=MASK.shape).astype(np.float32)
  # Garbage outside the mask must not leak in.
  rewards, values = np.where(MASK > 0, rewards, np.inf), np.where(MASK > 0, values, np.nan)
  advantages, returns = gae(rewards, values, MASK, gamma=gamma, lam=lam)
  want_adv, want_ret = gae_loop(rewards, values, MASK, gamma, lam)
  np.testing.assert_allclose(advantages, want_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(returns, want_ret, rtol=1e-5, atol=1e-5)


def test_gae_with_gamma_lam_one_gives_rewards_to_go_and_no_gradient():
  rewards = jnp.asarray(MASK) * 1.0
  advantages, returns = gae(rewards, jnp.zeros_like(rewards), MASK, gamma=1.0, lam=1.0)
  np.testing.assert_allclose(returns[1], [7, 6, 5, 4, 3, 2, 1, 0, 0, 0, 0, 0])
  np.testing.assert_allclose(returns[3], [0, 0, 4, 3, 2, 1, 0, 0, 3, 2, 1, 0])
  grad = jax.grad(lambda v: jnp.sum(gae(rewards, v, MASK, gamma=0.9, lam=0.9)[0]))(jnp.ones(MASK.shape))
  np.testing.assert_array_equal(grad, np.zeros(MASK.shape))


def test_kl_estimators():
  # Schulman 2020, "Approximating KL divergence", with r = pi_ref / pi: k1 = -log r,
  # k2 = (log r)^2 / 2, k3 = (r - 1) - log r; abs = |log r|.
  rng = np.random.default_rng(1)
  logp, ref = rng.normal(-2, 1, (4, 9)), rng.normal(-2, 1, (4, 9))
  logp, ref = logp.astype(np.float32).astype(np.float64), ref.astype(np.float32).astype(np.float64)
  log_r = ref - logp
  want = dict(k1=-log_r, k2=0.5 * log_r ** 2, k3=np.exp(log_r) - 1 - log_r, abs=np.abs(log_r))
  for kind, value in want.items():
    np.testing.assert_allclose(kl_penalty(logp, ref, kind), value, rtol=1e-5, atol=1e-6, err_msg=kind)
  assert np.all(np.asarray(kl_penalty(logp, ref, "k3")) >= 0)
  with pytest.raises(ValueError, match="unknown KL estimator 'k4'.*k1, k2, k3, abs"):
    kl_penalty(logp, ref, "k4")


def test_clipped_policy_loss_values_and_gradient():
  rng = np.random.default_rng(2)
  shape, eps = (4, T), 0.2
  old = rng.normal(-2, 1, shape).astype(np.float32)
  logp = (old + rng.normal(0, 0.3, shape)).astype(np.float32)
  adv = rng.normal(0, 1, shape).astype(np.float32)
  mask = MASK[:4]
  logp_garbage = np.where(mask > 0, logp, 1e4).astype(np.float32)  # exp(1e4) would overflow

  loss, metrics = clipped_policy_loss(logp_garbage, old, adv, mask, clip_eps=eps)
  # PPO (Schulman et al. 2017, Eq. 7): L = min(ratio A, clip(ratio, 1 - eps, 1 + eps) A), maximised.
  ratio = np.exp(logp.astype(np.float64) - old)
  objective = np.minimum(ratio * adv, np.clip(ratio, 1 - eps, 1 + eps) * adv)
  np.testing.assert_allclose(loss, -objective * mask, rtol=1e-5, atol=1e-6)
  clipped = (np.clip(ratio, 1 - eps, 1 + eps) * adv < ratio * adv) & (mask > 0)
  np.testing.assert_array_equal(metrics["clipped"], clipped.astype(np.float32))
  assert 0 < clipped.sum() < mask.sum()

  grad = jax.grad(lambda lp: jnp.sum(clipped_policy_loss(lp, old, adv, mask, clip_eps=eps)[0]))(
      jnp.asarray(logp_garbage))
  # d/dlogp of -ratio A is -ratio A where the unclipped term is active, else 0.
  np.testing.assert_allclose(grad, np.where(clipped | (mask == 0), 0.0, -ratio * adv), rtol=1e-5,
                             atol=1e-6)


def test_clipped_value_loss_values_and_gradient():
  rng = np.random.default_rng(3)
  shape, eps = (4, T), 0.2
  old = rng.normal(0, 1, shape).astype(np.float32)
  values = (old + rng.normal(0, 0.4, shape)).astype(np.float32)
  returns = rng.normal(0, 1, shape).astype(np.float32)
  mask = MASK[:4]
  loss, metrics = clipped_value_loss(values, old, returns, mask, clip_eps=eps)
  v = values.astype(np.float64)
  v_clipped = old + np.clip(v - old, -eps, eps)
  err, err_clipped = (v - returns) ** 2, (v_clipped - returns) ** 2
  np.testing.assert_allclose(loss, 0.5 * np.maximum(err, err_clipped) * mask, rtol=1e-5, atol=1e-6)
  clipped = (err_clipped > err) & (mask > 0)
  np.testing.assert_array_equal(metrics["clipped"], clipped.astype(np.float32))
  assert 0 < clipped.sum() < mask.sum()
  grad = jax.grad(lambda x: jnp.sum(clipped_value_loss(x, old, returns, mask, clip_eps=eps)[0]))(
      jnp.asarray(values))
  np.testing.assert_allclose(grad, np.where(clipped | (mask == 0), 0.0, v - returns), rtol=1e-5,
                             atol=1e-6)
