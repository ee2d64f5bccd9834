"""Prefix sharing: shared rows give the log-probs and GRPO gradients of unshared rows, with fewer tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignment import models
from alignment.kernels import token_logprobs
from alignment.losses import ppo
from alignment.models import ModelConfig, get_model_config
from alignment.models.transformer import context
from alignment.rl import prefix

TINY = get_model_config("tiny-random")
# Gemma 3 style: local layers with a window short enough to cut into the prompt from a completion.
GEMMA3 = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48,
                     rope_theta=1e6, rope_local_theta=1e4, rms_eps=1e-6, activation="gelu_tanh", qk_norm=True,
                     post_norms=True, embed_scale=True, sliding_window=4, global_every=2,
                     query_pre_attn_scalar=10.0)
SEQ_LEN = 64


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
  # GPUs may run float32 matmuls in TF32 by default; the 1e-5 comparisons need real float32.
  with jax.default_matmul_precision("highest"):
    yield


def random_groups(seed, n_prompts, group_size, vocab):
  """Prompts of 1..14 tokens (a one-token prompt has nothing to share) and completions of 1..9 (the last
  one 9: the completion layout is [N, 9] whatever the seed)."""
  rng = np.random.default_rng(seed)
  prompts = [list(rng.integers(1, vocab, rng.integers(1, 15))) for _ in range(n_prompts)]
  prompts[0] = prompts[0][:1]
  completions = [list(rng.integers(1, vocab, rng.integers(1, 10))) for _ in range(n_prompts * group_size - 1)]
  return prompts, completions + [list(rng.integers(1, vocab, 9))]


def split_model(cfg):
  return nnx.split(models.init_model(cfg, seed=1), nnx.Param)


def completion_logprobs(graphdef, params, layout):
  """Per-completion token log-probs [N, L] (0 past each end)."""
  model = nnx.merge(graphdef, params)
  hidden = model(jnp.asarray(layout.inputs), jnp.asarray(layout.positions), jnp.asarray(layout.segment_ids),
                 prefix_ids=jnp.asarray(layout.prefix_ids))
  stats = token_logprobs(hidden.reshape(-1, hidden.shape[-1]), model.unembed_matrix(),
                         jnp.asarray(layout.targets).reshape(-1), impl="naive")
  return prefix.gather(stats.logprobs.reshape(layout.inputs.shape), layout)


def grpo_loss(graphdef, params, layout, drift, advantages):
  """GRPO's clipped loss over the completions, each sequence weighing the same, against old log-probs
  `drift` [N, L] away from the current ones (some ratios clipped, some not) -> (loss, logprobs [N, L])."""
  logprobs = completion_logprobs(graphdef, params, layout)
  old_logprobs = jax.lax.stop_gradient(logprobs) + drift
  loss, _ = ppo.clipped_policy_loss(logprobs, old_logprobs, advantages[:, None], layout.mask, clip_eps=0.2)
  total, count = ppo.aggregate(loss, layout.mask, "seq_mean_token_mean")
  return total / count, logprobs


@pytest.mark.parametrize("name,cfg", [("tiny-random", TINY), ("gemma3", GEMMA3)])
def test_shared_rows_give_the_logprobs_and_gradients_of_unshared_rows(name, cfg):
  graphdef, params = split_model(cfg)
  # XLA compiles are slow on these CPUs: every layout below has the same shapes (N = 24 completions;
  # shared rows padded to 24 rows), so the loss compiles once per model. The unshared rows' prefix_ids
  # are all 0, which computes what prefix_ids=None does (the next test).
  loss_and_grad = jax.jit(jax.value_and_grad(grpo_loss, argnums=1, has_aux=True), static_argnums=0)
  for group_size in (4, 2):
    check_shared_equals_unshared(name, cfg, graphdef, params, loss_and_grad, group_size)


def check_shared_equals_unshared(name, cfg, graphdef, params, loss_and_grad, group_size):
  n = 24
  prompts, completions = random_groups(group_size, n // group_size, group_size, cfg.vocab_size)
  layouts = {share: prefix.build_rows(prompts, completions, group_size, SEQ_LEN, share=share, rows_multiple=n)
             for share in (0, 1)}
  assert (layouts[1].segment_ids.max(axis=1) > 0).sum() < n == layouts[0].inputs.shape[0] == layouts[1].inputs.shape[0]
  assert layouts[1].prefix_ids.any() and not layouts[0].prefix_ids.any()
  rng = np.random.default_rng(0)
  drift = jnp.asarray(rng.normal(0, 0.3, layouts[0].mask.shape), jnp.float32)
  advantages = jnp.asarray(rng.normal(size=n), jnp.float32)
  ((loss0, logps0), grads0), ((loss1, logps1), grads1) = (
      loss_and_grad(graphdef, params, layouts[s], drift, advantages) for s in (0, 1))
  diff = float(jnp.abs(logps1 - logps0).max())
  print(f"{name} G={group_size}: logprobs max abs diff {diff:.2e}")
  assert diff <= 1e-5
  assert abs(float(loss1 - loss0)) <= 1e-5
  scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads0))
  grad_diff = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(grads0), jax.tree.leaves(grads1)))
  print(f"{name} G={group_size}: grad max abs diff {grad_diff:.2e} (largest |grad| {scale:.2e})")
  assert grad_diff <= 1e-5 * scale


@pytest.mark.parametrize("cfg", [TINY, GEMMA3])
def test_prefix_ids_none_and_zero_leave_packed_rows_as_they_were(cfg):
  rng = np.random.default_rng(0)
  segment_ids = np.repeat([[1] * 7 + [2] * 5 + [3] * 9 + [0] * 3], 2, axis=0).astype(np.int32)
  positions = np.concatenate([np.arange(7), np.arange(5), np.arange(9), np.zeros(3, int)])[None].repeat(2, 0)
  tokens = jnp.asarray(rng.integers(1, cfg.vocab_size, segment_ids.shape), jnp.int32)
  positions, segment_ids = jnp.asarray(positions, jnp.int32), jnp.asarray(segment_ids)
  model = models.init_model(cfg, seed=1)
  base = model(tokens, positions, segment_ids)
  np.testing.assert_array_equal(model(tokens, positions, segment_ids, prefix_ids=None), base)
  np.testing.assert_array_equal(model(tokens, positions, segment_ids, prefix_ids=jnp.zeros_like(segment_ids)), base)
  plain, zero = context(cfg, positions, segment_ids), context(cfg, positions, segment_ids, jnp.zeros_like(segment_ids))
  for key in plain:
    np.testing.assert_array_equal(jax.tree.leaves(plain[key]), jax.tree.leaves(zero[key]))


@pytest.mark.parametrize("cfg", [TINY, GEMMA3])
def test_a_completion_does_not_see_the_others_of_its_group(cfg):
  prompts, completions = random_groups(3, 3, 4, cfg.vocab_size)
  graphdef, params = split_model(cfg)
  fn = jax.jit(completion_logprobs, static_argnums=0)
  before = fn(graphdef, params, prefix.build_rows(prompts, completions, 4, SEQ_LEN, share=True))
  changed = list(completions)
  changed[5] = [(t + 7) % (cfg.vocab_size - 1) + 1 for t in changed[5]]  # same length, other tokens
  after = fn(graphdef, params, prefix.build_rows(prompts, changed, 4, SEQ_LEN, share=True))
  others = np.arange(len(completions)) != 5
  np.testing.assert_array_equal(after[others], before[others])
  assert not np.allclose(after[5], before[5])


@pytest.mark.parametrize("group_size", [4, 2])
def test_layout_indexes_the_completions_and_saves_the_repeated_prompts(group_size):
  prompts, completions = random_groups(7, 9, group_size, 500)
  unshared = prefix.build_rows(prompts, completions, group_size, 32, share=False)
  shared = prefix.build_rows(prompts, completions, group_size, 96, share=True, rows_multiple=4)
  assert unshared.tokens - shared.tokens == sum((group_size - 1) * (len(p) - 1) for p in prompts)
  assert shared.inputs.shape[0] % 4 == 0 and unshared.inputs.shape[0] == len(completions)
  for layout in (unshared, shared):
    assert layout.tokens == (layout.segment_ids > 0).sum()
    assert layout.loss_mask.sum() == sum(map(len, completions)) == layout.mask.sum()
    got = layout.targets[layout.row[:, None], layout.cols]
    for i, completion in enumerate(completions):
      np.testing.assert_array_equal(got[i, :len(completion)], completion)
      np.testing.assert_array_equal(layout.loss_mask[layout.row[i], layout.cols[i, :len(completion)]], 1)
    np.testing.assert_array_equal(np.asarray(prefix.gather(jnp.asarray(layout.targets), layout)),
                                  np.where(layout.mask > 0, got, 0))
  # A completion segment starts with its prompt's last token, at the position after the shared part.
  first = shared.cols[:, 0]
  np.testing.assert_array_equal(shared.inputs[shared.row, first], [prompts[i // group_size][-1] for i in
                                                                   range(len(completions))])
  np.testing.assert_array_equal(shared.positions[shared.row, first],
                                [len(prompts[i // group_size]) - 1 for i in range(len(completions))])


def test_errors_name_what_does_not_fit():
  prompts, completions = [[1, 2, 3], [4] * 20], [[5, 6]] * 2 + [[7] * 9] * 2
  with pytest.raises(ValueError, match=r"group 1 needs 37 tokens, more than seq_len=32"):
    prefix.build_rows(prompts, completions, 2, 32, share=True)
  with pytest.raises(ValueError, match=r"completion 2 needs 28 tokens"):
    prefix.build_rows(prompts, completions, 2, 24, share=False)
  with pytest.raises(ValueError, match=r"3 completions for 2 prompts"):
    prefix.build_rows(prompts, completions[:3], 2, 64, share=True)
  with pytest.raises(ValueError, match=r"completion 1 is empty"):
    prefix.build_rows(prompts, [[5], [], [7], [8]], 2, 64, share=True)
