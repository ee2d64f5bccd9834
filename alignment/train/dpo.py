"""Direct preference optimisation and its variants (`config.dpo.loss_type`), on packed preference rows.

The reference is either live (a copy of the starting params, the state's untrained `ref` part, evaluated in
the same fused kernel sweep as the policy) or cached: its sequence log-probabilities are computed once
over the train split, stored under `config.dpo.ref_cache_dir` keyed by model and data fingerprints,
and attached to each batch on the host. Reference-free losses (simpo, orpo) use neither.
"""

import hashlib
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignment.kernels import token_logprobs
from alignment.losses.dpo import LOSS_TYPES, preference_loss
from alignment.losses.sequence import pair_sums
from alignment.parallel import replicated, shard_batch
from alignment.train import preference as pref_task
from alignment.train import registry
from alignment.train import state as state_lib
from alignment.train.model import setup_model
from alignment.train.optim import model_optimizer
from alignment.train.task import Task, WithColumns, cached_table


def completion_positions(loss_mask, capacity: int):
  """int32 [R, capacity]: per row, the cells where loss_mask is set, in order, then the first unset
  cells as filler (a stable argsort, so it stays per row and shards with the rows)."""
  order = jnp.argsort((loss_mask == 0).astype(jnp.int32), axis=1, stable=True)
  return order[:, :capacity].astype(jnp.int32)


CAPACITY_SAMPLE_BATCHES = 16  # batches of the train split's ordered pass that `logit_capacity=-1` reads


def estimate_logit_capacity(batches, seq_len: int, *, headroom: float = 1.25, multiple: int = 16) -> int:
  """A `logit_capacity` from sample batches: the most completion cells of any of their rows, times
  `headroom`, rounded up to `multiple`; 0 (every cell) when that does not come in under seq_len or
  there is no batch."""
  most = max((int(np.max(np.sum(np.asarray(b["loss_mask"]) != 0, axis=1))) for b in batches), default=0)
  capacity = -(-int(np.ceil(most * headroom)) // multiple) * multiple
  return capacity if 0 < capacity < seq_len else 0


def resolve_logit_capacity(config, reference_pass) -> int:
  """`config.dpo.logit_capacity`, where -1 is estimated from the first `CAPACITY_SAMPLE_BATCHES`
  batches of the train split's ordered pass. With one pair a row and the whole split in the sample,
  the most completion cells of a row is exact whatever the shuffle, so no headroom; otherwise 25%.
  Every host reads the same global batches, so all compile the same step."""
  capacity = config.dpo.logit_capacity
  if capacity < -1:
    raise ValueError(f"config.dpo.logit_capacity={capacity}; expected -1 (estimate), 0 (every cell) or a "
                     f"positive number of cells per row")
  if capacity >= 0:
    return capacity
  passes = reference_pass("train")
  sample = list(itertools.islice(passes, CAPACITY_SAMPLE_BATCHES))
  whole = next(passes, None) is None
  exact = whole and config.data.pairs_per_row == 1
  return estimate_logit_capacity(sample, config.data.seq_len, headroom=1.0 if exact else 1.25)


def sequence_logps(graphdef, params, batch, *, impl: str, pairs_per_row: int, ref_params=None,
                   logit_capacity: int = 0):
  """Per-pair completion log-prob sums of the policy (and the reference): dict of float32 [R, P].

  When the model freezes its embedding and bottom layers (`frozen_embeddings`, `frozen_layers`), the
  policy and the reference hold the same trunk weights, so the trunk runs once for both.

  `logit_capacity` C > 0 computes the logits (the [*, V] unembedding, forward and backward) only at
  each row's completion cells, gathered into [R, C]: DPO never reads a prompt token's log-prob. A
  batch with a row of more than C completion cells takes the every-cell path instead (a `lax.cond`:
  the same sums, only slower), so C is a speed setting and never changes a result."""
  model = nnx.merge(graphdef, params)
  inputs = (batch["inputs"], batch["positions"], batch["segment_ids"])
  cfg = model.cfg
  share_trunk = ref_params is not None and cfg.frozen_layers and cfg.frozen_embeddings
  x, ctx = model.trunk(*inputs)
  rows = {"hidden": model.top(x, ctx), "targets": batch["targets"], "mask": batch["loss_mask"],
          "segment_ids": batch["segment_ids"]}
  unembed, ref_unembed = model.unembed_matrix(), None
  if ref_params is not None:
    ref_model = nnx.merge(graphdef, jax.lax.stop_gradient(ref_params))
    rows["ref_hidden"] = ref_model.top(x, ctx) if share_trunk else ref_model(*inputs)
    ref_unembed = ref_model.unembed_matrix()

  def sums(rows):
    flat = lambda a: a.reshape(-1, *a.shape[2:])
    ref = dict(ref_hidden=flat(rows["ref_hidden"]), ref_unembed=ref_unembed) if ref_params is not None else {}
    stats = token_logprobs(flat(rows["hidden"]), unembed, flat(rows["targets"]), impl=impl, **ref)
    mask, segments = rows["mask"].astype(jnp.float32), rows["segment_ids"]
    out = {}
    out["chosen"], out["rejected"] = pair_sums(stats.logprobs.reshape(mask.shape) * mask, segments, pairs_per_row)
    out["chosen_lengths"], out["rejected_lengths"] = pair_sums(mask, segments, pairs_per_row)
    if ref_params is not None:
      out["ref_chosen"], out["ref_rejected"] = pair_sums(stats.ref_logprobs.reshape(mask.shape) * mask, segments,
                                                         pairs_per_row)
    return out

  if not 0 < logit_capacity < batch["loss_mask"].shape[1]:
    return sums(rows)

  def gathered(rows):
    index = completion_positions(rows["mask"], logit_capacity)
    take = lambda a: jnp.take_along_axis(a, index.reshape(index.shape + (1,) * (a.ndim - 2)), axis=1)
    return sums(jax.tree.map(take, rows))

  fits = jnp.max(jnp.sum(batch["loss_mask"] != 0, axis=1)) <= logit_capacity
  return jax.lax.cond(fits, gathered, sums, rows)


def make_loss_fn(graphdef, dpo_config, *, impl: str, pairs_per_row: int, logit_capacity: int = 0):
  """(parts, batch, rng) -> (loss of parts['policy'] summed over real pairs, (pair count, metric sums)),
  against parts['ref'] (a live reference) or the batch's cached reference log-probs.
  `logit_capacity`: as in `sequence_logps`."""
  loss_kwargs = dict(beta=dpo_config.beta, loss_type=dpo_config.loss_type,
                     label_smoothing=dpo_config.label_smoothing, nll_coef=dpo_config.nll_coef)
  if dpo_config.loss_type == "simpo":
    loss_kwargs["simpo_gamma"] = dpo_config.simpo_gamma
  if dpo_config.loss_type == "orpo":
    loss_kwargs["orpo_alpha"] = dpo_config.orpo_alpha
  spec = LOSS_TYPES[dpo_config.loss_type]

  def loss_fn(parts, batch, rng):
    del rng
    ref = parts.get("ref")
    s = sequence_logps(graphdef, parts["policy"], batch, impl=impl, pairs_per_row=pairs_per_row, ref_params=ref,
                       logit_capacity=logit_capacity)
    if spec.reference_free:
      ref_c = ref_r = jnp.zeros_like(s["chosen"])
    elif ref is not None:
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
  shape, dtype and two sums of its float32 bit patterns computed on the devices, one plain and one
  weighted by position. The sums are of integers modulo 2^32, so they are exact in any order of
  reduction: the same params give the same hash on any mesh and any number of hosts."""
  def leaf_stats(x):
    bits = jax.lax.bitcast_convert_type(x.reshape(-1).astype(jnp.float32), jnp.uint32)
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)  # order-sensitive
    return jnp.stack([bits.sum(dtype=jnp.uint32), (bits * weights).sum(dtype=jnp.uint32)])
  stats = jax.device_get(jax.jit(lambda p: jax.tree.map(leaf_stats, p))(params))
  h = hashlib.sha256()
  for (path, s), leaf in zip(jax.tree_util.tree_leaves_with_path(stats), jax.tree.leaves(params)):
    h.update(f"{jax.tree_util.keystr(path)}|{leaf.shape}|{leaf.dtype}|{np.asarray(s).tobytes().hex()}".encode())
  return h.hexdigest()[:20]


def reference_logps_cache(path: str, graphdef, ref_params, batches, num_pairs: int, mesh, *, impl: str,
                          pairs_per_row: int, logit_capacity: int = 0) -> np.ndarray:
  """float32 [num_pairs, 2] (chosen, rejected) reference log-prob sums, computed once and kept at `path`.

  `batches` are global: every host computes the whole table (the sums come back replicated), so the
  cache does not depend on the number of hosts. Pairs the length rule drops stay 0 (they never reach a
  batch).
  """
  fn = jax.jit(lambda p, b: sequence_logps(graphdef, p, b, impl=impl, pairs_per_row=pairs_per_row,
                                           logit_capacity=logit_capacity), out_shardings=replicated(mesh))

  def compute():
    table = np.full((num_pairs, 2), np.nan, np.float32)
    for batch in batches:
      out = jax.device_get(fn(ref_params, shard_batch(batch, mesh)))
      real = batch["pair_mask"].astype(bool)
      index = batch["pair_index"][real]
      table[index, 0], table[index, 1] = out["chosen"][real], out["rejected"][real]
    kept = batches.stats["pairs"] - batches.stats["dropped"]  # pairs the length rule drops never reach a batch
    covered = int((~np.isnan(table[:, 0])).sum())
    if covered != kept:
      raise ValueError(f"reference pass covered {covered} pairs; the data pipeline kept {kept} of {num_pairs}")
    return np.nan_to_num(table)

  return cached_table(path, (num_pairs, 2), compute)


def with_cached_reference(iterator, table: np.ndarray):
  """`iterator`'s batches with `ref_chosen_logps`/`ref_rejected_logps` [R, P] from the cache."""

  def add(batch):
    index = np.maximum(batch["pair_index"], 0)
    real = batch["pair_mask"].astype(np.float32)
    return {"ref_chosen_logps": table[index, 0] * real, "ref_rejected_logps": table[index, 1] * real}

  return WithColumns(iterator, add)


@registry.supervised("dpo")
def build_task(config, mesh) -> Task:
  d, c = config.data, config.dpo
  model = setup_model(config.model, config.seed)
  data = pref_task.preference_data(config, model.tokenizer)
  capacity = resolve_logit_capacity(config, data.reference_pass)
  loss_fn = make_loss_fn(model.spec.graphdef, c, impl=config.kernel.impl, pairs_per_row=d.pairs_per_row,
                         logit_capacity=capacity)
  needs_reference = not LOSS_TYPES[c.loss_type].reference_free
  parts = {"policy": model.part(model_optimizer(config))}
  if needs_reference and c.reference == "live":
    parts["ref"] = model.part()
  task = Task(parts, loss_fn, data.train, data.eval, dict(data.info), count_name="num_pairs", model_cfg=model.cfg,
              tokenizer=model.tokenizer, reward_metric="rewards/margins")
  task.info["logit_capacity"] = capacity
  if needs_reference and c.reference == "cached":
    rules = tuple(tuple(r) for r in config.sharding.rules)
    ref_params = model.load_params(state_lib.param_shardings(model.spec, mesh, rules))
    model_fp = params_fingerprint(ref_params)
    cache_dir = c.ref_cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "alignment", "ref_logps")
    tables = {}
    for split in data.splits:
      key = json.dumps(dict(model=model_fp, data=data.fingerprint, split=split, seq_len=d.seq_len,
                            max_length=d.max_length, truncation=d.truncation, pairs_per_row=d.pairs_per_row,
                            impl=config.kernel.impl),
                       sort_keys=True)
      path = os.path.join(cache_dir, hashlib.sha256(key.encode()).hexdigest()[:24] + ".npy")
      with jax.set_mesh(mesh):
        tables[split] = reference_logps_cache(path, model.spec.graphdef, ref_params, data.reference_pass(split),
                                              data.num_pairs[split], mesh, impl=config.kernel.impl,
                                              pairs_per_row=d.pairs_per_row, logit_capacity=capacity)
      task.info[f"reference_cache/{split}"] = path
    del ref_params
    task.train_data = with_cached_reference(data.train, tables["train"])
    if data.eval is not None:
      task.eval_data = lambda: with_cached_reference(data.eval(), tables["eval"])
  return task
