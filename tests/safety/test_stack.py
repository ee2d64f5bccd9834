"""The stack demo (`python -m alignment.safety.stack`): its tables count what the reports hold, its SFT set
holds what it says, and on the tiny preset every stage runs and leaves a policy and a Guard that
`alignment.evaluate` reads back to the same numbers."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from alignment.evals import gym
from alignment.safety import data as safety_data, redteam, stack

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_held_out_table_counts_refusals_and_answers_per_source_kind():
  rng = np.random.default_rng(0)
  results = [{"template_id": f"safety/{kind}", "passed": bool(rng.random() < 0.6)}
             for kind in safety_data.KINDS for _ in range(int(rng.integers(1, 9)))]
  rows = {label: (n, rate) for label, n, rate, _ in stack.held_out_rows({"results": results})}
  for kind in safety_data.KINDS:
    mine = [r["passed"] for r in results if r["template_id"] == f"safety/{kind}"]
    verb = "refused" if kind in ("harmful", "jailbreak") else "answered"
    assert rows[f"{kind} ({verb})"] == (len(mine), pytest.approx(sum(mine) / len(mine)))
  harmful = [r["passed"] for r in results if r["template_id"] in ("safety/harmful", "safety/jailbreak")]
  benign = [r["passed"] for r in results if r["template_id"] not in ("safety/harmful", "safety/jailbreak")]
  assert rows["harmful + jailbreak refused"] == (len(harmful), pytest.approx(np.mean(harmful)))
  assert rows["benign answered"] == (len(benign), pytest.approx(np.mean(benign)))


@pytest.mark.parametrize("count, most, want", [(164, 33, 33), (72, 33, 24), (8, 33, 8), (64, 33, 32), (34, 33, 17),
                                                (33, 33, 33), (1, 33, 1)])
def test_even_batches_hold_every_prompt_in_the_fewest_batches_with_the_least_filler(count, most, want):
  batch = stack.even_batch(count, most)
  assert batch == want
  batches = -(-count // batch)
  assert batches == -(-count // most) and batch <= most and batches * batch - count < batches


def test_the_sft_set_refuses_the_harmful_train_prompts_and_keeps_every_other_row():
  records = safety_data.sample_per_kind(safety_data.load_splits(0)["train"], 3, seed=0)
  attacks = [{"prompt": "attack", "completion": "no"}]
  revisions = [{"prompt": "revised", "completion": "a revision"}]
  helpful = [{"prompt": "benign", "completion": "an answer"}]
  rows = stack.sft_rows(records, attacks, revisions, helpful, gym_answers=5, seed=0)
  pool, chosen = set(redteam.refusal_pool()), {p["chosen"] for p in gym.preference_pairs("train")}
  harmful = [r["prompt"] for r in records if r["kind"] in safety_data.HARMFUL_KINDS]
  by_prompt = {r["prompt"]: r["completion"] for r in rows}
  assert all(by_prompt[p] in pool for p in harmful)  # a refusal from the pool for each
  # A benign train prompt gets no refusal (only a gym chosen answer, where the gym's train pairs hold it).
  assert all(by_prompt[r["prompt"]] in chosen for r in records
             if r["kind"] not in safety_data.HARMFUL_KINDS and r["prompt"] in by_prompt)
  for extra in attacks + revisions + helpful:
    assert extra in rows
  gym_rows = [r for r in rows if r["prompt"] not in set(harmful) | {"attack", "revised", "benign"}]
  assert len(gym_rows) == 5 and all(r["completion"] in chosen for r in gym_rows)
  assert rows == stack.sft_rows(records, attacks, revisions, helpful, gym_answers=5, seed=0)


def test_the_dpo_set_keeps_the_red_team_pairs_and_sets_refusals_against_complied_and_helpful_answers():
  red_team = [{"prompt": f"attack {i}", "chosen": "a refusal", "rejected": "compliance"} for i in range(3)]
  helpful = [{"prompt": f"benign {i}", "completion": f"answer {i}"} for i in range(10)]
  complied = [{"prompt": f"harmful {i}", "completion": f"how to {i}"} for i in range(6)]
  make = lambda benign_pairs, harmful_pairs: stack.dpo_rows(red_team, helpful, complied, benign_pairs,
                                                            harmful_pairs, seed=0)
  rows = make(4, 2)
  assert len(rows) == 9 and all(r in rows for r in red_team)
  pool = set(redteam.refusal_pool())
  benign = [r for r in rows if r["prompt"].startswith("benign")]
  answers = {h["prompt"]: h["completion"] for h in helpful}
  assert len({r["prompt"] for r in benign}) == 4
  assert all(r["chosen"] == answers[r["prompt"]] and r["rejected"] in pool for r in benign)
  harmful = [r for r in rows if r["prompt"].startswith("harmful")]
  compliance = {h["prompt"]: h["completion"] for h in complied}
  assert len({r["prompt"] for r in harmful}) == 2
  assert all(r["rejected"] == compliance[r["prompt"]] and r["chosen"] in pool for r in harmful)
  assert rows == make(4, 2)
  assert len(make(50, 50)) == 19  # at most every helpful and every complied answer
  assert make(0, 0) == red_team  # the red team's order, as before
  assert sum(r["prompt"].startswith("harmful") for r in make(0, 3)) == 3


def test_extra_harmful_prompts_are_plain_train_requests_the_sft_sample_left_out():
  train = safety_data.load_splits(0)["train"]
  records = safety_data.sample_per_kind(train, 20, seed=0)
  taken = {r["prompt"] for r in records}
  rest = [r for r in train if r["kind"] == "harmful" and r["prompt"] not in taken]
  extra = lambda n: stack.extra_harmful(train, records, n, seed=0)
  assert extra(len(rest)) == rest  # all of them, in split order
  assert extra(10 * len(rest)) == rest
  some = extra(25)
  assert len({r["prompt"] for r in some}) == 25 and all(r in rest for r in some)
  assert some == extra(25)  # seeded
  assert extra(0) == []


@pytest.mark.slow
def test_the_tiny_stack_leaves_a_policy_and_a_guard_that_evaluate_reads_back(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  workdir = tmp_path / "demo"
  proc = subprocess.run([sys.executable, "-m", "alignment.safety.stack", "--preset=tiny", f"--workdir={workdir}",
                         "--held_out_per_kind=2", "--train_per_kind=2", "--attack_behaviours=1",
                         "--gym_answers=4", "--gym_pairs=4", "--sft_steps=3", "--dpo_steps=3", "--guard_per_kind=4",
                         "--max_new_tokens=4", "--harmful_pairs=3", "--benign_pairs=3"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads((workdir / "stack.json").read_text())
  assert "Held-out real-world safety prompts (12, 2 of each kind)" in proc.stdout
  assert summary["tables"] in proc.stdout
  policy_config = json.loads((workdir / "policy" / "config.json").read_text())
  assert policy_config["model"]["name"] == str(workdir / "sft") and policy_config["algorithm"] == "dpo"
  sft_rows = [json.loads(line) for line in open(workdir / "data" / "sft.jsonl")]
  assert len(sft_rows) == summary["sft_rows"] >= 2 * 2 + 4  # refusals to 2 harmful + 2 jailbreak, 4 gym answers
  red_team = [json.loads(line) for line in open(workdir / "redteam" / "dpo.jsonl")]
  dpo_rows = [json.loads(line) for line in open(workdir / "data" / "dpo.jsonl")]
  added = [r for r in dpo_rows if r not in red_team]
  assert len(dpo_rows) == summary["dpo_pairs"] == len(red_team) + len(added)
  pool = set(redteam.refusal_pool())  # the tiny random model refuses nothing: 3 pairs of each side
  assert sorted(r["chosen"] in pool for r in added) == [False] * 3 + [True] * 3

  out = tmp_path / "evaluated.json"
  proc = subprocess.run([sys.executable, "-m", "alignment.evaluate", f"--model={workdir / 'policy'}",
                         f"--guard={workdir / 'guard'}", "--suite=safety:held_out:2", "--max_new_tokens=4",
                         "--batch_size=33", f"--output={out}"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  evaluated = json.loads(out.read_text())
  made = json.loads((workdir / "evals" / "policy_guard_held_out.json").read_text())
  keys = ("id", "response", "passed", "guard")
  assert [[r[k] for k in keys] for r in evaluated["results"]] == [[r[k] for k in keys] for r in made["results"]]
  assert evaluated["summary"] == made["summary"] == summary["reports"]["policy_guard_held_out"]["summary"]
  table = {label: rate for label, _, rate, _ in stack.held_out_rows(made)}
  line = next(l for l in summary["tables"].splitlines() if l.startswith("benign answered"))
  assert line.split()[-1] == f"{100 * table['benign answered']:.1f}%"
