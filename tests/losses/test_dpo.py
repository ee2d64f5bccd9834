"""preference_loss against float64 NumPy references written from the papers' formulas: values,
metrics and gradients for every loss type, the step-0 values, large log-ratios and argument errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignment.losses import dpo
from alignment.losses.dpo import preference_loss

B = 16
BETAS = (0.1, 0.5)
SMOOTHING = (0.0, 0.1, 0.3)
LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo", "simpo", "orpo")
ARGS = ("chosen", "rejected", "ref_chosen", "ref_rejected")


def log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def batch(seed=0):
  """float64 pairs whose values are exactly representable in float32; uneven lengths 1..160."""
  rng = np.random.default_rng(seed)
  len_c, len_r = rng.integers(1, 161, B), rng.integers(1, 161, B)
  len_c[:2], len_r[:2] = (1, 160), (160, 1)
  x = dict(chosen=-len_c * rng.uniform(0.2, 2.5, B), rejected=-len_r * rng.uniform(0.2, 2.5, B),
           chosen_lengths=len_c, rejected_lengths=len_r, margin=rng.normal(0.0, 1.0, B))
  x["ref_chosen"] = x["chosen"] + rng.normal(0.0, 3.0, B)
  x["ref_rejected"] = x["rejected"] + rng.normal(0.0, 3.0, B)
  return {k: v if v.dtype.kind == "i" else v.astype(np.float32).astype(np.float64) for k, v in x.items()}


# ---- float64 references, one per paper; each returns (loss, reward_chosen, reward_rejected) ----

def ref_sigmoid(x, beta, eps, margin):
  # DPO (Rafailov et al. 2023, Eq. 7): -log sig(beta log[pi(yw) pi_ref(yl) / (pi_ref(yw) pi(yl))]);
  # cDPO (Mitchell 2023): labels flipped with probability eps -> the expected loss over the flip;
  # ODPO (Amini et al. 2024): an offset subtracted from the reward difference.
  rw, rl = beta * (x["chosen"] - x["ref_chosen"]), beta * (x["rejected"] - x["ref_rejected"])
  z = rw - rl - margin
  return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z), rw, rl


def ref_robust(x, beta, eps, margin):
  # Robust DPO (Chowdhury et al. 2024): [(1 - eps) L(yw > yl) - eps L(yl > yw)] / (1 - 2 eps) with
  # L the DPO loss of the pair in that order.
  rw, rl = beta * (x["chosen"] - x["ref_chosen"]), beta * (x["rejected"] - x["ref_rejected"])
  z = rw - rl - margin
  loss_w, loss_l = -log_sigmoid(z), -log_sigmoid(-z)
  return ((1 - eps) * loss_w - eps * loss_l) / (1 - 2 * eps), rw, rl


def ref_hinge(x, beta, eps, margin):
  # SLiC-HF (Zhao et al. 2023) calibration loss max(0, delta - log-ratio gap) with delta = 1 on
  # beta-scaled reference-normalised log-ratios (RSO, Liu et al. 2024).
  rw, rl = beta * (x["chosen"] - x["ref_chosen"]), beta * (x["rejected"] - x["ref_rejected"])
  return np.maximum(0.0, 1.0 - (rw - rl)), rw, rl


def ref_ipo(x, beta, eps, margin):
  # IPO (Azar et al. 2023, Eq. 17): (h - 1 / (2 tau))^2, tau = beta, with h on per-token average
  # log-probabilities (the authors' correction, adopted by TRL).
  mean = {k: x[k] / x[f"{k.replace('ref_', '')}_lengths"] for k in ARGS}
  hw, hl = mean["chosen"] - mean["ref_chosen"], mean["rejected"] - mean["ref_rejected"]
  return (hw - hl - 1 / (2 * beta)) ** 2, beta * hw, beta * hl


def ref_simpo(x, beta, eps, margin, gamma=0.5):
  # SimPO (Meng et al. 2024): -log sig(beta/|yw| log pi(yw) - beta/|yl| log pi(yl) - gamma), label
  # smoothing as in the authors' code.
  rw, rl = beta / x["chosen_lengths"] * x["chosen"], beta / x["rejected_lengths"] * x["rejected"]
  z = rw - rl - gamma
  return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z), rw, rl


def ref_orpo(x, beta, eps, margin, alpha=0.1):
  # ORPO (Hong et al. 2024): L_SFT + lambda L_OR, L_OR = -log sig(log(odds(yw) / odds(yl))),
  # odds(y) = P(y) / (1 - P(y)), P(y) = exp(mean token log-prob), L_SFT = -mean log-prob of yw.
  pw = np.exp(x["chosen"] / x["chosen_lengths"])
  pl = np.exp(x["rejected"] / x["rejected_lengths"])
  odds_ratio = (pw / (1 - pw)) / (pl / (1 - pl))
  return -np.log(pw) - alpha * log_sigmoid(np.log(odds_ratio)), beta * np.log(pw), beta * np.log(pl)


REFERENCES = dict(sigmoid=ref_sigmoid, robust=ref_robust, hinge=ref_hinge, ipo=ref_ipo,
                  simpo=ref_simpo, orpo=ref_orpo)
CASES = [(loss_type, beta, eps, use_margin)
         for loss_type in LOSS_TYPES for beta in BETAS
         for eps in (SMOOTHING if loss_type in ("sigmoid", "robust", "simpo") else (0.0,))
         for use_margin in ((False, True) if loss_type in ("sigmoid", "robust") else (False,))]


def ours(x, loss_type, beta, eps, use_margin, **kw):
  """preference_loss on float32 inputs -> (loss, metrics) as float64 NumPy."""
  f32 = {k: jnp.asarray(x[k], jnp.float32) for k in ARGS}
  loss, metrics = preference_loss(
      f32["chosen"], f32["rejected"], f32["ref_chosen"], f32["ref_rejected"], beta=beta,
      loss_type=loss_type, label_smoothing=eps, chosen_lengths=x["chosen_lengths"],
      rejected_lengths=x["rejected_lengths"], margin=x["margin"] if use_margin else None, **kw)
  return np.asarray(loss, np.float64), {k: np.asarray(v, np.float64) for k, v in metrics.items()}


@pytest.mark.parametrize("loss_type,beta,eps,use_margin", CASES)
def test_loss_and_metrics_match_reference(loss_type, beta, eps, use_margin):
  x = batch()
  loss, metrics = ours(x, loss_type, beta, eps, use_margin)
  want, reward_c, reward_r = REFERENCES[loss_type](x, beta, eps, x["margin"] if use_margin else 0.0)
  assert loss.shape == (B,)
  np.testing.assert_allclose(loss, want, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(metrics["rewards/chosen"], reward_c, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["rewards/rejected"], reward_r, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["rewards/margins"], reward_c - reward_r, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(metrics["rewards/accuracies"], (reward_c > reward_r).astype(float))
  np.testing.assert_allclose(metrics["logps/chosen"], x["chosen"], rtol=1e-7)
  np.testing.assert_allclose(metrics["logps/rejected"], x["rejected"], rtol=1e-7)
  assert 0 < metrics["rewards/accuracies"].sum() < B  # the batch exercises both outcomes


@pytest.mark.parametrize("loss_type,beta,eps,use_margin", CASES)
def test_gradient_matches_finite_differences(loss_type, beta, eps, use_margin):
  x = batch(1)
  margin = x["margin"] if use_margin else 0.0

  def loss_sum(*logps):
    loss, _ = preference_loss(*logps, beta=beta, loss_type=loss_type, label_smoothing=eps,
                              chosen_lengths=x["chosen_lengths"], rejected_lengths=x["rejected_lengths"],
                              margin=x["margin"] if use_margin else None)
    return jnp.sum(loss)

  grads = jax.grad(loss_sum, argnums=(0, 1, 2, 3))(*(jnp.asarray(x[k], jnp.float32) for k in ARGS))
  h = 1e-5
  for name, grad in zip(ARGS, grads):
    # Pair i's loss depends only on pair i's inputs, so moving all entries at once gives each
    # d loss_i / d x_i by central differences.
    up, down = dict(x), dict(x)
    up[name], down[name] = x[name] + h, x[name] - h
    fd = (REFERENCES[loss_type](up, beta, eps, margin)[0]
          - REFERENCES[loss_type](down, beta, eps, margin)[0]) / (2 * h)
    np.testing.assert_allclose(np.asarray(grad), fd, rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_nll_term_adds_chosen_per_token_nll(loss_type):
  x = batch(2)
  base, _ = ours(x, loss_type, 0.1, 0.0, False)
  with_nll, _ = ours(x, loss_type, 0.1, 0.0, False, nll_coef=0.7)
  np.testing.assert_allclose(with_nll - base, 0.7 * -x["chosen"] / x["chosen_lengths"], rtol=1e-5,
                             atol=1e-5)


def test_loss_type_options_reach_the_loss():
  x = batch(3)
  for loss_type, kw, ref in (("simpo", dict(simpo_gamma=1.3), functools.partial(ref_simpo, gamma=1.3)),
                             ("orpo", dict(orpo_alpha=0.6), functools.partial(ref_orpo, alpha=0.6))):
    loss, _ = ours(x, loss_type, 0.5, 0.0, False, **kw)
    np.testing.assert_allclose(loss, ref(x, 0.5, 0.0, 0.0)[0], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("beta", BETAS)
def test_step_zero_reference_equals_policy(beta):
  x = batch(4)
  logps = [jnp.asarray(x[k], jnp.float32) for k in ("chosen", "rejected")]
  loss, metrics = preference_loss(*logps, *logps, beta=beta)
  np.testing.assert_array_equal(loss, np.full(B, np.log(2.0), np.float32))  # exactly ln 2
  for name in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
    np.testing.assert_array_equal(metrics[name], np.zeros(B, np.float32), err_msg=name)
  for loss_type in ("sigmoid", "robust"):  # cDPO and robust DPO are ln 2 at h = 0 for any eps
    loss, _ = preference_loss(*logps, *logps, beta=beta, loss_type=loss_type, label_smoothing=0.3)
    np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("chosen", ([-1e3, -2e3, -1e-3, 0.0], [-1.0, -5.0, -3e3, -1e3]))
def test_large_log_ratios_give_finite_loss_and_gradients(loss_type, chosen):
  # beta * log-ratio gaps of about +-1e3: the logistic losses must not overflow, and ORPO's
  # log(1 - p) must survive p -> 0 and p -> 1 (an average log-prob of exactly 0).
  logps = [jnp.array(chosen), jnp.array([-1.0, -1.0, -2e3, -1e3]), jnp.array([-1.0, 0.0, -1e3, -5e2]),
           jnp.array([-2e3, -3e3, -1.0, 0.0])]
  lengths = jnp.array([1, 7, 1000, 3])
  eps = 0.1 if loss_type in ("sigmoid", "robust", "simpo") else 0.0

  def total(*logps):
    loss, _ = preference_loss(*logps, beta=0.5, loss_type=loss_type, label_smoothing=eps,
                              chosen_lengths=lengths, rejected_lengths=lengths[::-1], nll_coef=1.0)
    return jnp.sum(loss), loss

  grads, loss = jax.grad(total, argnums=(0, 1, 2, 3), has_aux=True)(*logps)
  assert np.all(np.isfinite(loss)), loss
  for grad in grads:
    assert np.all(np.isfinite(grad)), grad


def test_empty_pair_slots_stay_finite():
  zeros = jnp.zeros(3)
  for loss_type in LOSS_TYPES:
    loss, metrics = preference_loss(zeros, zeros, zeros, zeros, beta=0.1, loss_type=loss_type,
                                    chosen_lengths=jnp.zeros(3, jnp.int32),
                                    rejected_lengths=jnp.zeros(3, jnp.int32))
    assert np.all(np.isfinite(loss)) and all(np.all(np.isfinite(v)) for v in metrics.values())


def test_reference_free_losses_need_no_reference():
  x = batch(5)
  c, r = jnp.asarray(x["chosen"], jnp.float32), jnp.asarray(x["rejected"], jnp.float32)
  for loss_type in ("simpo", "orpo"):
    loss, _ = preference_loss(c, r, None, None, beta=0.5, loss_type=loss_type,
                              chosen_lengths=x["chosen_lengths"], rejected_lengths=x["rejected_lengths"])
    np.testing.assert_allclose(loss, ours(x, loss_type, 0.5, 0.0, False)[0], rtol=1e-6)


def test_jit_matches_eager():
  x = batch(6)
  args = [jnp.asarray(x[k], jnp.float32) for k in ARGS]
  lengths = dict(chosen_lengths=x["chosen_lengths"], rejected_lengths=x["rejected_lengths"])
  fn = functools.partial(preference_loss, beta=0.1, loss_type="ipo")
  eager, _ = fn(*args, **lengths)
  jitted, _ = jax.jit(fn)(*args, **lengths)
  np.testing.assert_allclose(jitted, eager, rtol=1e-6)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_packed_rows_and_pairs_shape_works_elementwise(loss_type):
  x = batch(7)
  flat, _ = ours(x, loss_type, 0.1, 0.0, False)
  packed = {k: np.reshape(v, (4, 4)) for k, v in x.items()}  # [R, P] from pair_sums
  loss, metrics = ours(packed, loss_type, 0.1, 0.0, False)
  assert loss.shape == metrics["rewards/chosen"].shape == (4, 4)
  np.testing.assert_allclose(loss.reshape(-1), flat, rtol=1e-6)


def test_a_new_loss_type_is_one_registered_function(monkeypatch):
  monkeypatch.setattr(dpo, "LOSS_TYPES", dict(dpo.LOSS_TYPES))

  @dpo.register("squared")
  def squared(p, *, beta):
    rc, rr = beta * (p.chosen - p.ref_chosen), beta * (p.rejected - p.ref_rejected)
    return jnp.square(1.0 - (rc - rr)), rc, rr

  one = jnp.ones(2)
  loss, metrics = preference_loss(one, one, one, one, beta=0.1, loss_type="squared")
  np.testing.assert_allclose(loss, 1.0)
  assert set(metrics) >= {"rewards/chosen", "rewards/accuracies", "logps/chosen"}


def test_errors_name_what_is_wrong():
  one = jnp.ones(2)
  with pytest.raises(ValueError, match="unknown loss_type 'dpo'; valid: hinge, ipo, orpo, robust, sig"):
    preference_loss(one, one, one, one, beta=0.1, loss_type="dpo")
  with pytest.raises(ValueError, match="'ipo' needs chosen_lengths"):
    preference_loss(one, one, one, one, beta=0.1, loss_type="ipo")
  with pytest.raises(ValueError, match="'simpo' needs rejected_lengths"):
    preference_loss(one, one, one, one, beta=0.1, loss_type="simpo", chosen_lengths=one)
  with pytest.raises(ValueError, match="nll_coef > 0 needs chosen_lengths"):
    preference_loss(one, one, one, one, beta=0.1, nll_coef=1.0)
  with pytest.raises(ValueError, match="'sigmoid' needs ref_chosen_logps"):
    preference_loss(one, one, None, None, beta=0.1)
  with pytest.raises(ValueError, match="'hinge' takes no label_smoothing.*sigmoid, robust, simpo"):
    preference_loss(one, one, one, one, beta=0.1, loss_type="hinge", label_smoothing=0.1)
  with pytest.raises(ValueError, match=r"label_smoothing must lie in \[0, 0.5\)"):
    preference_loss(one, one, one, one, beta=0.1, loss_type="robust", label_smoothing=0.5)
  with pytest.raises(ValueError, match="'ipo' takes no margin.*sigmoid, robust"):
    preference_loss(one, one, one, one, beta=0.1, loss_type="ipo", margin=one, chosen_lengths=one,
                    rejected_lengths=one)
  with pytest.raises(TypeError, match="simpo_gamma"):
    preference_loss(one, one, one, one, beta=0.1, simpo_gamma=1.0)
