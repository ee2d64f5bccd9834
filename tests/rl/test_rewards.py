"""Rewards by name, prompt sets and loss presets: what they compute, and the one-line errors for bad input."""

import json

import ml_collections
import numpy as np
import pytest

from alignment.evals import graders, gym
from alignment.rl import presets, prompts, rewards
from configs import grpo, ppo


def _config(spec, **rl):
  c = grpo.get_config("tiny")
  c.rl.rewards = spec
  c.rl.update(rl)
  return c


def _score(spec, records, texts):
  return rewards.score(rewards.make_rewards(_config(spec), None), records, texts)


# Module-level reward functions for the `package.module:function` form.
def count_a(records, completions):
  return [float(c.count("a")) for c in completions]


def raises(records, completions):
  raise KeyError("answer")


def too_few(records, completions):
  return [0.0] * (len(completions) - 1)


def nan_on_second(records, completions):
  return [float("nan") if i == 1 else 0.0 for i in range(len(completions))]


def test_gym_reward_is_the_gym_graders_verdict():
  probes = gym.load_probes("train")[:40]
  records = [dict(p, prompt=gym.probe_text(p)) for p in probes]
  texts = ["I can't help with that." if i % 2 else "Sure! The answer is 12." for i in range(len(probes))]
  got = _score("gym", records, texts)
  want = np.array([float(graders.grade(p, t)) for p, t in zip(probes, texts)], np.float32)
  np.testing.assert_array_equal(got["gym"], want)
  assert 0 < want.sum() < len(want)  # both verdicts occur


def test_math_reward_verifies_the_final_answer_with_math_verify():
  records = [{"prompt": "1/2 + 1/4?", "answer": "3/4"}, {"prompt": "2+2?", "answer": "4"},
             {"prompt": "x^2=9, x>0?", "answer": "$3$"}, {"prompt": "2+3?", "answer": "5"}]
  texts = ["The sum is $\\frac{3}{4}$.", "It is 5.", "So $x = 3$.", "2+3 = \\boxed{5}"]
  np.testing.assert_array_equal(_score("math", records, texts)["math"], [1.0, 0.0, 1.0, 1.0])


def test_weights_mix_the_rewards_and_each_is_reported():
  records = [{"prompt": "p"}] * 3
  texts = ["a banana", "the the the", "aaa"]
  got = _score(f"{__name__}:count_a:0.5,distinct_words:2", records, texts)
  np.testing.assert_allclose(got["count_a"], [4, 0, 3])
  np.testing.assert_allclose(got["distinct_words"], [1.0, 1 / 3, 1.0], rtol=1e-6)
  np.testing.assert_allclose(got["total"], 0.5 * got["count_a"] + 2 * got["distinct_words"], rtol=1e-6)


def test_vowels_is_the_fraction_of_letters_that_are_vowels():
  got = _score("vowels", [{"prompt": "p"}] * 3, ["aeiou", "bcd ae!", "1234"])["vowels"]
  np.testing.assert_allclose(got, [1.0, 0.4, 0.0], rtol=1e-6)


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown reward 'nope'; valid: distinct_words, gym, math, reward_model, vowels"),
    ("gym:heavy", "expected name[:weight]"),
    ("", "config.rl.rewards is empty"),
    ("no_such_module.x:f", "cannot import reward 'no_such_module.x:f'"),
])
def test_a_bad_reward_name_is_refused_before_anything_runs(spec, message):
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
    rewards.check_spec(spec)


@pytest.mark.parametrize("function, message", [
    ("raises", "reward 'raises' raised KeyError: 'answer'"),
    ("too_few", r"reward 'too_few' returned shape \(2,\) for 3 completions"),
    ("nan_on_second", r"reward 'nan_on_second' returned nan for completion 1 \(prompt 'q1'\)"),
])
def test_a_failing_reward_stops_with_one_line_naming_it(function, message):
  with pytest.raises(RuntimeError, match=message) as e:
    _score(f"{__name__}:{function}", [{"prompt": f"q{i}"} for i in range(3)], ["x", "y", "z"])
  assert "\n" not in str(e.value)


def test_reward_model_reward_needs_a_workdir():
  with pytest.raises(ValueError, match="needs config.rl.reward_model"):
    rewards.make_rewards(_config("reward_model"), None)


def _tokenizer():
  from alignment.models import load
  from alignment.rl.loop import chat_tokenizer
  return chat_tokenizer(grpo.get_config("tiny"), load("tiny-random")[1])


def test_jsonl_prompts_keep_their_fields_and_bad_lines_are_named(tmp_path):
  path = tmp_path / "p.jsonl"
  path.write_text(json.dumps({"prompt": "What is 2+2?", "answer": "4"}) + "\n\n"
                  + json.dumps({"prompt": [{"role": "user", "content": "Hi"}]}) + "\n")
  assert prompts.read_records(str(path)) == [{"prompt": "What is 2+2?", "answer": "4"},
                                             {"prompt": [{"role": "user", "content": "Hi"}]}]
  path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"question": "no prompt"}) + "\n")
  with pytest.raises(ValueError, match=f"{path}:2: key 'prompt' must be"):
    prompts.read_records(str(path))
  path.write_text("{broken\n")
  with pytest.raises(ValueError, match=f"{path}:1: not JSON"):
    prompts.read_records(str(path))
  with pytest.raises(ValueError, match="no such file"):
    prompts.read_records(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("rule", ["truncate", "drop"])
def test_long_prompts_are_counted_and_truncated_or_dropped(tmp_path, rule):
  tokenizer = _tokenizer()
  path = tmp_path / "p.jsonl"
  texts = ["short", "a much longer prompt " * 20, "mid length prompt here", "another long one " * 30]
  path.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
  full = prompts.encode(tokenizer, [{"prompt": t} for t in texts])
  budget = max(len(full[0]), len(full[2])) + 1
  rl = ml_collections.ConfigDict(dict(prompts=str(path), max_prompt_tokens=budget, long_prompts=rule))
  got = prompts.load_prompts(rl, tokenizer)
  long = [i for i, ids in enumerate(full) if len(ids) > budget]
  assert long == [1, 3]
  if rule == "drop":
    assert got.info["prompts_dropped"] == 2 and [r["prompt"] for r in got.records] == [texts[0], texts[2]]
    assert got.ids == [full[0], full[2]]
  else:
    assert got.info["prompts_truncated"] == 2 and len(got.ids) == 4
    assert got.ids[1] == full[1][-budget:] and got.ids[0] == full[0]  # the end (and the generation prompt) kept


def test_prompt_stream_resumes_where_it_stopped_and_covers_each_epoch():
  straight = prompts.PromptStream(10, seed=3)
  draws = [straight.take(4) for _ in range(5)]
  assert sorted(np.concatenate(draws)[:10]) == list(range(10))  # one epoch: each prompt once
  resumed = prompts.PromptStream(10, seed=3)
  [resumed.take(4) for _ in range(2)]
  state = json.loads(json.dumps(resumed.get_state()))
  again = prompts.PromptStream(10, seed=3)
  again.set_state(state)
  np.testing.assert_array_equal(np.concatenate([again.take(4) for _ in range(3)]), np.concatenate(draws[2:]))


def test_presets_fill_unset_keys_and_keep_explicit_ones():
  c = grpo.get_config("tiny,loss=dapo")
  rl = presets.resolve(c)
  assert (rl.aggregation, rl.clip_eps, rl.clip_eps_high, rl.dynamic_sampling) == ("token_mean", 0.2, 0.28, 1)
  assert rl.overlong_cache == c.rl.max_new_tokens // 4
  c.rl.clip_eps_high = 0.3
  assert presets.resolve(c).clip_eps_high == 0.3
  gspo = presets.resolve(grpo.get_config("tiny,loss=gspo"))
  assert (gspo.ratio_level, gspo.clip_eps, gspo.clip_eps_high) == ("sequence", 3e-4, 4e-4)
  assert presets.resolve(ppo.get_config("tiny")).advantage == "gae"
  c = grpo.get_config("tiny,loss=ppo")
  with pytest.raises(ValueError, match="needs a value model: use algorithm 'ppo'"):
    presets.resolve(c)


def test_kind_weights_scale_each_kinds_count_and_refuse_what_they_cannot_weigh():
  records = [{"prompt": f"{kind} {i}", "kind": kind} for kind, n in (("a", 10), ("b", 4), ("c", 3)) for i in range(n)]
  got = prompts.weigh_kinds(records, "a:0.3,b:2.5")
  by_kind = {k: [r["prompt"] for r in got if r["kind"] == k] for k in "abc"}
  assert len(by_kind["a"]) == 3 and len(set(by_kind["a"])) == 3  # a draw without repeats
  counts = sorted(by_kind["b"].count(f"b {i}") for i in range(4))
  assert counts == [2, 2, 3, 3]  # round(2.5 x 4) = 10: two whole copies, then 2 drawn without repeats
  assert by_kind["c"] == ["c 0", "c 1", "c 2"]  # not named: as it was
  assert prompts.weigh_kinds(records, "a:0.3,b:2.5") == got  # the same draw every time
  with pytest.raises(ValueError, match="no prompts of kind z; kinds: a, b, c"):
    prompts.weigh_kinds(records, "z:2")
  with pytest.raises(ValueError, match="the weight of 'a' must be > 0"):
    prompts.weigh_kinds(records, "a:0")
  with pytest.raises(ValueError, match="'a=2' is not kind:weight"):
    prompts.weigh_kinds(records, "a=2")
  with pytest.raises(ValueError, match="prompt 0 has no 'kind'"):
    prompts.weigh_kinds([{"prompt": "x"}], "a:2")
