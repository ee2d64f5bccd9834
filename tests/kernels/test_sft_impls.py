"""SFT on the tiny config: the same loss curve with impl='naive', 'xla' and 'pallas' (interpret)."""

import jax
import numpy as np

from alignment.parallel import make_mesh, shard_batch
from alignment.train.optim import make_optimizer
from alignment.train.sft import make_loss_fn
from alignment.train.step import make_train_step
from tests.train.helpers import packed_row, policy_state, random_examples, stack, tiny_config, tiny_model, vocab_size

SEQ, ROWS, STEPS = 32, 4, 3


def loss_curve(impl):
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  setup = tiny_model()
  optimizer = make_optimizer(tiny_config().optim, STEPS)
  rng = np.random.default_rng(0)
  batches = [stack([packed_row(random_examples(rng, 2, vocab_size(), 4, 14), SEQ) for _ in range(ROWS)])
             for _ in range(STEPS)]
  losses = []
  with jax.set_mesh(mesh):
    state = policy_state(setup, mesh, optimizer)
    step = jax.jit(make_train_step(make_loss_fn(setup.spec.graphdef, impl), {"policy": optimizer}, 1))
    for batch in batches:
      state, metrics = step(state, shard_batch(batch, mesh))
      losses.append(float(metrics["loss"]))
  return np.array(losses)


def test_sft_loss_curve_is_the_same_for_every_impl():
  naive = loss_curve("naive")
  assert np.all(np.isfinite(naive)) and naive[-1] != naive[0]
  for impl in ("xla", "pallas"):
    np.testing.assert_allclose(loss_curve(impl), naive, rtol=1e-5, atol=1e-5, err_msg=impl)
