"""Rollouts and the RL objective on the tiny model against plain references: each completion row's prompt
and tokens run through the model alone, unpadded, and float64 NumPy for the loss.

Tolerances: log-probs are float32 sums over a 512-token vocabulary of O(1) logits, so a few ulps of ~6
(|log p| ~ log 512): 2e-5 absolute; the sampler's log-probs come from the KV-cache path (another order
of the same sums) and agree to the same bound.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignment import models
from alignment.models import sampler as sampler_lib
from alignment.parallel import make_mesh, replicated, shard_batch
from alignment.rl import objective, rollout
from alignment.rl.loop import chat_tokenizer
from alignment.train.model import setup_model
from configs import grpo

G, B, NEW = 2, 8, 12


@pytest.fixture(scope="module")
def setting():
  config = grpo.get_config("tiny")
  model, raw_tokenizer = models.load("tiny-random")
  tokenizer = chat_tokenizer(config, raw_tokenizer)
  mesh = make_mesh({"data": -1})
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  texts = ["Hello there", "What is two plus two, in words?", "Name a river.", "Say something long and careful "
           "about the sea and the sky", "ok", "Tell me a joke about cats and dogs", "Why?", "List three colours"]
  from alignment.rl import prompts
  ids = prompts.encode(tokenizer, [{"prompt": t} for t in texts])
  eos = sampler_lib.stop_and_pad_ids(tokenizer)[0]
  sampling = sampler_lib.SamplingConfig(max_new_tokens=NEW, temperature=1.0, eos_ids=eos, pad_id=0)
  sampler_fn = sampler_lib.make_sampler(model.cfg, sampling, mesh, G, replicated(mesh))
  r = rollout.sample(sampler_fn, params, ids, np.arange(B), G, jax.random.key(3), tokenizer, eos, mesh)
  return dict(model=model, params=params, ids=ids, r=r, mesh=mesh, tokenizer=tokenizer, config=config)


REFERENCE_WIDTH = 128  # every reference sequence right-padded to this (causal: padding after it changes nothing)


def reference_logprobs(model, prompt, completion):
  """float64 log p(completion token t | prompt + completion[:t]) from the model's full logits."""
  sequence = np.zeros((1, REFERENCE_WIDTH), np.int32)
  sequence[0, :len(prompt) + len(completion)] = list(prompt) + list(completion)
  logits = np.asarray(models.logits(model, jnp.asarray(sequence)), np.float64)[0]
  logits = logits - logits.max(axis=-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
  start = len(prompt) - 1
  return np.array([logp[start + t, tok] for t, tok in enumerate(completion)])


def test_group_sampling_shares_one_prefill_and_equals_repeated_prompts(setting):
  model, params, ids, mesh = setting["model"], setting["params"], setting["ids"], setting["mesh"]
  sampling = sampler_lib.SamplingConfig(max_new_tokens=NEW, temperature=1.0, pad_id=0)
  tokens, lengths = sampler_lib.pad_prompts(ids)
  grouped = sampler_lib.make_sampler(model.cfg, sampling, mesh, G)(params, tokens, lengths, jax.random.key(5))
  repeated = sampler_lib.make_sampler(model.cfg, sampling, mesh)(params, np.repeat(tokens, G, 0),
                                                                 np.repeat(lengths, G), jax.random.key(5))
  np.testing.assert_array_equal(np.asarray(grouped.tokens), np.asarray(repeated.tokens))
  np.testing.assert_allclose(np.asarray(grouped.logprobs), np.asarray(repeated.logprobs), atol=2e-5)
  assert len({tuple(t) for t in np.asarray(grouped.tokens)[:G]}) == G  # the group's samples differ


def test_trainer_logprobs_of_the_rollout_rows_equal_each_sequence_alone(setting):
  r, model = setting["r"], setting["model"]
  batch = rollout.training_batch(r, G)
  score = jax.jit(objective.make_score_fn(nnx.graphdef(model), None, impl="naive"))
  with jax.set_mesh(setting["mesh"]):
    got = jax.device_get(score({"policy": setting["params"], "ref": setting["params"]},
                               shard_batch(batch, setting["mesh"])))
  assert (r.lengths > 3).all() and r.mask.shape[0] == B * G
  for i in range(B * G):
    n = int(r.lengths[i])
    want = reference_logprobs(model, setting["ids"][i // G], r.tokens[i, :n])
    np.testing.assert_allclose(got["old_logprobs"][i, :n], want, atol=2e-5)
    np.testing.assert_allclose(r.sampler_logprobs[i, :n], want, atol=2e-5)  # the sampler's, the same numbers
    np.testing.assert_array_equal(got["ref_logprobs"][i, :n], got["old_logprobs"][i, :n])


def test_training_batch_layout(setting):
  r = setting["r"]
  batch = rollout.training_batch(r, G)
  width = r.prompt_tokens.shape[1]
  for i in (0, 5, 11):
    prompt, n = setting["ids"][i // G], int(r.lengths[i])
    real = batch["segment_ids"][i] == 1
    assert batch["inputs"][i][real].tolist() == list(prompt) + r.tokens[i, :n - 1].tolist()  # the last token predicts nothing
    assert batch["positions"][i][real].tolist() == list(range(len(prompt) + n - 1))
    assert batch["inputs"].shape[1] == width + r.tokens.shape[1] - 1


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
def test_loss_equals_float64_reference(setting, aggregation, ratio_level):
  r, model, config = setting["r"], setting["model"], setting["config"]
  rl = config.rl
  rl.update(aggregation=aggregation, ratio_level=ratio_level, clip_eps=0.2, clip_eps_high=0.28, kl_in="loss",
            kl_coef=0.3, entropy_coef=0.0, max_new_tokens=NEW)  # kl_coef > 0: the KL term is on
  rng = np.random.default_rng(0)
  batch = rollout.training_batch(r, G)
  n_rows, length = r.mask.shape
  ref_lp = [reference_logprobs(model, setting["ids"][i // G], r.tokens[i, :int(r.lengths[i])]) for i in range(n_rows)]
  old = np.zeros((n_rows, length), np.float32)
  ref = np.zeros((n_rows, length), np.float32)
  for i, lp in enumerate(ref_lp):
    old[i, :len(lp)] = lp + rng.normal(0, 0.3, len(lp))  # ratios inside and outside the clip range
    ref[i, :len(lp)] = lp + rng.normal(0, 0.5, len(lp))
  advantages = np.repeat(rng.normal(0, 1, n_rows)[:, None], length, 1).astype(np.float32) * r.mask
  batch.update(old_logprobs=old, ref_logprobs=ref, advantages=advantages, kl_coef=np.full(n_rows, 0.3, np.float32))
  loss_fn = objective.make_loss_fn(nnx.graphdef(model), None, rl, impl="naive")
  loss_sum, (count, aux) = jax.jit(loss_fn)({"policy": setting["params"]}, batch, None)

  per_row, tokens = [], []
  for i, lp in enumerate(ref_lp):
    n = len(lp)
    log_ratio = lp - old[i, :n]
    if ratio_level == "sequence":
      log_ratio = np.full(n, log_ratio.mean())
    ratio = np.exp(log_ratio)
    a = advantages[i, :n].astype(np.float64)
    surrogate = np.maximum(-a * ratio, -a * np.clip(ratio, 0.8, 1.28))
    d = lp - ref[i, :n]
    kl = np.exp(-d) - 1 + d
    per_row.append(surrogate + 0.3 * kl)
    tokens.append(n)
  if aggregation == "token_mean":
    want = sum(x.sum() for x in per_row) / sum(tokens)
  elif aggregation == "seq_mean_token_mean":
    want = np.mean([x.mean() for x in per_row])
  else:
    want = np.mean([x.sum() / NEW for x in per_row])
  assert float(loss_sum / count) == pytest.approx(want, rel=1e-5, abs=1e-6)
  if ratio_level == "token":  # (the sequence ratio averages the noise away: inside the clip range)
    assert 0 < float(aux["policy/clip_frac"] / count) < 1  # both sides of the clip occur


def test_value_model_reads_the_state_before_each_completion_token(setting):
  r = setting["r"]
  value_model = models.RewardModel(setting["model"].cfg, rngs=nnx.Rngs(1))
  batch = rollout.training_batch(r, G)
  values = np.asarray(jax.jit(lambda p, b: objective.completion_values(nnx.graphdef(value_model), p, b))(
      nnx.to_pure_dict(nnx.state(value_model, nnx.Param)), batch))
  for i in (0, 7):
    prompt, n = setting["ids"][i // G], int(r.lengths[i])
    sequence = np.zeros((1, REFERENCE_WIDTH), np.int32)
    sequence[0, :len(prompt) + n] = list(prompt) + r.tokens[i, :n].tolist()
    alone = np.asarray(value_model(jnp.asarray(sequence)))[0]
    np.testing.assert_allclose(values[i, :n], alone[len(prompt) - 1:len(prompt) - 1 + n], atol=1e-5)


def test_ppo_token_rewards_and_gae_whitening():
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.int32)
  kl = np.array([[0.1, 0.2, 0.3, 9.0], [0.5, 0.5, 9.0, 9.0]], np.float32)
  rewards = rollout.token_rewards(np.array([1.0, -2.0]), kl, mask)
  np.testing.assert_allclose(rewards, [[-0.1, -0.2, 0.7, 0.0], [-0.5, -2.5, 0.0, 0.0]], rtol=1e-6)
  values = np.array([[0.5, 0.1, -0.2, 7.0], [0.3, 0.0, 7.0, 7.0]], np.float32)
  advantages, returns = rollout.gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0, whiten=False)
  # lam = gamma = 1: the advantage is the reward-to-go minus the value
  np.testing.assert_allclose(advantages[0, :3], [0.4 - 0.5, 0.5 - 0.1, 0.7 + 0.2], rtol=1e-5)
  np.testing.assert_allclose(returns[1, :2], [-3.0, -2.5], rtol=1e-5)
  whitened = rollout.whiten_valid(advantages, mask)
  valid = whitened[mask > 0]
  assert abs(valid.mean()) < 1e-6 and valid.std() == pytest.approx(1.0, rel=1e-5)
  assert (whitened[mask == 0] == 0).all()
  ev = rollout.explained_variance(values, returns, mask)
  target, v = returns[mask > 0].astype(np.float64), values[mask > 0].astype(np.float64)
  assert ev == pytest.approx(1 - np.var(target - v) / np.var(target), rel=1e-6)


def test_value_part_from_the_policy_has_a_fresh_head():
  model = setup_model(grpo.get_config("tiny").model, 0, reward_head=True)
  assert set(model.spec.abstract_params) == {"backbone", "head"}


def test_one_update_a_rollout_takes_its_ratio_base_from_the_loss_itself(setting):
  """Without old_logprobs the loss detaches its own log-probs as the ratio's base: the loss and gradient of
  a batch holding the trainer's exact log-probs as old_logprobs, and the sampler's mismatch measured."""
  r, model, config = setting["r"], setting["model"], setting["config"]
  rl = config.rl
  rl.update(aggregation="token_mean", ratio_level="token", clip_eps=0.2, clip_eps_high=0.0, kl_in="loss",
            kl_coef=0.0, entropy_coef=0.0, max_new_tokens=NEW, tis_cap=0.0)
  batch = rollout.training_batch(r, G)
  batch["advantages"] = (np.random.default_rng(1).normal(0, 1, (len(r.mask), 1)) * r.mask).astype(np.float32)
  score = jax.jit(objective.make_score_fn(nnx.graphdef(model), None, impl="naive"))
  trainer = np.asarray(score({"policy": setting["params"]}, batch)["old_logprobs"])
  loss_fn = jax.jit(jax.value_and_grad(objective.make_loss_fn(nnx.graphdef(model), None, rl, impl="naive"),
                                       has_aux=True))
  sampler = (trainer + np.random.default_rng(2).normal(0, 0.1, trainer.shape) * r.mask).astype(np.float32)
  (on_sum, (count, aux)), on_grad = loss_fn({"policy": setting["params"]}, dict(batch, sampler_logprobs=sampler), None)
  (off_sum, _), off_grad = loss_fn({"policy": setting["params"]}, dict(batch, old_logprobs=trainer), None)
  assert float(on_sum) == pytest.approx(float(off_sum), rel=1e-6)
  for a, b in zip(jax.tree.leaves(on_grad), jax.tree.leaves(off_grad)):  # two programs: float32 reordering
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())
  valid = r.mask > 0
  want = np.abs(sampler - trainer)[valid].mean()
  assert float(aux["rollout/logprob_mismatch"] / count) == pytest.approx(want, rel=1e-3, abs=1e-9)
