"""kto_loss and its reference point against float64 NumPy references from the KTO paper."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignment.losses.kto import kto_loss, reference_point

B = 16


def examples(seed=0):
  rng = np.random.default_rng(seed)
  logps = -rng.integers(1, 200, B) * rng.uniform(0.2, 2.0, B)
  x = dict(logps=logps, ref_logps=logps + rng.normal(0.0, 4.0, B))
  x = {k: v.astype(np.float32).astype(np.float64) for k, v in x.items()}
  x["desirable"] = rng.random(B) < 0.5
  x["desirable"][:2] = (True, False)
  return x


def reference(logps, ref_logps, desirable, z0, beta, w_d, w_u):
  # KTO (Ethayarajh et al. 2024): r = log pi(y|x) / pi_ref(y|x); v = w_D sig(beta (r - z0)) for a
  # desirable y, w_U sig(beta (z0 - r)) for an undesirable one; loss = w_y - v.
  r = logps - ref_logps
  sig = lambda t: 1.0 / (1.0 + np.exp(-t))
  value = np.where(desirable, w_d * sig(beta * (r - z0)), w_u * sig(beta * (z0 - r)))
  return np.where(desirable, w_d, w_u) - value


@pytest.mark.parametrize("beta", (0.1, 0.5))
@pytest.mark.parametrize("weights", ((1.0, 1.0), (1.33, 1.0), (1.0, 2.0)))
@pytest.mark.parametrize("z0", (0.0, 3.7))
def test_matches_reference(beta, weights, z0):
  x = examples()
  logps, ref_logps = jnp.asarray(x["logps"], jnp.float32), jnp.asarray(x["ref_logps"], jnp.float32)
  loss, metrics = kto_loss(logps, ref_logps, x["desirable"], z0, beta=beta,
                           desirable_weight=weights[0], undesirable_weight=weights[1])
  want = reference(x["logps"], x["ref_logps"], x["desirable"], z0, beta, *weights)
  np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["rewards"], beta * (x["logps"] - x["ref_logps"]), rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(metrics["desirable"], x["desirable"].astype(np.float32))
  np.testing.assert_allclose(metrics["kl"], z0)


@pytest.mark.parametrize("beta", (0.1, 0.5))
def test_gradient_matches_finite_differences_and_skips_the_reference_point(beta):
  x = examples(1)
  z0 = 2.5

  def total(logps, ref_logps, kl):
    loss, _ = kto_loss(logps, ref_logps, x["desirable"], kl, beta=beta, desirable_weight=1.33)
    return jnp.sum(loss)

  g_logps, g_ref, g_kl = jax.grad(total, argnums=(0, 1, 2))(
      jnp.asarray(x["logps"], jnp.float32), jnp.asarray(x["ref_logps"], jnp.float32), jnp.float32(z0))
  h = 1e-6
  fd = (reference(x["logps"] + h, x["ref_logps"], x["desirable"], z0, beta, 1.33, 1.0)
        - reference(x["logps"] - h, x["ref_logps"], x["desirable"], z0, beta, 1.33, 1.0)) / (2 * h)
  np.testing.assert_allclose(g_logps, fd, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(g_ref, -fd, rtol=1e-4, atol=1e-7)
  assert g_kl == 0.0  # the reference point is detached (the paper; TRL)


def test_reference_point_is_the_clamped_detached_mean_log_ratio():
  rng = np.random.default_rng(2)
  logps, ref_logps = rng.normal(-50, 10, B), rng.normal(-52, 10, B)
  mask = rng.random(B) < 0.7
  got = reference_point(jnp.asarray(logps, jnp.float32), jnp.asarray(ref_logps, jnp.float32), mask)
  np.testing.assert_allclose(got, max(0.0, np.mean((logps - ref_logps)[mask])), rtol=1e-5)
  np.testing.assert_allclose(reference_point(jnp.asarray(logps), jnp.asarray(ref_logps)),
                             max(0.0, np.mean(logps - ref_logps)), rtol=1e-5)
  assert reference_point(jnp.zeros(3), jnp.ones(3)) == 0.0  # negative mean -> clamped at 0
  grad = jax.grad(lambda a: reference_point(a, jnp.zeros(B)))(jnp.ones(B))
  np.testing.assert_array_equal(grad, np.zeros(B))


def test_large_log_ratios_give_finite_loss_and_gradients():
  logps, ref_logps = jnp.array([-1e3, -1.0, -1e3, -1.0]), jnp.array([-1.0, -1e3, -1.0, -1e3])
  desirable = jnp.array([True, True, False, False])

  def total(a, b):
    loss, _ = kto_loss(a, b, desirable, 0.0, beta=0.5)
    return jnp.sum(loss), loss

  grads, loss = jax.grad(total, argnums=(0, 1), has_aux=True)(logps, ref_logps)
  np.testing.assert_allclose(loss, [1.0, 0.0, 0.0, 1.0], atol=1e-6)
  assert all(np.all(np.isfinite(g)) for g in grads)
