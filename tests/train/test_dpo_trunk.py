"""A frozen trunk shared by the policy and its reference: the same log-probabilities and gradients as two
separate forwards, and the optimizer keeps the trunk exactly as loaded."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignment import models
from alignment.train.dpo import sequence_logps
from tests.train.helpers import packed_row, random_examples, stack

FROZEN = 2


@pytest.fixture(autouse=True)
def _exact_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


def _batch(vocab):
  rng = np.random.default_rng(0)
  rows = []
  for _ in range(2):  # two pairs a row: segments 1, 2 (pair 0) and 3, 4 (pair 1)
    rows.append(packed_row(random_examples(rng, 4, vocab, 5, 12), 64))
  return {k: jnp.asarray(v) for k, v in stack(rows).items()}


def test_shared_trunk_gives_the_separate_forwards_logps_and_gradients():
  base = dataclasses.replace(models.get_model_config("tiny-random"), n_layers=4)
  model = models.init_model(base, seed=0)
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  # The reference differs from the policy above the trunk only (what training with a frozen trunk gives).
  ref = jax.tree_util.tree_map_with_path(
      lambda path, a: a.at[FROZEN:].add(0.05) if "layers" in jax.tree_util.keystr(path) else a, params)
  ref["final_norm"] = ref["final_norm"] * 1.1
  batch = _batch(base.vocab_size)

  def run(cfg):
    def loss(p):
      m = nnx.merge(graphdef, p)
      m.cfg = cfg
      out = sequence_logps(nnx.graphdef(m), p, batch, impl="naive", pairs_per_row=2, ref_params=ref)
      return (out["chosen"] - out["rejected"] - out["ref_chosen"] + out["ref_rejected"]).sum(), out
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

  shared_cfg = dataclasses.replace(base, frozen_layers=FROZEN, frozen_embeddings=True)
  separate_cfg = dataclasses.replace(base, frozen_layers=FROZEN)  # the reference runs its own trunk
  (_, shared), g_shared = run(shared_cfg)
  (_, separate), g_separate = run(separate_cfg)
  for key in ("chosen", "rejected", "ref_chosen", "ref_rejected"):
    np.testing.assert_allclose(shared[key], separate[key], rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(shared["ref_chosen"] - shared["chosen"])).max() > 1e-3  # the two models differ
  assert not np.any(g_shared["embed"])
  for path, g in jax.tree_util.tree_leaves_with_path(g_shared["layers"]):
    want = g_separate["layers"]
    for k in path:
      want = want[k.key]
    assert not np.any(g[:FROZEN])
    np.testing.assert_allclose(g[FROZEN:], want[FROZEN:], atol=1e-5 * np.abs(want).max() + 1e-7, rtol=0)
