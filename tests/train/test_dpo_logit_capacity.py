"""Logits at the completion cells only (`logit_capacity`): the same per-pair sums as float64 NumPy over
every cell, the same gradients as the every-cell path, a row over capacity falls back, and it shards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignment.parallel import make_mesh, shard_batch
from alignment.train import state as state_lib
from alignment.train.dpo import completion_positions, resolve_logit_capacity, sequence_logps
from configs import dpo as dpo_config
from configs.common import SHARDING_RULES
from tests.train.helpers import packed_row, random_examples, stack, tiny_model, vocab_size

SEQ = 64


@pytest.fixture(autouse=True)
def _exact_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


def _batch(rows=8, seed=0):
  rng = np.random.default_rng(seed)
  return stack([packed_row(random_examples(rng, 4, vocab_size(), 5, 15), SEQ) for _ in range(rows)])


def _numpy_sums(setup, params, batch):
  """float64 log-softmax over every cell of the model's final hidden states, summed per segment."""
  model = nnx.merge(setup.spec.graphdef, params)
  hidden = np.asarray(model(batch["inputs"], batch["positions"], batch["segment_ids"]), np.float64)
  logits = hidden @ np.asarray(model.unembed_matrix(), np.float64)
  logits -= logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0] * batch["loss_mask"]
  sums = np.zeros((len(picked), 4))
  for r in range(len(picked)):
    for seg in range(1, 5):
      sums[r, seg - 1] = picked[r][batch["segment_ids"][r] == seg].sum()
  return sums[:, 0::2], sums[:, 1::2]


def test_completion_positions_lists_each_rows_masked_cells_in_order():
  mask = np.array([[0, 1, 1, 0, 1, 0], [1, 0, 0, 0, 0, 1]], np.float32)
  np.testing.assert_array_equal(completion_positions(jnp.asarray(mask), 4), [[1, 2, 4, 0], [0, 5, 1, 2]])


def test_resolve_logit_capacity_reads_the_data_and_rejects_bad_values():
  def batches(counts, seq_len=256):  # one batch a count: a row with that many completion cells
    for n in counts:
      mask = np.zeros((2, seq_len), np.int32)
      mask[0, :n] = 1
      yield {"loss_mask": mask}

  config = dpo_config.get_config("tiny")
  config.data.seq_len, config.data.pairs_per_row = 256, 1
  split = [40, 70, 55]
  # The whole split seen, one pair a row: exact (70 -> 80, rounded up to 16s).
  assert resolve_logit_capacity(config, lambda name: batches(split)) == 80
  # More batches than the sample reads: 25% headroom (70 * 1.25 = 87.5 -> 96).
  long_split = split + [10] * 20
  assert resolve_logit_capacity(config, lambda name: batches(long_split)) == 96
  config.data.pairs_per_row = 2  # rows the shuffle packs differently from the ordered pass: headroom
  assert resolve_logit_capacity(config, lambda name: batches(split)) == 96
  assert resolve_logit_capacity(config, lambda name: batches([220])) == 0  # no saving: every cell
  config.dpo.logit_capacity = 48
  assert resolve_logit_capacity(config, None) == 48
  config.dpo.logit_capacity = -2
  with pytest.raises(ValueError, match=r"config.dpo.logit_capacity=-2"):
    resolve_logit_capacity(config, None)


@pytest.mark.parametrize("impl", ["naive", "xla"])
def test_capacity_gives_the_numpy_sums_and_the_every_cell_gradients(impl):
  setup = tiny_model()
  params = setup.load_params(state_lib.param_shardings(setup.spec, make_mesh({"data": 1}, jax.devices()[:1]),
                                                       SHARDING_RULES))
  ref = jax.tree.map(lambda a: a * 1.01, params)
  batch = _batch()
  counts = batch["loss_mask"].sum(1)
  fits, overflows = int(counts.max()), int(counts.max()) - 3  # the second sends the batch down the fallback
  assert fits < SEQ and overflows >= counts.min()
  want_chosen, want_rejected = _numpy_sums(setup, params, batch)

  def run(capacity):
    def loss(p):
      out = sequence_logps(setup.spec.graphdef, p, batch, impl=impl, pairs_per_row=2, ref_params=ref,
                           logit_capacity=capacity)
      return (out["chosen"] - 0.5 * out["rejected"] - out["ref_chosen"]).sum(), out
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  (_, every), g_every = run(0)
  for capacity in (fits, overflows):
    (_, out), grads = run(capacity)
    np.testing.assert_allclose(out["chosen"], want_chosen, rtol=1e-5, atol=1e-4, err_msg=f"{capacity}")
    np.testing.assert_allclose(out["rejected"], want_rejected, rtol=1e-5, atol=1e-4, err_msg=f"{capacity}")
    for key in ("ref_chosen", "ref_rejected", "chosen_lengths", "rejected_lengths"):
      np.testing.assert_allclose(out[key], every[key], rtol=1e-6, atol=1e-5, err_msg=f"{capacity} {key}")
    for (path, g), want in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(g_every)):
      np.testing.assert_allclose(g, want, atol=1e-6 * np.abs(want).max() + 1e-9, rtol=0,
                                 err_msg=f"{capacity} {jax.tree_util.keystr(path)}")
  assert np.abs(np.asarray(every["ref_chosen"] - every["chosen"])).max() > 1e-3  # the reference differs


def test_capacity_on_a_sharded_mesh_matches_one_device():
  setup = tiny_model()
  batch = _batch(seed=1)
  capacity = int(batch["loss_mask"].sum(1).max())

  def sums(mesh, capacity):
    params = setup.load_params(state_lib.param_shardings(setup.spec, mesh, SHARDING_RULES))
    with jax.set_mesh(mesh):
      out = jax.jit(lambda p, b: sequence_logps(setup.spec.graphdef, p, b, impl="xla", pairs_per_row=2,
                                                logit_capacity=capacity))(params, shard_batch(batch, mesh))
    return jax.device_get(out)

  want = sums(make_mesh({"data": 1}, jax.devices()[:1]), 0)
  got = sums(make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), capacity)
  for key in ("chosen", "rejected"):
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-4, err_msg=key)
