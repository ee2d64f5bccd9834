"""The online loop end to end on the tiny model: each preset learns its rule reward with the KL to the
reference bounded; a resumed run continues the uninterrupted one; dynamic sampling fills the batch with
groups whose rewards differ; the sampler / trainer mismatch is measured; bad configs stop first."""

import concurrent.futures
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from alignment import main, metrics
from configs import grpo, ppo

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ALL_LOSSES = ("ppo", "grpo", "dr_grpo", "dapo", "gspo", "rloo", "reinforce_pp")


def _config(loss, **rl):
  c = ppo.get_config("tiny") if loss == "ppo" else grpo.get_config(f"tiny,loss={loss}")
  c.rl.update(rl)
  return c


def _run(config, workdir):
  summary = main.run(config, str(workdir))
  return summary, metrics.read_metrics(str(workdir))


# The vowel fraction of the tiny model's text spreads by ~0.05 within a group. Normalised advantages (grpo,
# gspo, rloo's and reinforce_pp's) do not see its scale; dr_grpo's, DAPO's (against its overlong penalty
# of up to -1) and PPO's (against the KL in its reward) do, so they get it x10.
WEIGHTS = {"dr_grpo": 10.0, "dapo": 10.0, "ppo": 10.0}
# Two minibatches a rollout where the off-policy part of a loss is the point: GSPO's sequence ratio and tight
# clip, DAPO's clip-higher (one update a rollout keeps every ratio at 1); PPO's preset has two already.
MINIBATCHES = {"gspo": 2, "dapo": 2}
STEPS = 30


def _run_on_one_device(loss, workdir, *overrides):
  """The command line's run in a process of its own with one CPU device: eight fake devices on two cores
  make each tiny step ~7x slower, and what is learned does not depend on the mesh (the same rewards to
  the last digit; sharding is covered by test_prefix and the 2-process test)."""
  config = "configs/ppo.py:tiny" if loss == "ppo" else f"configs/grpo.py:tiny,loss={loss}"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run([sys.executable, "-m", "alignment.main", f"--config={config}", f"--workdir={workdir}",
                         *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads((workdir / "summary.json").read_text()), metrics.read_metrics(str(workdir))


@pytest.fixture(scope="module")
def preset_runs(request, tmp_path_factory):
  """The runs of the presets this session tests, two at a time (one compiles on one core while the other
  runs): loss -> a future of (summary, records)."""
  losses = [item.callspec.params["loss"] for item in request.session.items
            if item.originalname == "test_each_preset_raises_its_rule_reward_with_the_kl_bounded"]
  root = tmp_path_factory.mktemp("presets")
  pool = concurrent.futures.ThreadPoolExecutor(2)
  try:
    yield {loss: pool.submit(_run_on_one_device, loss, root / loss, f"--config.rl.rewards=vowels:{WEIGHTS.get(loss, 1.0)}",
                             f"--config.rl.minibatches={MINIBATCHES.get(loss, 1)}", f"--config.train.steps={STEPS}")
           for loss in losses}
  finally:
    pool.shutdown(cancel_futures=True)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ALL_LOSSES)
def test_each_preset_raises_its_rule_reward_with_the_kl_bounded(preset_runs, loss):
  weight = WEIGHTS.get(loss, 1.0)
  summary, records = preset_runs[loss].result()
  steps = sorted(records)
  assert steps == list(range(1, STEPS + 1))
  reward = np.array([records[s]["reward/vowels"] for s in steps])
  np.testing.assert_allclose([records[s]["reward/mean"] for s in steps], weight * reward, rtol=1e-5)
  rise = reward[-5:].mean() - reward[:5].mean()
  # Per-step means of 32 completions wander by ~0.01 (std); these rises measured 0.06 to 0.16.
  assert rise > 0.03, (loss, reward.round(3).tolist())
  kl = np.array([records[s].get("kl/ref", 0.0) for s in steps])
  if loss != "dapo":  # (DAPO has no reference)
    assert 0 < kl[-1] < 15.0, kl.round(2).tolist()  # nats per 24-token completion; measured 3.5 to 10
  for s in steps:
    assert records[s]["rollout/logprob_mismatch"] < 1e-5  # float32, no top-k / top-p: the same numbers
    for key in ("time/generate_s", "time/score_s", "time/reward_s", "time/train_s", "rollout/tokens_per_s",
                "rollout/response_len"):
      assert records[s][key] > 0, key
  if loss in MINIBATCHES:
    assert max(records[s]["policy/clip_frac"] for s in steps) > 0
  if loss == "ppo":
    ev = [records[s]["value/explained_variance"] for s in steps]
    assert max(ev[-5:]) > min(ev[:3])  # the value model learns
  assert summary["final_reward"] == records[STEPS]["reward/mean"]


def test_a_resumed_run_continues_the_uninterrupted_one(tmp_path):
  """On one device, like the presets above (the 2-host test resumes a job onto another mesh)."""
  adaptive = ("--config.rl.kl_target=0.5", "--config.rl.kl_horizon=50")  # the coefficient moves: restored too
  with concurrent.futures.ThreadPoolExecutor(2) as pool:  # the straight run beside the first half
    straight = pool.submit(_run_on_one_device, "grpo", tmp_path / "straight", *adaptive, "--config.train.steps=6")
    pool.submit(_run_on_one_device, "grpo", tmp_path / "resumed", *adaptive, "--config.train.steps=3").result()
    straight = straight.result()[1]
  summary, resumed = _run_on_one_device("grpo", tmp_path / "resumed", *adaptive, "--config.train.steps=6")
  assert summary["start_step"] == 3
  assert sorted(resumed) == sorted(straight)
  assert len({straight[s]["kl_coef"] for s in straight}) > 2
  for step in straight:
    for key in ("reward/mean", "loss", "kl/ref", "kl_coef", "rollout/response_len", "grad_norm"):
      assert resumed[step][key] == pytest.approx(straight[step][key], rel=1e-6, abs=1e-7), (step, key)


def only_some_prompts(records, completions):
  """A reward that is 0.0 for every completion of the prompts that start with a vowel, else the vowel rate."""
  out = []
  for record, completion in zip(records, completions):
    letters = [c for c in completion.lower() if c.isalpha()]
    flat = record["prompt"][0].lower() in "aeiou"
    out.append(0.0 if flat or not letters else sum(c in "aeiou" for c in letters) / len(letters))
  return out


def test_dynamic_sampling_keeps_the_groups_whose_rewards_differ(tmp_path):
  config = _config("dapo", rewards=f"{__name__}:only_some_prompts", max_draws=6)
  config.train.steps = 3
  _, records = _run(config, tmp_path / "run")
  for s in records:
    assert records[s]["rollout/draws"] >= 1
    assert records[s]["rollout/informative_groups"] == config.rl.prompts_per_step
  assert max(records[s]["rollout/draws"] for s in records) > 1  # some prompts' groups were dropped


def test_top_k_sampling_shows_a_mismatch_that_tis_weights_bound(tmp_path):
  config = _config("grpo", top_k=8, tis_cap=2.0)
  config.train.steps = 2
  _, records = _run(config, tmp_path / "run")
  # the sampler's distribution is the top 8 tokens renormalised; the trainer's is the whole vocabulary
  assert all(records[s]["rollout/logprob_mismatch"] > 0.5 for s in records)
  assert all(records[s]["rollout/mismatch_kl"] > 0 for s in records)
  # weights exp(trainer - sampler) <= 1 on the kept tokens (the sampler's renormalised top 8 give them more
  # mass than the full softmax does), so none reaches the cap of 2: the mean weight is the trainer's share
  for s in records:
    assert 0 < records[s]["rollout/tis_weight"] < 1 and records[s]["rollout/tis_capped"] == 0


@pytest.mark.parametrize("override, message", [
    ({"rl.loss": "ppo2"}, "config.rl.loss='ppo2'; expected one of 'ppo', 'grpo'"),
    ({"rl.rewards": "vowls"}, "unknown reward 'vowls'; valid: "),
    ({"rl.aggregation": "mean"}, "config.rl.aggregation='mean'; expected one of"),
    ({"rl.prompts_per_step": 6}, "prompts_per_step=6 must be divisible by data x fsdp"),
    ({"rl.prompts": "missing.jsonl"}, "config.rl.prompts=missing.jsonl: no such file"),
])
def test_a_bad_config_stops_before_the_workdir_is_touched(tmp_path, override, message):
  config = _config("grpo")
  for key, value in override.items():
    section, name = key.split(".")
    config[section][name] = value
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
    main.run(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_shared_prompt_rows_train_as_a_row_per_completion_does(tmp_path):
  """The same run with each group's prompt once in the rows and with a row per completion: the same
  updates (float32 sums in another order: the loss, a mean of O(1) per-token terms, within 1e-5; the
  gradient norm within 1e-4 of itself), on fewer tokens."""
  runs = {}
  for share in (True, False):
    config = _config("grpo", share_prompts=share)
    config.train.steps = 3
    runs[share] = _run(config, tmp_path / str(share))[1]
  for step in runs[False]:
    shared, unshared = runs[True][step], runs[False][step]
    assert shared["reward/mean"] == unshared["reward/mean"]  # the same samples
    assert abs(shared["loss"] - unshared["loss"]) <= 1e-5
    # kl/ref: the difference of two sums of 24 log-probs (|log p| <= 6.2): 16 ulps of their scale, 150
    assert abs(shared["kl/ref"] - unshared["kl/ref"]) <= 16 * 1.2e-7 * 150
    for key in ("grad_norm", "policy/entropy", "rollout/logprob_mismatch"):
      assert shared[key] == pytest.approx(unshared[key], rel=1e-4, abs=1e-6), key
    assert shared["train/row_tokens"] < 0.8 * unshared["train/row_tokens"]


def test_ppo_with_a_trained_reward_model_as_reward_and_value(tmp_path):
  """The reward model configs/rm.py trains scores the completions (normalised by its saved mean and std) and
  is where PPO's value model starts."""
  import jax
  from alignment import checkpoint
  from alignment.parallel import make_mesh
  from alignment.rl import rewards as rewards_lib
  from alignment.rl.loop import Learner
  from alignment.train import state as state_lib
  from alignment.train.rm import RewardScorer
  from configs import rm
  rm_config = rm.get_config("tiny,steps=4")
  rm_config.data.data_dir = str(tmp_path / "tfds")
  main.run(rm_config, str(tmp_path / "rm"))
  config = _config("ppo", rewards="reward_model", reward_model=str(tmp_path / "rm"), value_init="reward_model")
  config.train.steps = 2

  mesh = make_mesh({"data": -1})
  learner = Learner(config, mesh)
  state = state_lib.create_train_state(learner.parts, learner.shardings, 0)
  saved, _ = checkpoint.restore_entry(tmp_path / "rm" / "checkpoints", "reward")
  for got, want in zip(jax.tree.leaves(jax.device_get(state["value"])), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(got, want)
  scorer = RewardScorer(tmp_path / "rm")
  records = [{"prompt": "What is 2+2?"}, {"prompt": "Name a colour."}]
  texts = ["Four.", "Blue, or maybe green."]
  got = rewards_lib.score(rewards_lib.make_rewards(config, mesh), records, texts)["reward_model"]
  want = (scorer.score([r["prompt"] for r in records], texts) - scorer.stats["reward/mean"]) / scorer.stats["reward/std"]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

  summary, records = _run(config, tmp_path / "ppo")
  assert sorted(records) == [1, 2] and summary["steps"] == 2
  assert all(np.isfinite(records[s]["value/explained_variance"]) for s in records)
