"""The pure train / eval steps every supervised algorithm shares.

An algorithm supplies `loss_fn(parts, batch, rng) -> (loss_sum, (count, aux))`: the SUM of its
per-token (or per-pair) losses, the count it should be normalised by (tokens, pairs), and a dict of
summed statistics. `parts` maps the state's part names to their params ({'policy', 'ref'} for DPO);
gradients are taken for the trained parts only. The step sums all three over micro-batches and divides
once, so accumulating k micro-batches gives exactly the update of one batch k times larger, however
uneven their lengths.

A step whose loss or gradient norm is not finite changes no params and no optimizer state: it counts
in `skipped_steps` (the loop then goes on or halts, `config.train.nan_policy`).
"""

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from alignment.parallel import BATCH_AXES
from alignment.train.state import Optimizer, parts_of


def split_micro_batches(batch, num_micro: int):
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


def accumulate_gradients(loss_fn: Callable, trained: dict, fixed: dict, batch, rng, num_micro: int):
  """Returns (summed grads of the `trained` parts, loss_sum, count, aux sums) over `num_micro`
  micro-batches; the `fixed` parts are inputs only."""
  grad_fn = jax.value_and_grad(lambda t, b, r: loss_fn({**t, **fixed}, b, r), has_aux=True)
  if num_micro == 1:
    (loss_sum, (num_tokens, aux)), grads = grad_fn(trained, batch, rng)
    return grads, loss_sum, num_tokens, aux

  micro = split_micro_batches(batch, num_micro)
  rngs = jax.random.split(rng, num_micro)
  (_, (_, aux_shape)), grads_shape = jax.eval_shape(
      grad_fn, trained, jax.tree.map(lambda x: x[0], micro), rngs[0])
  zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), tree)
  init = (zeros(grads_shape), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros(aux_shape))

  def body(carry, xs):
    mb, r = xs
    (loss_sum, (num_tokens, aux)), grads = grad_fn(trained, mb, r)
    add = lambda a, b: jax.tree.map(lambda x, y: x + y.astype(jnp.float32), a, b)
    return (add(carry[0], grads), carry[1] + loss_sum, carry[2] + num_tokens, add(carry[3], aux)), None

  (grads, loss_sum, num_tokens, aux), _ = jax.lax.scan(body, init, (micro, rngs))
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trained)
  return grads, loss_sum, num_tokens, aux


def make_train_step(loss_fn: Callable, optimizers: Mapping[str, Optimizer], grad_accum_steps: int,
                    count_name: str = "num_tokens"):
  """Builds `train_step(state, batch) -> (state, metrics)` for a state with the trained parts
  `optimizers` names (each updated by its own optimizer) and any number of fixed parts.

  Metrics: loss, the count, grad_norm (over every trained part) and lr (the first trained part's),
  plus grad_norm/<part> and lr/<part> when several parts train, the aux means, and
  train/skipped_steps (so far in the run)."""
  names = tuple(optimizers)

  def train_step(state, batch):
    rng, step_rng = jax.random.split(state["rng"])
    trained = {name: state[name] for name in names}
    fixed = {name: value for name, value in parts_of(state).items() if name not in names}
    grads, loss_sum, count, aux = accumulate_gradients(loss_fn, trained, fixed, batch, step_rng, grad_accum_steps)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom.astype(g.dtype), grads)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss_sum) & jnp.isfinite(grad_norm)

    def update(args):
      params, opt_states = args
      new_params, new_opt_states = {}, {}
      for name in names:
        updates, new_opt_states[name] = optimizers[name].tx.update(grads[name], opt_states[name], params[name])
        new_params[name] = optax.apply_updates(params[name], updates)
      return new_params, new_opt_states

    # A branch, not a select of new and old values: `where` over params and moments costs an extra pass over
    # memory every step (~0.3 s on SmolLM2 on 2 CPU cores); the skip branch runs only on a bad step.
    new_params, new_opt_states = jax.lax.cond(finite, update, lambda args: args, (trained, state["opt_state"]))
    new_state = dict(state, **new_params, opt_state=new_opt_states, rng=rng, step=state["step"] + 1)
    metrics = {"loss": loss_sum / denom, count_name: count, "grad_norm": grad_norm,
               "lr": optimizers[names[0]].schedule(state["step"])}
    if len(names) > 1:
      for name in names:
        metrics[f"grad_norm/{name}"] = optax.global_norm(grads[name])
        metrics[f"lr/{name}"] = optimizers[name].schedule(state["step"])
    skipped = (~finite).astype(jnp.int32)
    new_state["skipped_steps"] = state["skipped_steps"] + skipped
    new_state["first_skipped_step"] = jnp.where((state["first_skipped_step"] < 0) & ~finite, state["step"] + 1,
                                                state["first_skipped_step"])
    metrics["train/skipped_steps"] = new_state["skipped_steps"]
    metrics.update({k: v / denom for k, v in aux.items()})
    return new_state, metrics

  return train_step


def make_eval_step(loss_fn: Callable):
  """`eval_step(parts, batch) -> sums` of loss, count and aux; the caller divides after the pass."""

  def eval_step(parts, batch):
    loss_sum, (count, aux) = loss_fn(parts, batch, jax.random.PRNGKey(0))
    return {"loss": loss_sum, "count": count, **aux}

  return eval_step
