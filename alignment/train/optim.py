"""The optimizer from config: AdamW, warmup + cosine/linear/constant decay, global-norm clipping."""

import jax
import jax.numpy as jnp
import optax

from alignment.choices import SCHEDULES
from alignment.train.state import Optimizer


def learning_rate_schedule(optim, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 over `optim.warmup_steps`, then `optim.schedule` down to lr * end_lr_ratio."""
  if optim.schedule not in SCHEDULES:
    raise ValueError(f"config.optim.schedule={optim.schedule!r}; expected one of {SCHEDULES}")
  warmup = min(int(optim.warmup_steps), max(total_steps - 1, 0))
  decay_steps = max(total_steps - warmup, 1)
  end = optim.lr * optim.end_lr_ratio
  if optim.schedule == "cosine":
    decay = optax.cosine_decay_schedule(optim.lr, decay_steps, alpha=optim.end_lr_ratio)
  elif optim.schedule == "linear":
    decay = optax.linear_schedule(optim.lr, end, decay_steps)
  else:
    decay = optax.constant_schedule(optim.lr)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, warmup), decay], [warmup])


def _decay_mask(params):
  """Weight decay on weights only: nothing whose path names a norm scale or a bias."""
  def keep(path, _):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return not any("norm" in n or n.endswith("bias") for n in names)
  return jax.tree_util.tree_map_with_path(keep, params)


def _frozen_rows(path, leaf, frozen_layers: int, frozen_embeddings: bool) -> int:
  """How many leading rows of a param leaf `config.model.frozen_*` freezes: all of the embedding table
  ('embed') with `frozen_embeddings`, the first `frozen_layers` of a stacked layer weight (a leaf under a
  'layers' key), none of anything else."""
  keys = [getattr(k, "key", None) for k in path]
  if frozen_embeddings and keys[-1] == "embed":
    return leaf.shape[0]
  return min(frozen_layers, leaf.shape[0]) if "layers" in keys else 0


def freeze(frozen_layers: int, frozen_embeddings: bool = False) -> optax.GradientTransformation:
  """Zeroes the updates of the rows `_frozen_rows` names, so what `config.model.frozen_*` freezes stays
  exactly as loaded, weight decay included."""
  def mask(path, update):
    rows = _frozen_rows(path, update, frozen_layers, frozen_embeddings)
    if not rows:
      return update
    if rows == update.shape[0]:
      return jnp.zeros_like(update)
    keep = (jnp.arange(update.shape[0]) >= rows).astype(update.dtype)
    return update * keep.reshape((-1,) + (1,) * (update.ndim - 1))
  return optax.stateless(lambda updates, params: jax.tree_util.tree_map_with_path(mask, updates))


def _has_trained_rows(frozen_layers: int, frozen_embeddings: bool):
  """params -> a tree of bools: False for a leaf `freeze` zeroes whole (the embedding table when frozen, a
  stacked layer weight when every layer is frozen), so AdamW keeps no moments for it and skips it each step:
  a head on a frozen backbone updates the head alone, not 135M zeros."""
  def trained(path, leaf):
    rows = _frozen_rows(path, leaf, frozen_layers, frozen_embeddings)
    return not rows or rows < leaf.shape[0]
  return lambda params: jax.tree_util.tree_map_with_path(trained, params)


def make_optimizer(optim, total_steps: int, *, frozen_layers: int = 0, frozen_embeddings: bool = False) -> Optimizer:
  """(optax transformation, learning-rate schedule) from a `config.optim` block."""
  schedule = learning_rate_schedule(optim, total_steps)
  parts = []
  if optim.clip_norm and optim.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim.clip_norm))
  adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                      mask=_decay_mask)
  if frozen_layers or frozen_embeddings:
    parts += [optax.masked(adamw, _has_trained_rows(frozen_layers, frozen_embeddings)),
              freeze(frozen_layers, frozen_embeddings)]
  else:
    parts.append(adamw)
  return Optimizer(optax.chain(*parts), schedule)


def model_optimizer(config) -> Optimizer:
  """The optimizer of the model `config.model` describes: `config.optim` over `config.train.steps`, with
  the layers and embedding that `config.model` freezes left exactly as loaded."""
  return make_optimizer(config.optim, config.train.steps, frozen_layers=config.model.get("frozen_layers", 0),
                        frozen_embeddings=config.model.get("frozen_embeddings", False))
