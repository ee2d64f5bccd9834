"""group_advantages against plain loops over the groups."""

import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignment.losses import grpo
from alignment.losses.grpo import group_advantages, informative_groups, overlong_penalty

G = 4
EPS = 1e-4


def rewards():
  rng = np.random.default_rng(0)
  r = rng.integers(0, 3, 6 * G).astype(np.float32) + rng.normal(0, 0.1, 6 * G).astype(np.float32)
  r[G:2 * G] = 1.0  # a group whose completions all scored the same
  return r


def loop(r, kind):
  out = []
  for start in range(0, len(r), G):
    group = [float(v) for v in r[start:start + G]]
    mean = sum(group) / G
    for i, value in enumerate(group):
      if kind == "grpo":  # DeepSeekMath (Shao et al. 2024): (r - mean) / std within the group
        out.append((value - mean) / (statistics.stdev(group) + EPS))
      elif kind == "dr_grpo":  # Dr. GRPO (Liu et al. 2025): no std division
        out.append(value - mean)
      elif kind == "rloo":  # RLOO (Ahmadian et al. 2024): baseline = mean of the other samples
        out.append(value - (sum(group) - value) / (G - 1))
  if kind == "reinforce_pp":  # REINFORCE++ (Hu 2025): normalised over the whole batch
    all_r = [float(v) for v in r]
    mean = sum(all_r) / len(all_r)
    out = [(v - mean) / (statistics.stdev(all_r) + EPS) for v in all_r]
  return np.array(out)


@pytest.mark.parametrize("kind", ("grpo", "dr_grpo", "rloo", "reinforce_pp"))
def test_matches_loop(kind):
  r = rewards()
  got = group_advantages(jnp.asarray(r), G, kind=kind)
  assert got.shape == r.shape
  np.testing.assert_allclose(got, loop(r, kind), rtol=1e-5, atol=1e-5)
  if kind != "reinforce_pp":
    np.testing.assert_array_equal(got[G:2 * G], 0.0)  # equal rewards carry no signal


def test_no_gradient_flows_into_rewards():
  grad = jax.grad(lambda r: jnp.sum(group_advantages(r, G, kind="grpo") * jnp.arange(8.0)))(
      jnp.arange(8.0))
  np.testing.assert_array_equal(grad, np.zeros(8))


def test_a_new_estimator_is_one_registered_function(monkeypatch):
  monkeypatch.setattr(grpo, "ESTIMATORS", dict(grpo.ESTIMATORS))

  @grpo.register("max_baseline")
  def max_baseline(groups):
    return groups - jnp.max(groups, axis=1, keepdims=True)

  np.testing.assert_allclose(group_advantages(jnp.arange(4.0), 2, kind="max_baseline"), [-1, 0, -1, 0])


def test_errors():
  with pytest.raises(ValueError, match="unknown advantage estimator 'ppo'.*grpo, dr_grpo, rloo, rein"):
    group_advantages(jnp.zeros(8), G, kind="ppo")
  with pytest.raises(ValueError, match=r"group_size must be >= 2 and divide the number of rewards \(8"):
    group_advantages(jnp.zeros(8), 3, kind="grpo")
  with pytest.raises(ValueError, match="group_size"):
    group_advantages(jnp.zeros(8), 1, kind="rloo")


def test_informative_groups_are_those_with_unequal_rewards():
  r = rewards()
  want = [len(set(float(v) for v in r[i:i + G])) > 1 for i in range(0, len(r), G)]
  assert want[1] is False and any(want)
  np.testing.assert_array_equal(informative_groups(r, G), want)


def test_overlong_penalty_is_dapos_piecewise_ramp():
  max_len, cache = 20, 4
  lengths = np.arange(0, 26)
  want = [0.0 if n <= max_len - cache else (max_len - cache - n) / cache if n <= max_len else -1.0 for n in lengths]
  np.testing.assert_allclose(overlong_penalty(lengths, max_len=max_len, cache_len=cache), want, rtol=1e-6)
  assert want[16] == 0.0 and want[18] == -0.5 and want[20] == -1.0 and want[25] == -1.0
