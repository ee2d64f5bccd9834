"""The optimizer's frozen rows: exactly unchanged, weight decay included, while the rest moves as without them."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from alignment.train.optim import make_optimizer


def _optim(**kw):
  base = dict(lr=0.1, schedule="constant", warmup_steps=0, end_lr_ratio=0.1, b1=0.9, b2=0.999, eps=1e-8,
              weight_decay=0.5, clip_norm=0.0)
  return ml_collections.ConfigDict({**base, **kw})


def test_frozen_layers_keep_their_rows_under_weight_decay():
  rng = np.random.default_rng(0)
  params = {"embed": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32),
            "layers": {"mlp": {"up": jnp.asarray(rng.standard_normal((4, 3, 2)), jnp.float32)},
                       "attn_norm": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32)}}
  grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)

  def steps(tx):
    state, p = tx.init(params), params
    for _ in range(3):
      updates, state = tx.update(grads, state, p)
      p = optax.apply_updates(p, updates)
    return p

  free = steps(make_optimizer(_optim(), 10)[0])
  frozen = steps(make_optimizer(_optim(), 10, frozen_layers=3)[0])
  for path in (("layers", "mlp", "up"), ("layers", "attn_norm")):
    get = lambda t: t[path[0]][path[1]][path[2]] if len(path) == 3 else t[path[0]][path[1]]
    np.testing.assert_array_equal(get(frozen)[:3], get(params)[:3])
    np.testing.assert_allclose(get(frozen)[3:], get(free)[3:], rtol=1e-6)
    assert not np.allclose(get(free)[:3], get(params)[:3])
  np.testing.assert_allclose(frozen["embed"], free["embed"], rtol=1e-6)  # not a layer: trained as usual


def test_wholly_frozen_leaves_keep_no_optimizer_state_and_the_rest_trains_as_without_them():
  rng = np.random.default_rng(1)
  params = {"embed": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32),
            "layers": {"up": jnp.asarray(rng.standard_normal((4, 3, 2)), jnp.float32)},
            "head": {"kernel": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32)}}
  grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
  free_tx = make_optimizer(_optim(), 10)[0]
  head_only = make_optimizer(_optim(), 10, frozen_layers=4, frozen_embeddings=True)[0]
  sizes = lambda state: sum(np.size(x) for x in jax.tree.leaves(state) if np.ndim(x))  # the moments
  assert sizes(head_only.init(params)) == 2 * params["head"]["kernel"].size
  assert sizes(free_tx.init(params)) == 2 * sum(p.size for p in jax.tree.leaves(params))
  p_free, p_frozen, s_free, s_frozen = params, params, free_tx.init(params), head_only.init(params)
  for _ in range(3):
    u, s_free = free_tx.update(grads, s_free, p_free)
    p_free = optax.apply_updates(p_free, u)
    u, s_frozen = head_only.update(grads, s_frozen, p_frozen)
    p_frozen = optax.apply_updates(p_frozen, u)
  np.testing.assert_array_equal(p_frozen["embed"], params["embed"])
  np.testing.assert_array_equal(p_frozen["layers"]["up"], params["layers"]["up"])
  np.testing.assert_allclose(p_frozen["head"]["kernel"], p_free["head"]["kernel"], rtol=1e-6)
  assert not np.allclose(p_free["head"]["kernel"], params["head"]["kernel"])
