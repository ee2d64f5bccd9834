"""GAE against a float64 loop over each episode's steps taken out of the row; KL estimators, the adaptive
KL coefficient, truncated importance weights, the aggregations and the clipped PPO losses (asymmetric
clip, GSPO's sequence ratio) against NumPy formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignment.losses.ppo import (adaptive_kl_coef, aggregate, clipped_policy_loss, clipped_value_loss, gae,
                                  kl_penalty, tis_weights)

T = 12
# Rows: full, right-padded, left-padded (prompt first), a hole inside the episode (a tool's output),
# one step, empty.
MASK = np.array([
    [1] * 12,
    [1] * 7 + [0] * 5,
    [0] * 4 + [1] * 8,
    [0] * 2 + [1] * 4 + [0] * 2 + [1] * 3 + [0],
    [0] * 5 + [1] + [0] * 6,
    [0] * 12,
], np.float32)


def gae_reference(rewards, values, mask, gamma, lam, segment_ids=None):
  """Schulman et al. 2016, float64: each episode's steps (its unmasked positions, by row and segment id)
  are taken out of the row, A_t = sum_l (gamma lam)^l delta_{t+l} is summed forward over them, and the
  results are put back."""
  segment_ids = np.zeros(mask.shape, int) if segment_ids is None else segment_ids
  advantages = np.zeros(mask.shape, np.float64)
  for b in range(mask.shape[0]):
    for segment in np.unique(segment_ids[b]):
      steps = [t for t in range(mask.shape[1]) if mask[b, t] and segment_ids[b, t] == segment]
      r = [float(rewards[b, t]) for t in steps]
      v = [float(values[b, t]) for t in steps] + [0.0]  # terminal after the last step
      deltas = [r[i] + gamma * v[i + 1] - v[i] for i in range(len(steps))]
      for i, t in enumerate(steps):
        advantages[b, t] = sum((gamma * lam) ** l * deltas[i + l] for l in range(len(steps) - i))
  return advantages, np.where(mask > 0, advantages + values, 0.0)


@pytest.mark.parametrize("gamma,lam", ((0.99, 0.95), (1.0, 1.0), (0.9, 0.0)))
def test_gae_skips_holes_and_matches_the_reference(gamma, lam):
  rng = np.random.default_rng(0)
  rewards = rng.normal(size=MASK.shape).astype(np.float32)
  values = rng.normal(size=MASK.shape).astype(np.float32)
  advantages, returns = gae(rewards, values, MASK, gamma=gamma, lam=lam)
  want_adv, want_ret = gae_reference(rewards, values, MASK, gamma, lam)
  np.testing.assert_allclose(advantages, want_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(returns, want_ret, rtol=1e-5, atol=1e-5)
  # Whatever sits at the masked positions (random numbers, inf, nan) changes nothing.
  noisy = gae(np.where(MASK > 0, rewards, rng.normal(size=MASK.shape) * 1e3),
              np.where(MASK > 0, values, np.nan), MASK, gamma=gamma, lam=lam)
  np.testing.assert_array_equal(noisy[0], advantages)
  np.testing.assert_array_equal(noisy[1], returns)


@pytest.mark.parametrize("gamma,lam", ((0.99, 0.95), (1.0, 1.0)))
def test_gae_over_packed_rows_ends_each_episode_at_its_segment(gamma, lam):
  # Three packed episodes per row: each starts with prompt tokens (masked), one has a tool-output hole,
  # padding (segment 0) between and after; an episode ends where its segment does, even with no gap.
  segment_ids = np.array([[1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 0, 0],
                          [1, 1, 1, 0, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3]])
  mask = np.array([[0, 1, 1, 1, 0, 1, 0, 1, 1, 1, 1, 1, 0, 0],
                   [0, 1, 1, 0, 0, 0, 1, 0, 0, 1, 0, 1, 1, 1]], np.float32)
  rng = np.random.default_rng(1)
  rewards, values = rng.normal(size=mask.shape), rng.normal(size=mask.shape)
  advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam, segment_ids=segment_ids)
  want_adv, want_ret = gae_reference(rewards, values, mask, gamma, lam, segment_ids)
  np.testing.assert_allclose(advantages, want_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(returns, want_ret, rtol=1e-5, atol=1e-5)
  noisy_values = np.where(mask > 0, values, rng.normal(size=mask.shape) * 1e3)
  np.testing.assert_array_equal(gae(rewards, noisy_values, mask, gamma=gamma, lam=lam, segment_ids=segment_ids)[0],
                                advantages)
  # Without segment ids, the row is one episode: its first episodes bootstrap from the next ones.
  assert not np.allclose(gae(rewards, values, mask, gamma=gamma, lam=lam)[0], advantages)


def test_gae_with_gamma_lam_one_gives_rewards_to_go_and_no_gradient():
  rewards = jnp.asarray(MASK) * 1.0
  advantages, returns = gae(rewards, jnp.zeros_like(rewards), MASK, gamma=1.0, lam=1.0)
  np.testing.assert_allclose(returns[1], [7, 6, 5, 4, 3, 2, 1, 0, 0, 0, 0, 0])
  np.testing.assert_allclose(returns[3], [0, 0, 7, 6, 5, 4, 0, 0, 3, 2, 1, 0])  # carried across the hole
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


def test_clipped_policy_loss_with_an_asymmetric_clip():
  rng = np.random.default_rng(4)
  shape, low, high = (4, T), 0.2, 0.28
  old = rng.normal(-2, 1, shape)
  logp = old + rng.normal(0, 0.3, shape)
  adv = rng.normal(0, 1, shape)
  mask = MASK[:4]
  loss, metrics = clipped_policy_loss(logp, old, adv, mask, clip_eps=low, clip_eps_high=high)
  ratio = np.exp(logp - old)
  objective = np.minimum(ratio * adv, np.clip(ratio, 1 - low, 1 + high) * adv)
  np.testing.assert_allclose(loss, -objective * mask, rtol=1e-5, atol=1e-6)
  # Tokens whose ratio lies between 1 + low and 1 + high with a positive advantage: clipped by the
  # symmetric clip, not by the asymmetric one.
  between = (ratio > 1 + low) & (ratio < 1 + high) & (adv > 0) & (mask > 0)
  assert between.any()
  symmetric = clipped_policy_loss(logp, old, adv, mask, clip_eps=low)[1]["clipped"]
  assert np.all(np.asarray(symmetric)[between] == 1) and np.all(np.asarray(metrics["clipped"])[between] == 0)


def test_sequence_ratio_is_gspos_and_its_gradient_is_the_sequence_losss():
  rng = np.random.default_rng(5)
  shape, eps = (4, T), 0.02
  old = rng.normal(-2, 1, shape)
  logp = old + rng.normal(0, 0.05, shape)
  adv = rng.normal(0, 1, (4, 1))
  mask = MASK[:4]
  n = mask.sum(axis=1, keepdims=True)
  s = np.exp(((logp - old) * mask).sum(axis=1, keepdims=True) / n)  # GSPO: length-normalised sequence ratio
  want = -np.minimum(s * adv, np.clip(s, 1 - eps, 1 + eps) * adv)  # [4, 1]
  loss, metrics = clipped_policy_loss(logp, old, adv, mask, clip_eps=eps, ratio_level="sequence")
  np.testing.assert_allclose(loss, np.broadcast_to(want, shape) * mask, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["ratio"], np.broadcast_to(s, shape) * mask, rtol=1e-5)
  clipped = np.asarray(metrics["clipped"]).max(axis=1)
  assert 0 < clipped.sum() < 4  # some rows clipped, some not

  def per_sequence(lp):  # the loss written at the sequence level, its mean over the rows
    seq = jnp.exp(jnp.sum((lp - old) * mask, axis=1, keepdims=True) / n)
    return jnp.mean(jnp.maximum(-seq * adv, -jnp.clip(seq, 1 - eps, 1 + eps) * adv))

  def per_token(lp):
    total, count = aggregate(clipped_policy_loss(lp, old, adv, mask, clip_eps=eps, ratio_level="sequence")[0],
                             mask, "seq_mean_token_mean")
    return total / count

  lp = jnp.asarray(logp, jnp.float32)
  assert float(per_token(lp)) == pytest.approx(float(per_sequence(lp)), rel=1e-5)
  np.testing.assert_allclose(jax.grad(per_token)(lp), jax.grad(per_sequence)(lp), rtol=1e-4, atol=1e-7)


def test_aggregations_take_their_defining_means():
  rng = np.random.default_rng(6)
  values = rng.normal(size=MASK.shape)
  mask = MASK
  rows = [[values[b, t] for t in range(T) if mask[b, t]] for b in range(mask.shape[0])]
  tokens = [v for row in rows for v in row]
  total, count = aggregate(values, mask, "token_mean")
  assert float(total / count) == pytest.approx(sum(tokens) / len(tokens), rel=1e-5)
  total, count = aggregate(values, mask, "seq_mean_token_mean")
  nonempty = [row for row in rows if row]
  assert float(count) == len(nonempty) == 5  # the empty row does not count
  assert float(total / count) == pytest.approx(sum(sum(r) / len(r) for r in nonempty) / len(nonempty), rel=1e-5)
  total, count = aggregate(values, mask, "seq_mean_token_sum_norm", max_len=64)
  assert float(total / count) == pytest.approx(sum(sum(r) / 64 for r in rows) / len(rows), rel=1e-5)
  # Summed over two halves of the batch (micro-batches, hosts), the pairs give the whole batch's loss.
  for mode in ("token_mean", "seq_mean_token_mean"):
    a, b = aggregate(values[:3], mask[:3], mode), aggregate(values[3:], mask[3:], mode)
    whole = aggregate(values, mask, mode)
    assert float((a[0] + b[0]) / (a[1] + b[1])) == pytest.approx(float(whole[0] / whole[1]), rel=1e-5)
  with pytest.raises(ValueError, match="needs max_len"):
    aggregate(values, mask, "seq_mean_token_sum_norm")
  with pytest.raises(ValueError, match="aggregation 'mean'; expected one of"):
    aggregate(values, mask, "mean")


def test_adaptive_kl_coefficient_follows_ziegler_et_al():
  coef, target, horizon = 0.2, 6.0, 10000.0
  coefs = [coef]
  for kl in (3.0, 6.0, 9.0, 100.0, 0.0):
    coef = float(adaptive_kl_coef(coef, kl, target=target, horizon=horizon, steps=256))
    coefs.append(coef)
  want = [0.2]
  for kl in (3.0, 6.0, 9.0, 100.0, 0.0):  # e clipped to [-0.2, 0.2]; beta <- beta (1 + e n / horizon)
    e = min(max(kl / target - 1.0, -0.2), 0.2)
    want.append(want[-1] * (1.0 + e * 256 / horizon))
  np.testing.assert_allclose(coefs, want, rtol=1e-6)
  assert coefs[1] < coefs[0] and coefs[2] == pytest.approx(coefs[1]) and coefs[4] > coefs[3]


def test_tis_weights_are_truncated_ratios_without_gradient():
  rng = np.random.default_rng(7)
  old = rng.normal(-2, 1, (4, T))
  sampler = old + rng.normal(0, 1.0, (4, T))
  mask = MASK[:4]
  weights = tis_weights(old, np.where(mask > 0, sampler, np.nan), mask, cap=2.0)
  want = np.where(mask > 0, np.minimum(np.exp(old - sampler), 2.0), 0.0)
  np.testing.assert_allclose(weights, want, rtol=1e-5, atol=1e-7)
  assert np.asarray(weights).max() == pytest.approx(2.0) and (np.asarray(weights)[mask > 0] < 2.0).any()
  grad = jax.grad(lambda o: jnp.sum(tis_weights(o, sampler, mask, cap=2.0)))(jnp.asarray(old, jnp.float32))
  np.testing.assert_array_equal(grad, np.zeros((4, T)))
