"""Direct preference optimisation and its variants (`config.dpo.loss_type`), on packed preference rows.

The reference is either live (a frozen copy of the starting params in the train state, evaluated in
the same fused kernel sweep as the policy) or cached: its sequence log-probabilities are computed once
over the train split, stored under `config.dpo.ref_cache_dir` keyed by model and data fingerprints,
and attached to each batch on the host. Reference-free losses (simpo, orpo) use neither.
"""

import hashlib
import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignment.kernels import token_logprobs
from alignment.losses.dpo import LOSS_TYPES, preference_loss
from alignment.losses.sequence import pair_sums
from alignment.parallel import host_batch_to_global
from alignment.train import preference as pref_task
from alignment.train import state as state_lib
from alignment.train.model import setup_model
from alignment.train.task import Task


def sequence_logps(graphdef, params, batch, *, impl: str, pairs_per_row: int, ref_params=None):
  """Per-pair completion log-prob sums of the policy (and the reference): dict of float32 [R, P].

  When the model freezes its embedding and bottom layers (`frozen_embeddings`, `frozen_layers`), the
  policy and the reference hold the same trunk weights, so the trunk runs once for both."""
  model = nnx.merge(graphdef, params)
  inputs = (batch["inputs"], batch["positions"], batch["segment_ids"])
  flat = lambda h: h.reshape(-1, h.shape[-1])
  cfg = model.cfg
  share_trunk = ref_params is not None and cfg.frozen_layers and cfg.frozen_embeddings
  x, ctx = model.trunk(*inputs)
  hidden, unembed = flat(model.top(x, ctx)), model.unembed_matrix()
  ref = {}
  if ref_params is not None:
    ref_model = nnx.merge(graphdef, jax.lax.stop_gradient(ref_params))
    ref_hidden = ref_model.top(x, ctx) if share_trunk else ref_model(*inputs)
    ref = dict(ref_hidden=flat(ref_hidden), ref_unembed=ref_model.unembed_matrix())
  stats = token_logprobs(hidden, unembed, batch["targets"].reshape(-1), impl=impl, **ref)
  mask = batch["loss_mask"].astype(jnp.float32)
  rows = mask.shape
  out = {}
  out["chosen"], out["rejected"] = pair_sums(stats.logprobs.reshape(rows) * mask, batch["segment_ids"],
                                             pairs_per_row)
  out["chosen_lengths"], out["rejected_lengths"] = pair_sums(mask, batch["segment_ids"], pairs_per_row)
  if ref_params is not None:
    out["ref_chosen"], out["ref_rejected"] = pair_sums(stats.ref_logprobs.reshape(rows) * mask,
                                                       batch["segment_ids"], pairs_per_row)
  return out


def make_loss_fn(graphdef, dpo_config, *, impl: str, pairs_per_row: int):
  """(params, frozen, batch, rng) -> (loss summed over real pairs, (pair count, metric sums))."""
  loss_kwargs = dict(beta=dpo_config.beta, loss_type=dpo_config.loss_type,
                     label_smoothing=dpo_config.label_smoothing, nll_coef=dpo_config.nll_coef)
  if dpo_config.loss_type == "simpo":
    loss_kwargs["simpo_gamma"] = dpo_config.simpo_gamma
  if dpo_config.loss_type == "orpo":
    loss_kwargs["orpo_alpha"] = dpo_config.orpo_alpha
  spec = LOSS_TYPES[dpo_config.loss_type]

  def loss_fn(params, frozen, batch, rng):
    del rng
    s = sequence_logps(graphdef, params, batch, impl=impl, pairs_per_row=pairs_per_row, ref_params=frozen)
    if spec.reference_free:
      ref_c = ref_r = jnp.zeros_like(s["chosen"])
    elif frozen is not None:
      ref_c, ref_r = s["ref_chosen"], s["ref_rejected"]
    else:
      ref_c, ref_r = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    flat = lambda x: x.reshape(-1)
    extra = {"margin": flat(batch["margin"])} if spec.margin and dpo_config.use_margin else {}
    loss, metrics = preference_loss(flat(s["chosen"]), flat(s["rejected"]), flat(ref_c), flat(ref_r),
                                    chosen_lengths=flat(s["chosen_lengths"]),
                                    rejected_lengths=flat(s["rejected_lengths"]), **loss_kwargs, **extra)
    weight = flat(batch["pair_mask"]).astype(jnp.float32)
    return (loss * weight).sum(), (weight.sum(), {k: (v * weight).sum() for k, v in metrics.items()})

  return loss_fn


def params_fingerprint(params) -> str:
  """A content hash of (possibly sharded) params that never gathers them on one host: per leaf, its
  shape, dtype and two position-weighted float64-accumulated sums computed on the devices."""
  def leaf_stats(x):
    flat = x.reshape(-1).astype(jnp.float32)
    weights = jnp.sin(jnp.arange(flat.size, dtype=jnp.float32) * 0.7853981)  # order-sensitive
    return jnp.stack([flat.sum(), (flat * weights).sum()])
  stats = jax.device_get(jax.jit(lambda p: jax.tree.map(leaf_stats, p))(params))
  h = hashlib.sha256()
  for (path, s), leaf in zip(jax.tree_util.tree_leaves_with_path(stats), jax.tree.leaves(params)):
    h.update(f"{jax.tree_util.keystr(path)}|{leaf.shape}|{leaf.dtype}|{np.asarray(s).tobytes().hex()}".encode())
  return h.hexdigest()[:20]


def reference_logps_cache(path: str, graphdef, ref_params, batches, num_pairs: int, mesh, *, impl: str,
                          pairs_per_row: int) -> np.ndarray:
  """float32 [num_pairs, 2] (chosen, rejected) reference log-prob sums, computed once and kept at `path`.

  Each host computes and caches the pairs of its own shard (the only ones its batches hold), so the
  cache key includes the host's index; pairs the length rule drops stay 0 (they never reach a batch).
  """
  if os.path.exists(path):
    cached = np.load(path)
    if cached.shape == (num_pairs, 2):
      return cached
  fn = jax.jit(lambda p, b: sequence_logps(graphdef, p, b, impl=impl, pairs_per_row=pairs_per_row))
  table = np.full((num_pairs, 2), np.nan, np.float32)
  for host_batch in batches:
    out = jax.device_get(fn(ref_params, host_batch_to_global(host_batch, mesh)))
    real = host_batch["pair_mask"].astype(bool)
    index = host_batch["pair_index"][real]
    table[index, 0], table[index, 1] = out["chosen"][real], out["rejected"][real]
  kept = batches.stats["pairs"] - batches.stats["dropped"]  # pairs the length rule drops never reach a batch
  covered = int((~np.isnan(table[:, 0])).sum())
  if covered != kept:
    raise ValueError(f"reference pass covered {covered} pairs; the data pipeline kept {kept} of {num_pairs}")
  table = np.nan_to_num(table)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.save(path + ".tmp.npy", table)
  os.replace(path + ".tmp.npy", path)  # never leaves a half-written cache behind
  return table


class WithCachedReference:
  """Wraps a preference iterator: adds `ref_chosen_logps`/`ref_rejected_logps` [R, P] from the cache."""

  def __init__(self, iterator, table: np.ndarray):
    self.iterator, self.table = iterator, table

  def __iter__(self):
    return self

  def __next__(self):
    batch = dict(next(self.iterator))
    index = np.maximum(batch["pair_index"], 0)
    real = batch["pair_mask"].astype(np.float32)
    batch["ref_chosen_logps"] = self.table[index, 0] * real
    batch["ref_rejected_logps"] = self.table[index, 1] * real
    return batch

  def get_state(self):
    return self.iterator.get_state()

  def set_state(self, state):
    self.iterator.set_state(state)


def build_task(config, mesh, host_batch_size: int) -> Task:
  d, c = config.data, config.dpo
  if c.loss_type not in LOSS_TYPES:
    raise ValueError(f"config.dpo.loss_type={c.loss_type!r}; expected one of {sorted(LOSS_TYPES)}")
  if c.reference not in ("live", "cached"):
    raise ValueError(f"config.dpo.reference={c.reference!r}; expected 'live' or 'cached'")
  model = setup_model(config.model, config.seed)
  data = pref_task.preference_data(config, model.tokenizer, host_batch_size)
  loss_fn = make_loss_fn(model.spec.graphdef, c, impl=config.kernel.impl, pairs_per_row=d.pairs_per_row)
  needs_reference = not LOSS_TYPES[c.loss_type].reference_free
  task = Task(model.spec, model.load_params, loss_fn, data.train, data.eval, dict(data.info),
              load_frozen=model.load_params if needs_reference and c.reference == "live" else None,
              count_name="num_pairs", model_cfg=model.cfg, tokenizer=model.tokenizer,
              reward_metric="rewards/margins")
  if needs_reference and c.reference == "cached":
    rules = tuple(tuple(r) for r in config.sharding.rules)
    ref_params = model.load_params(state_lib.param_shardings(model.spec, mesh, rules))
    model_fp = params_fingerprint(ref_params)
    cache_dir = c.ref_cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "alignment", "ref_logps")
    tables = {}
    for split in data.splits:
      key = json.dumps(dict(model=model_fp, data=data.fingerprint, split=split, seq_len=d.seq_len,
                            max_length=d.max_length, truncation=d.truncation, pairs_per_row=d.pairs_per_row,
                            impl=config.kernel.impl, host=(jax.process_index(), jax.process_count())),
                       sort_keys=True)
      path = os.path.join(cache_dir, hashlib.sha256(key.encode()).hexdigest()[:24] + ".npy")
      with jax.set_mesh(mesh):
        tables[split] = reference_logps_cache(path, model.spec.graphdef, ref_params, data.reference_pass(split),
                                              data.num_pairs[split], mesh, impl=config.kernel.impl,
                                              pairs_per_row=d.pairs_per_row)
      task.info[f"reference_cache/{split}"] = path
    del ref_params
    task.train_data = WithCachedReference(data.train, tables["train"])
    if data.eval is not None:
      task.eval_data = lambda: WithCachedReference(data.eval(), tables["eval"])
  return task
