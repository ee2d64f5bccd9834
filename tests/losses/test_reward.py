"""bradley_terry_loss against a float64 NumPy reference: values, metrics, gradients, stability."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignment.losses.reward import bradley_terry_loss

B = 16


def rewards(seed=0):
  rng = np.random.default_rng(seed)
  x = dict(chosen=rng.normal(0.5, 2.0, B), rejected=rng.normal(0.0, 2.0, B),
           margin=np.abs(rng.normal(0.0, 1.0, B)))
  return {k: v.astype(np.float32).astype(np.float64) for k, v in x.items()}


def reference(r_chosen, r_rejected, margin, center_coef):
  # Bradley & Terry 1952: P(chosen > rejected) = sig(r_c - r_r); the loss is its negative log.
  # Llama 2 (Touvron et al. 2023, Eq. 2): -log sig(r_c - r_r - m(r)); reward centring
  # (Eisenstein et al. 2023; TRL's center_rewards_coefficient): + coef * (r_c + r_r)^2.
  p = 1.0 / (1.0 + np.exp(-(r_chosen - r_rejected - margin)))
  return -np.log(p) + center_coef * (r_chosen + r_rejected) ** 2


@pytest.mark.parametrize("use_margin", (False, True))
@pytest.mark.parametrize("center_coef", (0.0, 0.01))
def test_matches_reference(use_margin, center_coef):
  x = rewards()
  margin = x["margin"] if use_margin else None
  loss, metrics = bradley_terry_loss(jnp.asarray(x["chosen"], jnp.float32),
                                     jnp.asarray(x["rejected"], jnp.float32), margin=margin,
                                     center_coef=center_coef)
  want = reference(x["chosen"], x["rejected"], x["margin"] if use_margin else 0.0, center_coef)
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(metrics["accuracy"], (x["chosen"] > x["rejected"]).astype(np.float32))
  np.testing.assert_allclose(metrics["margin"], x["chosen"] - x["rejected"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(metrics["rewards/chosen"], x["chosen"], rtol=1e-7)
  np.testing.assert_allclose(metrics["rewards/rejected"], x["rejected"], rtol=1e-7)


@pytest.mark.parametrize("use_margin", (False, True))
@pytest.mark.parametrize("center_coef", (0.0, 0.01))
def test_gradient_matches_finite_differences(use_margin, center_coef):
  x = rewards(1)
  margin = x["margin"] if use_margin else 0.0

  def total(r_chosen, r_rejected):
    loss, _ = bradley_terry_loss(r_chosen, r_rejected, margin=x["margin"] if use_margin else None,
                                 center_coef=center_coef)
    return jnp.sum(loss)

  grads = jax.grad(total, argnums=(0, 1))(jnp.asarray(x["chosen"], jnp.float32),
                                          jnp.asarray(x["rejected"], jnp.float32))
  h = 1e-6
  fd_chosen = (reference(x["chosen"] + h, x["rejected"], margin, center_coef)
               - reference(x["chosen"] - h, x["rejected"], margin, center_coef)) / (2 * h)
  fd_rejected = (reference(x["chosen"], x["rejected"] + h, margin, center_coef)
                 - reference(x["chosen"], x["rejected"] - h, margin, center_coef)) / (2 * h)
  np.testing.assert_allclose(grads[0], fd_chosen, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grads[1], fd_rejected, rtol=1e-4, atol=1e-6)


def test_equal_rewards_give_ln2_and_zero_accuracy():
  r = jnp.linspace(-3.0, 3.0, B)
  loss, metrics = bradley_terry_loss(r, r)
  np.testing.assert_array_equal(loss, np.full(B, np.log(2.0), np.float32))
  np.testing.assert_array_equal(metrics["accuracy"], np.zeros(B))


def test_large_rewards_give_finite_loss_and_gradients():
  r_chosen, r_rejected = jnp.array([1e3, -1e3, 5e2]), jnp.array([-1e3, 1e3, 5e2])

  def total(a, b):
    loss, _ = bradley_terry_loss(a, b, margin=jnp.array([1.0, 2.0, 0.0]), center_coef=0.01)
    return jnp.sum(loss), loss

  grads, loss = jax.grad(total, argnums=(0, 1), has_aux=True)(r_chosen, r_rejected)
  np.testing.assert_allclose(loss[1], 2e3 + 2.0, rtol=1e-6)  # -log sig(-2002) = 2002
  assert np.all(np.isfinite(loss)) and all(np.all(np.isfinite(g)) for g in grads)
