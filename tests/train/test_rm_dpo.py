"""Reward modeling and DPO on the tiny config: they learn the planted preference, the reward is read
at the sequence's last token even when padding uses the same id, and a cached reference is exact."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from alignment import metrics
from alignment.data import chat, preference, preference_pipeline
from alignment.main import run
from alignment.parallel import make_mesh, shard_batch
from alignment.train import state as state_lib
from alignment.train.model import setup_model
from alignment.train.rm import RewardScorer, pair_rewards
from configs import dpo as dpo_config, rm as rm_config
from configs.common import FIXTURES, SHARDING_RULES


def _config(module, tmp_path, **train):
  config = module.get_config("tiny")
  config.kernel.impl = "naive"
  config.data.data_dir = str(tmp_path / "tfds")
  for key, value in train.items():
    config.train[key] = value
  return config


@pytest.mark.slow
def test_reward_model_learns_the_planted_preference_and_scores_new_pairs(tmp_path):
  workdir = str(tmp_path / "rm")
  summary = run(_config(rm_config, tmp_path), workdir)
  assert summary["eval/accuracy"] >= 0.95, summary
  assert summary["eval_pairs"] >= 10
  restored_meta = json.load(open(os.path.join(workdir, "checkpoints", str(summary["steps"]), "meta", "metadata")))
  assert restored_meta["summary"]["reward/std"] > 0 and restored_meta["summary"]["reward/count"] == 2 * summary["eval_pairs"]

  scorer = RewardScorer(workdir)
  assert scorer.stats["reward/mean"] == pytest.approx(summary["reward/mean"])
  prompts = ["What is 3 plus 4?", "What is the capital of Peru?", "Reverse the word 'lamp'."]
  polite = ["7 Happy to help!", "Lima Happy to help!", "pmal Happy to help!"]
  curt = ["7.", "Lima.", "Whatever."]
  scores = scorer.score(prompts + prompts, polite + curt)
  assert (scores[:3] > scores[3:]).all(), scores


def test_reward_is_read_at_the_last_token_when_pad_equals_eos(tmp_path):
  tokenizer, template = chat.load_tokenizer(), chat.load_template()
  eos = tokenizer.token_to_id("<|im_end|>")
  pairs = [preference.record_to_pair(r) for r in preference.read_preferences(
      os.path.join(FIXTURES, "pref_generic.jsonl"))[0][:6]]
  it = preference_pipeline.make_preference_eval_iterator(pairs, tokenizer=tokenizer, template=template, seq_len=256,
                                                         batch_size=8, pairs_per_row=2, pad_id=eos)
  batch = next(it)
  assert (batch["inputs"][batch["segment_ids"] == 0] == eos).all()  # padding really is the EOS id

  setup = setup_model(rm_config.get_config("tiny").model, 0, reward_head=True)
  mesh = make_mesh({"data": 1}, jax.devices()[:1])
  params = setup.load_params(state_lib.param_shardings(setup.spec, mesh, SHARDING_RULES))
  chosen, rejected = jax.device_get(jax.jit(lambda p, b: pair_rewards(setup.spec.graphdef, p, b))(
      params, shard_batch(batch, mesh)))

  model = jax.jit(lambda p, x: nnx.merge(setup.spec.graphdef, p)(x))
  checked = 0
  for r, p in zip(*np.nonzero(batch["pair_mask"])):
    pair = pairs[batch["pair_index"][r, p]]
    for side, got in (("chosen", chosen[r, p]), ("rejected", rejected[r, p])):
      ids, _ = preference_pipeline.tokenize_sequence(pair["prompt"], pair[side], tokenizer, template)
      assert ids[-1] == eos
      alone = np.asarray(model(params, ids[None].astype(np.int32)))[0, -1]  # the sequence by itself
      assert got == pytest.approx(float(alone), abs=1e-5)
      checked += 1
  assert checked == 12


@pytest.fixture(scope="module")
def dpo_runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("dpo")
  out = {}
  for name, reference, capacity in (("live", "live", -1), ("cached", "cached", -1), ("every_cell", "live", 0)):
    config = _config(dpo_config, tmp, steps=20, eval_every=20)
    config.dpo.reference, config.dpo.logit_capacity = reference, capacity
    config.dpo.ref_cache_dir = str(tmp / "ref_cache")
    workdir = str(tmp / name)
    out[name] = (run(config, workdir), metrics.read_metrics(workdir))
  out["cache_files"] = sorted(os.listdir(tmp / "ref_cache"))
  return out


@pytest.mark.slow
def test_dpo_raises_held_out_margin_and_accuracy(dpo_runs):
  summary, logged = dpo_runs["live"]
  assert logged[0]["eval/loss"] == pytest.approx(np.log(2), abs=1e-6)  # reference == policy at step 0
  assert logged[0]["eval/rewards/margins"] == 0 and logged[0]["eval/rewards/accuracies"] == 0
  assert summary["eval/rewards/margins"] > 0.5
  assert summary["eval/rewards/accuracies"] >= 0.9
  assert summary["eval/loss"] < 0.5


@pytest.mark.slow
def test_cached_reference_log_probs_give_the_live_losses(dpo_runs):
  (_, live), (summary, cached) = dpo_runs["live"], dpo_runs["cached"]
  assert dpo_runs["cache_files"] and len(dpo_runs["cache_files"]) == 2  # train and eval splits
  assert summary["reference_cache/train"].endswith(".npy")
  for step in range(1, 21):
    assert cached[step]["loss"] == pytest.approx(live[step]["loss"], abs=1e-6), step
  for key in ("eval/loss", "eval/rewards/margins", "eval/rewards/accuracies"):
    assert cached[20][key] == pytest.approx(live[20][key], abs=1e-6)


@pytest.mark.slow
def test_logits_at_completion_cells_only_give_the_every_cell_losses(dpo_runs):
  (summary, gathered), (every_summary, every) = dpo_runs["live"], dpo_runs["every_cell"]
  seq_len = dpo_config.get_config("tiny").data.seq_len
  assert 0 < summary["logit_capacity"] < seq_len and every_summary["logit_capacity"] == 0
  for step in range(1, 21):
    assert gathered[step]["loss"] == pytest.approx(every[step]["loss"], abs=1e-5), step
  for key in ("eval/loss", "eval/rewards/margins", "eval/logps/chosen"):
    assert gathered[20][key] == pytest.approx(every[20][key], rel=1e-5, abs=1e-5), key


def test_params_fingerprint_is_the_same_on_any_mesh_and_sees_a_one_ulp_change():
  from alignment.train.dpo import params_fingerprint
  setup = setup_model(dpo_config.get_config("tiny").model, 0)
  fingerprints = {}
  for sizes in ({"data": 1}, {"data": 2, "fsdp": 2, "tensor": 2}, {"data": 1, "fsdp": 8}):
    mesh = make_mesh(sizes, jax.devices()[:int(np.prod(list(sizes.values())))])
    fingerprints[str(sizes)] = params_fingerprint(setup.load_params(state_lib.param_shardings(setup.spec, mesh,
                                                                                              SHARDING_RULES)))
  assert len(set(fingerprints.values())) == 1, fingerprints
  params = jax.device_get(setup.load_params(state_lib.param_shardings(setup.spec, make_mesh({"data": 1}, jax.devices()[:1]),
                                                                      SHARDING_RULES)))
  nudged = jax.tree.map(np.array, params)
  leaf = nudged["layers"]["mlp"]["up"]
  leaf[1, 3, 5] = np.nextafter(leaf[1, 3, 5], np.float32(np.inf))
  assert params_fingerprint(nudged) != params_fingerprint(params)
  swapped = jax.tree.map(np.array, params)
  swapped["layers"]["mlp"]["up"] = swapped["layers"]["mlp"]["up"][::-1].copy()  # same values, other places
  assert params_fingerprint(swapped) != params_fingerprint(params)
