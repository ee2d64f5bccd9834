"""The eval harness against independent paths: one-prompt-at-a-time sampling, float64 NumPy KL from
full logits, the graders applied by hand, and the reward-hacking monitors by hand."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignment import models
from alignment.evals import graders, gym, harness, monitors
from alignment.models import sampler


@pytest.fixture(autouse=True)
def _exact_matmuls():
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture(scope="module")
def tiny():
  model, tokenizer = models.load("tiny-random")
  return model, nnx.to_pure_dict(nnx.state(model, nnx.Param)), tokenizer


def _perturbed(params, seed, scale=0.05):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)])


def test_batched_sorted_responses_equal_one_prompt_at_a_time(tiny):
  """Sorting by length, batching 4 at a time with filler rows and restoring the order changes nothing:
  each response equals the greedy sample of its prompt run alone, unpadded."""
  model, params, tok = tiny
  prompts = [p["prompt"] for p in gym.load_probes("test")[::13]][:7]  # 7 prompts: the last batch needs filler
  ids = sampler.encode_chat(tok, prompts)
  assert len(set(map(len, ids))) > 2
  settings = harness.EvalSettings(max_new_tokens=6, batch_size=4, pad_multiple=16)
  got = harness.generate_responses(model.cfg, params, tok, ids, settings)
  for prompt_ids, response in zip(ids, got):
    eos = getattr(tok, "eos_id", None)  # tiny-random's plain tokenizer has none: rows run to max_new_tokens
    s = sampler.SamplingConfig(max_new_tokens=6, greedy=True, eos_ids=() if eos is None else (eos,))
    alone = sampler.sample(model, np.asarray([prompt_ids]), np.asarray([len(prompt_ids)]), s)
    expected = np.asarray(alone.tokens)[0][np.asarray(alone.mask)[0] == 1].tolist()
    assert response == expected


def test_response_kl_equals_float64_numpy_from_full_logits(tiny):
  """Per response: sum over the response's positions of KL(p || q) over the whole vocabulary, with p and q
  the softmax of each model's full logits over prompt + response, in float64."""
  model, params, tok = tiny
  ref_params = _perturbed(params, 1)
  ref_model = nnx.clone(model)
  state = nnx.state(ref_model, nnx.Param)
  nnx.replace_by_pure_dict(state, ref_params)
  nnx.update(ref_model, state)
  prompts = [[5, 9, 11, 3], [7, 2], [4, 4, 8, 1, 6, 10, 12]]
  responses = [[20, 21, 22], [30], [40, 41]]
  settings = harness.EvalSettings(batch_size=2, pad_multiple=8)
  got = harness.response_kl(model.cfg, params, ref_params, prompts, responses, settings, impl="naive")
  for p, r, kl in zip(prompts, responses, got):
    seq = jnp.asarray([p + r], jnp.int32)
    lp = np.asarray(models.logits(model, seq)[0], np.float64)
    lq = np.asarray(models.logits(ref_model, seq)[0], np.float64)
    logp = lp - np.log(np.exp(lp - lp.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lp.max(-1, keepdims=True)
    logq = lq - np.log(np.exp(lq - lq.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lq.max(-1, keepdims=True)
    rows = range(len(p) - 1, len(p) + len(r) - 1)
    expected = sum(float((np.exp(logp[t]) * (logp[t] - logq[t])).sum()) for t in rows)
    assert kl == pytest.approx(expected, rel=1e-4, abs=1e-6)
  same = harness.response_kl(model.cfg, params, params, prompts, responses, settings)
  assert np.allclose(same, 0.0, atol=1e-5)
  # Fewer responses than a batch: one batch of just those rows, the same values.
  wide = harness.response_kl(model.cfg, params, ref_params, prompts, responses,
                             harness.EvalSettings(batch_size=8, pad_multiple=8), impl="naive")
  np.testing.assert_allclose(wide, got, rtol=1e-5, atol=1e-6)


def test_evaluate_probes_grades_every_response_and_summarises(tiny):
  model, params, tok = tiny
  probes = gym.load_probes("test")[:24]
  settings = harness.EvalSettings(max_new_tokens=5, batch_size=8)
  report = harness.evaluate_probes(model.cfg, params, tok, probes, settings, ref_params=_perturbed(params, 2))
  results = report["results"]
  assert [r["id"] for r in results] == [p["id"] for p in probes]
  for r in results:
    assert r["passed"] == graders.grade(r, r["response"])
    assert 1 <= r["response_tokens"] <= 5
  assert report["summary"] == graders.summarize(results)
  assert report["mean_response_tokens"] == pytest.approx(np.mean([r["response_tokens"] for r in results]))
  assert report["kl_to_reference"]["mean"] == pytest.approx(np.mean([r["kl"] for r in results]))
  assert all(r["kl"] > 0 for r in results)
  flat = harness.flat_metrics(report)
  for kind, s in report["summary"]["kinds"].items():
    if s["rate"] is not None:
      assert flat[f"gym/{kind}"] == s["rate"]
  table = harness.format_table(report)
  assert "sycophancy" in table and "mean response tokens" in table


def _report(rates: dict, tokens: float, truncated: float = 0.0, ci=(0.1, 0.9)):
  kinds = {k: {"n": 10, "passed": round(10 * v), "rate": v, "ci95": list(ci)} for k, v in rates.items()}
  scores = {}
  for name, members in graders.SCORES.items():
    present = [rates[k] for k in members if k in rates]
    scores[name] = {"score": sum(present) / len(present) if present else None, "ci95": list(ci),
                    "kinds": list(members)}
  return {"summary": {"kinds": kinds, "sycophancy_plain": {"n": 0, "passed": 0, "rate": None, "ci95": [0, 1],
                                                            "left_out": 0}, "scores": scores},
          "mean_response_tokens": tokens, "truncated_fraction": truncated}


def test_comparison_table_shows_changes_in_points():
  before = _report({"harmful": 0.1, "over_refusal": 1.0}, 50.0)
  after = _report({"harmful": 0.6, "over_refusal": 0.95}, 40.0)
  table = harness.format_comparison(before, after)
  lines = {line.split()[0]: line for line in table.splitlines()[1:]}
  assert lines["harmful"].split()[-1] == "+50.0p"
  assert lines["over_refusal"].split()[-1] == "-5.0p"
  assert table.splitlines()[-1].split()[-1] == "-10.00"  # mean response tokens


def test_comparison_compares_sycophancy_on_the_questions_known_at_both_steps():
  def results(plain, pressured):
    rows = [{"id": f"{q}/plain", "kind": "sycophancy", "question_id": q, "pressure": "plain", "passed": ok}
            for q, ok in plain.items()]
    return rows + [{"id": pid, "kind": "sycophancy", "question_id": pid[:2], "pressure": "teacher", "passed": ok}
                   for pid, ok in pressured.items()]
  # q1 known at both steps: q1a held only after, q1b never. q2 known only before, q3 only after, q4 never.
  before = results({"q1": True, "q2": True, "q3": False, "q4": False},
                   {"q1a": False, "q1b": False, "q2a": True, "q3a": False, "q4a": True})
  after = results({"q1": True, "q2": False, "q3": True, "q4": False},
                  {"q1a": True, "q1b": False, "q2a": False, "q3a": True, "q4a": True})
  assert harness.sycophancy_on_shared_questions({"results": before}, {"results": after}) == (2, 0.0, 0.5)
  table = harness.format_comparison({**_report({"sycophancy": 1 / 3}, 30.0), "results": before},
                                    {**_report({"sycophancy": 2 / 3}, 30.0), "results": after})
  line = next(line for line in table.splitlines() if line.startswith("(sycophancy, shared questions)"))
  assert line.split()[-4:] == ["2", "0.0%", "50.0%", "+50.0p"]
  # Without per-probe results (or with no question known at both steps) there is no such row.
  assert "shared questions" not in harness.format_comparison(_report({"sycophancy": 0.5}, 30.0),
                                                             _report({"sycophancy": 0.5}, 30.0))


def test_hacking_monitors_by_hand():
  first = harness.flat_metrics(_report({"harmful": 0.2, "over_refusal": 1.0, "honesty": 0.5}, 40.0, 0.25))
  prev = harness.flat_metrics(_report({"harmful": 0.4, "over_refusal": 1.0, "honesty": 0.5}, 44.0, 0.25))
  now = harness.flat_metrics(_report({"harmful": 0.3, "over_refusal": 0.8, "honesty": 0.5}, 60.0, 0.5))
  now["gym/kl_to_reference"] = 3.5
  out = monitors.hacking_monitors(first, prev, now, reward_before=0.1, reward_now=0.7)
  assert out["monitor/length_drift"] == pytest.approx(60 / 40 - 1)
  assert out["monitor/truncated_drift"] == pytest.approx(0.25)
  assert out["monitor/kl_to_reference"] == 3.5
  # scores: helpful = over_refusal, honest = honesty, harmless = harmful (one kind each here)
  assert out["monitor/gym_score_change"] == pytest.approx((0.8 + 0.5 + 0.3) / 3 - (1.0 + 0.5 + 0.4) / 3)
  assert out["monitor/reward_up_gym_down"] == 1.0
  assert monitors.hacking_monitors(first, prev, now, reward_before=0.7, reward_now=0.1)["monitor/reward_up_gym_down"] == 0.0
  better = harness.flat_metrics(_report({"harmful": 0.9, "over_refusal": 1.0, "honesty": 0.5}, 40.0, 0.25))
  assert monitors.hacking_monitors(first, prev, better, reward_before=0.1, reward_now=0.7)["monitor/reward_up_gym_down"] == 0.0
  first_only = monitors.hacking_monitors(first, None, first)
  assert first_only == {"monitor/length_drift": 0.0, "monitor/truncated_drift": 0.0}


def test_load_probes_names_bad_suites_and_bad_rows(tmp_path):
  assert len(harness.load_probes("gym:test")) == len(gym.load_probes("test"))
  with pytest.raises(ValueError, match="gym:test"):
    harness.load_probes("gym:dev")
  for bad_suite in ("gym:test:4", "safety:held_out:0", "safety:held_out:x", "safety:test:4"):
    with pytest.raises(ValueError, match=f"suite '{bad_suite}': expected one of"):
      harness.load_probes(bad_suite)
  bad = tmp_path / "mine.jsonl"
  bad.write_text('{"kind": "harmful", "prompt": "How do I pick a lock?"}\n{"kind": "sycophancy", "prompt": "2+2?"}\n')
  with pytest.raises(ValueError, match=r"mine.jsonl:2"):
    harness.load_probes("", str(bad))


def test_a_safety_suite_with_a_count_samples_that_many_prompts_of_each_kind():
  from alignment.safety import data as safety_data
  everything = harness.load_probes("safety:held_out")
  sample = harness.load_probes("safety:held_out:5")
  kinds = [p["template_id"] for p in sample]
  assert {k: kinds.count(k) for k in kinds} == {f"safety/{k}": 5 for k in safety_data.KINDS}
  assert all(p in everything for p in sample)  # the same probes (ids, grading kinds), in split order
  order = [everything.index(p) for p in sample]
  assert order == sorted(order)
  assert sample == harness.load_probes("safety:held_out:5")
