"""SFT on the tiny config: the same loss curve with impl='naive', 'xla' and 'pallas' (interpret)."""

import jax
import numpy as np

from alignment.parallel import host_batch_to_global, make_mesh
from alignment.train import state as state_lib
from alignment.train.optim import make_optimizer
from alignment.train.sft import make_loss_fn
from alignment.train.step import make_train_step
from configs.common import SHARDING_RULES
from tests.train.helpers import packed_row, random_examples, stack, tiny_config, tiny_model, vocab_size

SEQ, ROWS, STEPS = 32, 4, 3


def loss_curve(impl):
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  setup = tiny_model()
  shardings = state_lib.param_shardings(setup.spec, mesh, SHARDING_RULES)
  params = setup.load_params(shardings)
  tx, schedule = make_optimizer(tiny_config().optim, STEPS)
  rng = np.random.default_rng(0)
  batches = [stack([packed_row(random_examples(rng, 2, vocab_size(), 4, 14), SEQ) for _ in range(ROWS)])
             for _ in range(STEPS)]
  losses = []
  with jax.set_mesh(mesh):
    state = state_lib.create_train_state(params, tx, state_lib.state_shardings(
        tx, setup.spec.abstract_params, shardings, mesh), 0)
    step = jax.jit(make_train_step(make_loss_fn(setup.spec.graphdef, impl), tx, schedule, 1))
    for host in batches:
      state, metrics = step(state, host_batch_to_global(host, mesh))
      losses.append(float(metrics["loss"]))
  return np.array(losses)


def test_sft_loss_curve_is_the_same_for_every_impl():
  naive = loss_curve("naive")
  assert np.all(np.isfinite(naive)) and naive[-1] != naive[0]
  for impl in ("xla", "pallas"):
    np.testing.assert_allclose(loss_curve(impl), naive, rtol=1e-5, atol=1e-5, err_msg=impl)
