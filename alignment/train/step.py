"""The pure train / eval steps every algorithm shares.

An algorithm supplies `loss_fn(params, frozen, batch, rng) -> (loss_sum, (count, aux))`: the SUM of its
per-token (or per-pair) losses, the count it should be normalised by (tokens, pairs), and a dict of
summed statistics. `frozen` is the state's untrained params (a DPO reference model), or None. The step sums all three over micro-batches and divides once, so accumulating k
micro-batches gives exactly the update of one batch k times larger, however uneven their lengths.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from alignment.parallel import BATCH_AXES


def _split_micro_batches(batch, num_micro: int):
  """[B, ...] -> [k, B/k, ...], micro-batch i holding rows i, i+k, ... so each stays spread over devices."""
  def split(x):
    if x.shape[0] % num_micro:
      raise ValueError(f"batch of {x.shape[0]} rows is not divisible into {num_micro} micro-batches")
    x = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:])
    x = jnp.swapaxes(x, 0, 1)
    return jax.lax.with_sharding_constraint(x, P(None, BATCH_AXES)) if _has_mesh() else x
  return jax.tree.map(split, batch)


def _has_mesh() -> bool:
  return not jax.sharding.get_abstract_mesh().empty


def accumulate_gradients(loss_fn: Callable, params, frozen, batch, rng, num_micro: int):
  """Returns (summed grads, loss_sum, count, aux sums) over `num_micro` micro-batches."""
  grad_fn = jax.value_and_grad(lambda p, b, r: loss_fn(p, frozen, b, r), has_aux=True)
  if num_micro == 1:
    (loss_sum, (num_tokens, aux)), grads = grad_fn(params, batch, rng)
    return grads, loss_sum, num_tokens, aux

  micro = _split_micro_batches(batch, num_micro)
  rngs = jax.random.split(rng, num_micro)
  (_, (_, aux_shape)), grads_shape = jax.eval_shape(
      grad_fn, params, jax.tree.map(lambda x: x[0], micro), rngs[0])
  zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), tree)
  init = (zeros(grads_shape), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros(aux_shape))

  def body(carry, xs):
    mb, r = xs
    (loss_sum, (num_tokens, aux)), grads = grad_fn(params, mb, r)
    add = lambda a, b: jax.tree.map(lambda x, y: x + y.astype(jnp.float32), a, b)
    return (add(carry[0], grads), carry[1] + loss_sum, carry[2] + num_tokens, add(carry[3], aux)), None

  (grads, loss_sum, num_tokens, aux), _ = jax.lax.scan(body, init, (micro, rngs))
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
  return grads, loss_sum, num_tokens, aux


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation, schedule, grad_accum_steps: int,
                    count_name: str = "num_tokens"):
  """Builds `train_step(state, batch) -> (state, metrics)`.

  state = {params, opt_state, step, rng} plus, for algorithms with a reference, `frozen` (never updated).
  """

  def train_step(state, batch):
    rng, step_rng = jax.random.split(state["rng"])
    grads, loss_sum, count, aux = accumulate_gradients(
        loss_fn, state["params"], state.get("frozen"), batch, step_rng, grad_accum_steps)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss_sum / denom, count_name: count,
               "grad_norm": optax.global_norm(grads), "lr": schedule(state["step"])}
    metrics.update({k: v / denom for k, v in aux.items()})
    return dict(state, params=params, opt_state=opt_state, step=state["step"] + 1, rng=rng), metrics

  return train_step


def make_eval_step(loss_fn: Callable):
  """`eval_step(params, frozen, batch) -> sums` of loss, count and aux; the caller divides after the pass."""

  def eval_step(params, frozen, batch):
    loss_sum, (count, aux) = loss_fn(params, frozen, batch, jax.random.PRNGKey(0))
    return {"loss": loss_sum, "count": count, **aux}

  return eval_step
