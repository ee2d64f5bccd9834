"""One SFT step: the same numbers on any mesh, with or without accumulation, packed or not."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alignment.kernels import token_logprobs
from alignment.parallel import make_mesh, shard_batch
from alignment.train import state as state_lib
from alignment.train.optim import make_optimizer
from alignment.train.sft import make_loss_fn
from alignment.train.step import accumulate_gradients, make_train_step
from configs.common import SHARDING_RULES
from tests.train.helpers import (packed_row, policy_state, random_examples, stack, tiny_config, tiny_model,
                                 vocab_size)

SEQ = 48


def _batch(seed=0, rows=8):
  rng = np.random.default_rng(seed)
  return stack([packed_row(random_examples(rng, 2, vocab_size()), SEQ) for _ in range(rows)])


def _loss_and_grads(mesh):
  setup = tiny_model()
  params = setup.load_params(state_lib.param_shardings(setup.spec, mesh, SHARDING_RULES))
  loss_fn = make_loss_fn(setup.spec.graphdef, "naive")
  batch = shard_batch(_batch(), mesh)
  with jax.set_mesh(mesh):
    (loss_sum, (count, _)), grads = jax.jit(jax.value_and_grad(
        lambda p, b, r: loss_fn({"policy": p}, b, r), has_aux=True))(params, batch, jax.random.PRNGKey(0))
  specs = {str(leaf.sharding.spec) for leaf in jax.tree.leaves(params)}
  return float(loss_sum / count), jax.tree.map(lambda g: np.asarray(g) / float(count), grads), specs


def test_one_step_is_the_same_on_every_mesh():
  loss_1, grads_1, _ = _loss_and_grads(make_mesh({"data": 1}, jax.devices()[:1]))
  for sizes in ({"data": 8, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2},
                {"data": 1, "fsdp": 2, "tensor": 4}):
    loss_n, grads_n, specs = _loss_and_grads(make_mesh(sizes))
    if sizes["tensor"] > 1:  # the params really are split, so the comparison means something
      assert any("tensor" in s for s in specs) and any("fsdp" in s for s in specs), specs
    assert abs(loss_n - loss_1) <= 1e-5 * max(1.0, abs(loss_1)), sizes
    for (path, g1), gn in zip(jax.tree_util.tree_leaves_with_path(grads_1), jax.tree.leaves(grads_n)):
      np.testing.assert_allclose(gn, g1, atol=1e-5, rtol=1e-5, err_msg=f"{sizes} {jax.tree_util.keystr(path)}")


def test_four_micro_batches_of_two_equal_one_batch_of_eight():
  mesh = make_mesh({"data": 2, "fsdp": 1, "tensor": 1}, jax.devices()[:2])
  setup = tiny_model()
  shardings = state_lib.param_shardings(setup.spec, mesh, SHARDING_RULES)
  loss_fn = make_loss_fn(setup.spec.graphdef, "naive")
  rng = np.random.default_rng(1)
  # one example per row; completions of very different lengths, so per-micro-batch means would differ
  rows = []
  for completion in (2, 5, 20, 40, 3, 6, 25, 44):
    tokens = rng.integers(3, vocab_size(), size=SEQ + 1).astype(np.int32)
    mask = np.zeros(SEQ + 1, np.float32)
    mask[-completion:] = 1.0
    rows.append(packed_row([(tokens, mask)], SEQ))
  host = stack(rows)
  counts = host["loss_mask"].reshape(2, 4, SEQ).sum(axis=(0, 2))  # micro-batch j holds rows j and j + 4
  assert counts.max() > 10 * counts.min()
  batch = shard_batch(host, mesh)
  optimizer = make_optimizer(tiny_config().optim, 10)

  results = {}
  for k in (1, 4):
    params = setup.load_params(shardings)
    with jax.set_mesh(mesh):
      grads, loss_sum, count, _ = jax.jit(lambda p, b: accumulate_gradients(
          loss_fn, {"policy": p}, {}, b, jax.random.PRNGKey(0), k))(params, batch)
      state = policy_state(setup, mesh, optimizer)
      state, metrics = jax.jit(make_train_step(loss_fn, {"policy": optimizer}, k))(state, batch)
    results[k] = (jax.tree.map(lambda g: np.asarray(g) / float(count), grads["policy"]), float(loss_sum / count),
                  jax.device_get(state["policy"]), float(metrics["loss"]))

  (g1, l1, p1, m1), (g4, l4, p4, m4) = results[1], results[4]
  assert abs(l1 - l4) < 1e-6 and abs(m1 - m4) < 1e-6 and abs(m1 - l1) < 1e-6
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)


def test_packed_rows_give_each_example_its_own_loss():
  setup = tiny_model()
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  params = setup.load_params(state_lib.param_shardings(setup.spec, mesh, SHARDING_RULES))
  model = nnx.merge(setup.spec.graphdef, params)

  def per_token_nll(rows):
    hidden = model(jnp.asarray(rows["inputs"]), jnp.asarray(rows["positions"]), jnp.asarray(rows["segment_ids"]))
    lp = token_logprobs(hidden.reshape(-1, hidden.shape[-1]), model.unembed_matrix(),
                        jnp.asarray(rows["targets"]).reshape(-1), impl="naive").logprobs
    return -np.asarray(lp).reshape(rows["inputs"].shape) * rows["loss_mask"]

  examples = random_examples(np.random.default_rng(2), 5, vocab_size(), 4, 14)
  packed = stack([packed_row(examples[:3], SEQ), packed_row(examples[3:], SEQ)])
  nll_packed = per_token_nll(packed)
  packed_sums = [nll_packed[r][packed["segment_ids"][r] == s].sum()
                 for r, segs in ((0, (1, 2, 3)), (1, (1, 2))) for s in segs]
  alone = per_token_nll(stack([packed_row([ex], SEQ) for ex in examples])).sum(axis=1)
  np.testing.assert_allclose(packed_sums, alone, rtol=1e-5, atol=1e-5)
