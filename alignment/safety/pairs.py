"""The safety classifier's data with prompt-response pairs: a policy's answers to a split's prompts, labelled.

    python -m alignment.safety.pairs --split=train --per_kind=32 --out=workdirs/pairs/train.jsonl
    python -m alignment.safety.pairs --split=calibration --per_kind=16 --out=workdirs/pairs/calibration.jsonl
    python -m alignment.main --config=configs/classifier.py:safety --workdir=workdirs/guard \\
        --config.data.train_path=workdirs/pairs/train.jsonl --config.data.eval_path=workdirs/pairs/calibration.jsonl

The file is the classifier's labelled JSONL (`alignment.data.labelled`): every prompt of the split alone
(1: harmful or jailbreak, 0: benign; what `safety:<split>` gives), then, for a seeded sample of
`--per_kind` prompts of each kind, the prompt with the policy's greedy answer, and each sampled harmful or
jailbreak prompt with the Guard's refusal. An answered pair is labelled 1 when the prompt is harmful or a
jailbreak and the gym's refusal grader finds no refusal in the answer; every other pair is 0. The
output check has to catch a harmful request that was answered. A refusal passes, and so does any answer
to a benign request.

Why pairs: a classifier trained on prompts alone scores a frank answer on a harmful subject ("the
warning signs of bomb threats are ...") as harmful, and with one threshold for both checks the output
check blocked 51 of the held-out benign prompts the input check had let through (README). Trained with
pairs it learns what an answer adds to its prompt. In the calibration file, each prompt alone with its
answer (the first pair of that prompt: the answer is written before the refusal) is what the two
thresholds are chosen on together (`classifier.summarize`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from alignment import console


def pair_rows(records: Sequence[Mapping], answers: Sequence[str], refusal: str) -> list[dict]:
  """Each record with its answer (module docstring), and each harmful record with `refusal` (label 0)."""
  from alignment.evals import graders
  if len(answers) != len(records):
    raise ValueError(f"pair_rows: {len(records)} records but {len(answers)} answers")
  rows = []
  for r, answer in zip(records, answers):
    harmful = r["label"] == "harmful"
    rows.append({"prompt": r["prompt"], "response": answer, "label": int(harmful and not graders.is_refusal(answer)),
                 "kind": r["kind"]})
    if harmful:
      rows.append({"prompt": r["prompt"], "response": refusal, "label": 0, "kind": r["kind"]})
  return rows


def build(policy, split: str, per_kind: int, settings, seed: int = 0) -> list[dict]:
  """The split's prompt rows followed by the pair rows of `per_kind` sampled prompts of each kind, answered
  by `policy` (`train.model.load_policy`) with `settings` (`harness.EvalSettings`)."""
  from alignment.evals import harness
  from alignment.safety import data as safety_data
  from alignment.safety.guard import REFUSAL
  records = safety_data.load_splits(seed)[split]
  sample = safety_data.sample_per_kind(records, per_kind, seed)
  answers = harness.answers(policy, [r["prompt"] for r in sample], settings)
  return safety_data.classifier_rows(records) + pair_rows(sample, answers, REFUSAL)


def main(argv) -> None:
  from absl import flags
  from alignment.data.sft import write_jsonl
  from alignment.evals import harness
  from alignment.safety import data as safety_data
  from alignment.train.model import check_model_source, load_policy
  F = flags.FLAGS
  if len(argv) > 1:
    console.fail(f"unexpected arguments {argv[1:]}")
  if F.split not in safety_data.SPLITS:
    console.fail(f"--split={F.split}: expected one of {', '.join(safety_data.SPLITS)}")
  try:
    check_model_source(F.model)
    policy = load_policy(F.model)
    rows = build(policy, F.split, F.per_kind, harness.EvalSettings(max_new_tokens=F.max_new_tokens,
                                                                     batch_size=F.batch_size, seed=F.seed), F.seed)
  except (ValueError, OSError) as e:
    console.fail(str(e))
  os.makedirs(os.path.dirname(os.path.abspath(F.out)), exist_ok=True)
  write_jsonl(F.out, rows)
  pairs = [r for r in rows if "response" in r]
  print(f"{F.out}: {len(rows) - len(pairs)} prompts alone, {len(pairs)} pairs "
        f"({sum(r['label'] for r in pairs)} harmful requests answered)")


if __name__ == "__main__":
  from absl import flags
  flags.DEFINE_string("model", "smollm2-135m-instruct", "the policy whose answers are paired with the prompts")
  flags.DEFINE_string("split", "train", "the safety split (train, calibration, held_out)")
  flags.DEFINE_integer("per_kind", 32, "prompts of each kind answered (0: all)")
  flags.DEFINE_string("out", None, "the labelled JSONL to write", required=True)
  flags.DEFINE_integer("max_new_tokens", 48, "tokens each answer may have")
  flags.DEFINE_integer("batch_size", 24, "prompts per sampler call")
  flags.DEFINE_integer("seed", 0, "the split's seed and the sample's")
  console.run(main)
