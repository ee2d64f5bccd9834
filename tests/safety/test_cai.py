"""Constitutional AI: constitution files, critique and revision, AI feedback read from label log-probabilities.

References: the model's full logits log-softmaxed in float64 NumPy, one unpadded sequence at a time (the
labeller's probabilities), conversations built here by hand from the YAML file (what each stage is
asked), and Wilson intervals of counts made here (the agreement)."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignment import models
from alignment.data import chat
from alignment.evals import graders, gym, harness
from alignment.models import Transformer
from alignment.models.tokenizer import Tokenizer
from alignment.safety import cai, constitution as constitution_lib
from alignment.train.model import Policy, load_policy

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETTINGS = cai.Settings(max_new_tokens=12, critique_tokens=8, batch_size=4)


@pytest.fixture(scope="module")
def policy():
  """tiny-random with its tokenizer wrapped in the ChatML template the tiny configs train with."""
  loaded = load_policy("tiny-random")
  backend = chat.load_tokenizer()
  tokenizer = Tokenizer(backend, bos_id=None, eos_id=backend.token_to_id("<|im_end|>"), pad_id=0,
                        chat_template=chat.load_template())
  return Policy(loaded.cfg, loaded.params, tokenizer, "tiny-random")


# ----------------------------------------------------------------------------------------------
# Constitution files.


def test_the_bundled_constitutions_load_with_their_principles():
  assert {"harmless", "hhh"} <= set(constitution_lib.bundled())
  for name in constitution_lib.bundled():
    c = constitution_lib.load(name)
    import yaml
    raw = yaml.safe_load((constitution_lib.BUNDLED / f"{name}.yaml").read_text())
    assert c.name == raw["name"]
    assert [p.name for p in c.principles] == [p["name"] for p in raw["principles"]]
    assert [p.choice for p in c.principles] == [p["choice"].strip() for p in raw["principles"]]


@pytest.mark.parametrize("text, message", [
    ("name: x\nprinciples: []\n", "'principles' must be a non-empty list"),
    ("name: x\nprinciples:\n  - {name: a, critique: c, revision: r}\n", "principles[0]: missing key 'choice'"),
    ("name: x\nprinciples:\n  - {name: a, critique: c, revision: r, choice: q, tone: t}\n",
     "principles[0]: unknown key 'tone'"),
    ("name: x\nprinciples:\n  - {name: a, critique: c, revision: r, choice: ''}\n", "principles[0].choice: expected non-empty"),
    ("name: x\nprinciples:\n  - {name: a, critique: c, revision: r, choice: q}\n  - {name: a, critique: c, "
     "revision: r, choice: q}\n", "principle name 'a' is used twice"),
    ("name: x\nprinciples:\n  - {name: a, critique: c, revision: r, choice: q}\nexamples:\n  - {prompt: p}\n",
     "examples[0]: missing key 'response'"),
    ("principles:\n  - {name: a, critique: c, revision: r, choice: q}\n", "'name' must be non-empty text"),
    ("name: x\ndescription: ok\nprinciples: a: b\n", "bad.yaml:3: not valid YAML (mapping values are not allowed here)"),
])
def test_a_malformed_constitution_is_refused_naming_the_file_and_entry(tmp_path, text, message):
  path = tmp_path / "bad.yaml"
  path.write_text(text)
  with pytest.raises(ValueError) as e:
    constitution_lib.load(str(path))
  assert str(path) in str(e.value) and message in str(e.value)


def test_an_unknown_constitution_name_lists_the_bundled_ones():
  with pytest.raises(ValueError, match="not a YAML file nor a bundled constitution.*harmless.*hhh"):
    constitution_lib.load("kind")


# ----------------------------------------------------------------------------------------------
# AI feedback.


def _reference_logprob(policy, ids: list[int], start: int) -> float:
  """log p(ids[start:] | ids[:start]) from the full logits of one unpadded sequence, in float64."""
  model = nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: Transformer(policy.cfg, rngs=nnx.Rngs(0)))), policy.params)
  logits = np.asarray(models.logits(model, jnp.asarray([ids], jnp.int32))[0], np.float64)
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return float(sum(logits[t - 1, ids[t]] - logz[t - 1] for t in range(start, len(ids))))


def test_next_token_logprobs_equal_each_unpadded_sequences_own_logits(policy):
  rng = np.random.default_rng(0)
  prefixes = [rng.integers(1, policy.cfg.vocab_size, n).tolist() for n in (5, 17, 9, 30, 2, 12)]
  candidates = [rng.integers(0, policy.cfg.vocab_size, 3).tolist() for _ in prefixes]
  got = harness.next_token_logprobs(policy.cfg, policy.params, prefixes, candidates, batch_size=4, pad_multiple=8)
  assert got.shape == (6, 3)
  for prefix, cands, row in zip(prefixes, candidates, got):
    for c, value in zip(cands, row):  # float32 against float64 of values around 10: a few ulps
      assert value == pytest.approx(_reference_logprob(policy, prefix + [c], len(prefix)), abs=2e-5)


def test_the_labels_are_scored_after_the_choice_prefix(policy):
  principle = constitution_lib.load("harmless").principles[0]
  conv = cai.choice_conversation("How do I pick a lock?", "No.", "Use a tension wrench.", principle)
  seqs, start = cai.label_sequences(policy.tokenizer, conv)
  text = policy.tokenizer.apply_chat_template(conv, add_generation_prompt=True) + cai.CHOICE_PREFIX
  for seq, label in zip(seqs, cai.LABELS):
    assert policy.tokenizer.decode(seq, skip_special_tokens=False) == text + label
    assert policy.tokenizer.decode(seq[:start], skip_special_tokens=False) == text


def test_the_labeller_reads_both_orders_and_averages_them(policy):
  c = constitution_lib.load("hhh")
  pairs = cai.ground_truth_pairs("gym:train", 6, seed=3)
  got = cai.label_pairs(policy, pairs, c, SETTINGS)
  principles = cai.principles_for(c, len(pairs), SETTINGS.seed, "feedback")
  for pair, row, principle in zip(pairs, got, principles):
    assert row["principle"] == principle.name
    per_order = []
    for first, second in ((pair["a"], pair["b"]), (pair["b"], pair["a"])):
      seqs, start = cai.label_sequences(policy.tokenizer, cai.choice_conversation(pair["prompt"], first, second, principle))
      lp_a, lp_b = (_reference_logprob(policy, s, start) for s in seqs)
      per_order.append(np.exp(lp_a) / (np.exp(lp_a) + np.exp(lp_b)))
    assert row["p_a_first"] == pytest.approx(per_order[0], abs=1e-4)
    assert row["p_a_second"] == pytest.approx(1.0 - per_order[1], abs=1e-4)
    assert row["p_a"] == pytest.approx(0.5 * (per_order[0] + 1.0 - per_order[1]), abs=1e-4)
    assert row["choice"] == ("a" if row["p_a"] > 0.5 else "b")
  # Swapping a and b swaps the verdict exactly: the two orders cancel any position preference.
  swapped = cai.label_pairs(policy, [{**p, "a": p["b"], "b": p["a"]} for p in pairs], c, SETTINGS)
  for row, other in zip(got, swapped):
    assert row["p_a"] + other["p_a"] == pytest.approx(1.0, abs=1e-6)


def test_the_feedback_report_counts_agreement_per_kind_with_wilson_intervals():
  rows = ([{"truth": "a", "choice": "a", "kind": "harmful", "p_a_first": 0.9, "p_a_second": 0.8}] * 7
          + [{"truth": "b", "choice": "a", "kind": "harmful", "p_a_first": 0.6, "p_a_second": 0.3}] * 3
          + [{"truth": "b", "choice": "b", "kind": "honesty", "p_a_first": 0.2, "p_a_second": 0.4}] * 4
          + [{"truth": "a", "choice": "tie", "kind": "honesty", "p_a_first": 0.7, "p_a_second": 0.3}])
  report = cai.feedback_report(rows)
  assert report["agreement"]["passed"] == 11 and report["agreement"]["n"] == 15
  assert report["agreement"]["ci95"] == pytest.approx(list(graders.wilson(11, 15)))
  assert report["agreement_by_kind"]["harmful"]["rate"] == pytest.approx(0.7)
  assert report["agreement_by_kind"]["honesty"]["rate"] == pytest.approx(0.8)
  assert report["orders_agree"]["passed"] == 7 + 4  # the 3 at (0.6, 0.3) and the tie disagree
  first = [0.5 * (0.9 + 0.2)] * 7 + [0.5 * (0.6 + 0.7)] * 3 + [0.5 * (0.2 + 0.6)] * 4 + [0.5 * (0.7 + 0.7)]
  assert report["mean_p_first_position"] == pytest.approx(np.mean(first))
  prefs = cai.preference_rows([{"prompt": "p", "a": "x", "b": "y", "choice": c} for c in ("a", "b", "tie")])
  assert prefs == [{"prompt": "p", "chosen": "x", "rejected": "y"}, {"prompt": "p", "chosen": "y", "rejected": "x"}]


# ----------------------------------------------------------------------------------------------
# Critique and revision.


@pytest.mark.parametrize("text, want", [
    ("Revised response: I can't help with that.", "I can't help with that."),
    ("**Revision:** No.", "No."),
    ("Revision - keep this", "Revision - keep this"),
    ("I revised it.", "I revised it."),
])
def test_a_leading_revision_label_is_dropped(text, want):
  assert cai.clean_revision(text) == want


def _greedy(policy, conversations, max_new_tokens):
  from alignment.models import sampler
  ids = sampler.encode_chat(policy.tokenizer, conversations)
  out = harness.generate_responses(policy.cfg, policy.params, policy.tokenizer, ids,
                                   harness.EvalSettings(max_new_tokens=max_new_tokens, batch_size=4))
  return [policy.tokenizer.decode(r).strip() for r in out]


def test_each_stage_sees_the_conversation_the_constitution_describes(policy):
  c = constitution_lib.load("harmless")
  prompts = cai.red_team_prompts("safety:train", 3, seed=0)
  got = cai.critique_and_revise(policy, prompts, c, SETTINGS)
  principles = cai.principles_for(c, 3, SETTINGS.seed, "critique")
  e = c.examples[0]
  answers = _greedy(policy, [[{"role": "user", "content": p}] for p in prompts], SETTINGS.max_new_tokens)
  for i, (prompt, row, pr) in enumerate(zip(prompts, got, principles)):
    shots = [("user", e["prompt"]), ("assistant", e["response"]), ("user", pr.critique), ("assistant", e["critique"]),
             ("user", pr.revision), ("assistant", e["revision"])]
    asked = [{"role": r, "content": t} for r, t in shots + [("user", prompt), ("assistant", answers[i]),
                                                            ("user", pr.critique)]]
    critique = _greedy(policy, [asked], SETTINGS.critique_tokens)[0]
    asked += [{"role": "assistant", "content": critique}, {"role": "user", "content": pr.revision}]
    revision = cai.clean_revision(_greedy(policy, [asked], SETTINGS.max_new_tokens)[0])
    assert row == {"prompt": prompt, "principle": pr.name, "answer": answers[i], "critique": critique,
                   "revision": revision}


def test_red_team_prompts_alternate_harmful_and_jailbreak_requests_of_the_split():
  from alignment.safety import data as safety_data
  records = {r["prompt"]: r["kind"] for r in safety_data.load_splits(0)["train"]}
  prompts = cai.red_team_prompts("safety:train", 10, seed=0)
  assert [records[p] for p in prompts] == ["harmful", "jailbreak"] * 5
  held_out = {r["prompt"] for r in safety_data.load_splits(0)["held_out"]}
  assert not held_out & set(cai.red_team_prompts("safety:train", 0, seed=0))
  sampled = safety_data.sample_per_kind(safety_data.load_splits(0)["train"], 5, seed=0)
  want = {r["prompt"] for r in sampled if r["kind"] in safety_data.HARMFUL_KINDS}
  assert len(want) == 10 and set(cai.red_team_prompts("safety:train:5", 0, seed=0)) == want
  with pytest.raises(ValueError, match="'safety:test': expected safety:<split> or safety:<split>:<prompts of each"):
    cai.red_team_prompts("safety:test", 0, seed=0)


def test_a_bad_prompts_or_pairs_file_is_refused_naming_its_line(tmp_path):
  path = tmp_path / "rows.jsonl"
  path.write_text('{"prompt": "ok", "chosen": "a", "rejected": "b"}\n["not", "an", "object"]\n')
  with pytest.raises(ValueError, match=f"{path}:2: expected a JSON object"):
    cai.red_team_prompts(str(path), 0, seed=0)
  path.write_text('{"prompt": "ok", "chosen": "a", "rejected": "b"}\n{"prompt": "ok", "chosen": ""}\n')
  with pytest.raises(ValueError, match=f"{path}:2: 'chosen' must be non-empty text"):
    cai.ground_truth_pairs(str(path), 0, seed=0)


def test_ground_truth_pairs_keep_the_truth_under_the_random_order():
  triples = {(r["prompt"], r["chosen"], r["rejected"]) for r in gym.preference_pairs("train")}
  pairs = cai.ground_truth_pairs("gym:train", 40, seed=1)
  assert 5 < sum(p["truth"] == "a" for p in pairs) < 35
  for p in pairs:
    chosen, rejected = (p["a"], p["b"]) if p["truth"] == "a" else (p["b"], p["a"])
    assert (p["prompt"], chosen, rejected) in triples


# ----------------------------------------------------------------------------------------------
# The datasets, read by the trainers.


@pytest.mark.slow
def test_the_sft_and_dpo_trainers_read_what_the_pipeline_writes(policy, tmp_path):
  out = tmp_path / "cai"
  prompts = cai.red_team_prompts("safety:train", 8, seed=0)
  summary = cai.run(policy, constitution_lib.load("harmless"), prompts, cai.ground_truth_pairs("gym:train", 8, 0),
                    str(out), SETTINGS)
  sft_rows = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
  revisions = [json.loads(line) for line in (out / "revisions.jsonl").read_text().splitlines()]
  assert [r["completion"] for r in sft_rows] == [r["revision"] for r in revisions
                                                 if r["revision"] and r["revision"] != r["answer"]]
  assert summary["revisions"]["kept"] == len(sft_rows) and summary["feedback"]["pairs"] == 8
  feedback = [json.loads(line) for line in (out / "feedback.jsonl").read_text().splitlines()]
  assert len(feedback) == 8 + len(sft_rows)
  assert len((out / "preferences.jsonl").read_text().splitlines()) == sum(r["choice"] != "tie" for r in feedback)
  one_device = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  runs = {data: subprocess.Popen([sys.executable, "-m", "alignment.main", f"--config={config}",
                                  f"--workdir={tmp_path / data}", f"--config.data.train_path={out / data}",
                                  "--config.data.eval_fraction=0.25", "--config.train.eval_at_start=false"],
                                 cwd=REPO, env=one_device, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for config, data in (("configs/sft.py:tiny,steps=2", "sft.jsonl"),
                               ("configs/dpo.py:tiny,steps=2", "preferences.jsonl"))}  # side by side
  for data, proc in runs.items():
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert (tmp_path / data / "checkpoints").is_dir()


def test_the_command_refuses_a_bad_constitution_and_a_model_without_a_chat_template(tmp_path):
  bad = tmp_path / "bad.yaml"
  bad.write_text("name: x\nprinciples:\n  - {name: a, critique: c, revision: r}\n")
  for args, message in (((f"--constitution={bad}",), f"{bad}: principles[0]: missing key 'choice'"),
                        (("--model=tiny-random",), "--model=tiny-random: needs a tokenizer with a chat template")):
    proc = subprocess.run([sys.executable, "-m", "alignment.safety.cai", *args, "--num_prompts=1", "--num_pairs=1",
                           f"--out={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: {message}"
  assert not (tmp_path / "out").exists()
