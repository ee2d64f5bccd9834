"""Constitutional AI (Bai et al. 2022): a model critiques and revises its own answers, and labels which of
two answers is better, under principles read from a constitution file (`alignment.safety.constitution`).

  python -m alignment.safety.cai --model=smollm2-135m-instruct --constitution=harmless \\
      --prompts=safety:train --num_prompts=64 --pairs=gym:train --num_pairs=200 --out=workdirs/cai

(a) Critique and revision. The model answers each prompt, is asked to critique its answer against a
    principle drawn at random, then to revise it (the constitution's worked examples come first in the
    conversation). The revisions are an SFT dataset: `OUT/sft.jsonl`, {prompt, completion} rows that
    `configs/sft.py` reads (`--config.data.train_path=OUT/sft.jsonl`) into its TFDS builder.
(b) AI feedback. For a prompt and two responses the model is asked the principle's `choice` question and
    its answer is read from the log-probabilities of the labels: p(A) against p(B) after "The better
    response is (". Each pair is asked in both orders and the two probabilities averaged, which cancels
    a preference for the first (or second) position. The choices are a preference dataset:
    `OUT/preferences.jsonl`, {prompt, chosen, rejected} rows for `configs/dpo.py` and `configs/rm.py`.
    The labelled pairs are the gym's train pairs (`--pairs=gym:train`), whose ground-truth preference
    gives the labeller's agreement with a 95% interval, and each prompt's (answer, revision) pair.

Also written: `OUT/revisions.jsonl` (prompt, principle, answer, critique, revision), `OUT/feedback.jsonl`
(each labelled pair with its per-order probabilities) and `OUT/summary.json` (the figures printed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import time
from collections.abc import Mapping, Sequence

import numpy as np

from alignment.data.sft import read_jsonl, write_jsonl
from alignment.evals import graders
from alignment.evals import harness
from alignment.safety.constitution import Constitution, Principle

CHOICE_PREFIX = "The better response is ("
LABELS = ("A", "B")
_REVISION_LABEL = re.compile(r"^\s*\**\s*(?:revised (?:response|answer)|revision|rewritten (?:response|answer))"
                             r"\s*\**\s*:\s*\**\s*", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Settings:
  max_new_tokens: int = 128   # the answer and the revision
  critique_tokens: int = 96
  batch_size: int = 16
  seed: int = 0               # draws the principle of each prompt and pair, and the pairs sampled


def _generate(policy, conversations: Sequence[list], max_new_tokens: int, settings: Settings) -> list[str]:
  """Greedy answers to conversations (lists of messages ending before the assistant's turn)."""
  return harness.answers(policy, conversations, harness.EvalSettings(
      max_new_tokens=max_new_tokens, batch_size=settings.batch_size, seed=settings.seed))


def clean_revision(text: str) -> str:
  """The revision without a leading 'Revised response:' style label the model may add."""
  return _REVISION_LABEL.sub("", text, count=1).strip()


def principles_for(constitution: Constitution, count: int, seed: int, stream: str) -> list[Principle]:
  """`count` principles drawn with replacement; the same for the same (seed, stream)."""
  rng = random.Random(f"{seed}/{stream}")
  return [rng.choice(constitution.principles) for _ in range(count)]


def critique_and_revise(policy, prompts: Sequence[str], constitution: Constitution, settings: Settings) -> list[dict]:
  """Per prompt: {prompt, principle, answer, critique, revision}. The answer is the model's own to the
  plain prompt; the critique and the revision are asked after the constitution's worked examples."""
  principles = principles_for(constitution, len(prompts), settings.seed, "critique")
  answers = _generate(policy, [[{"role": "user", "content": p}] for p in prompts], settings.max_new_tokens, settings)
  asked = [constitution.few_shot(pr) + [{"role": "user", "content": p}, {"role": "assistant", "content": a},
                                         {"role": "user", "content": pr.critique}]
           for p, a, pr in zip(prompts, answers, principles)]
  critiques = _generate(policy, asked, settings.critique_tokens, settings)
  asked = [c + [{"role": "assistant", "content": crit}, {"role": "user", "content": pr.revision}]
           for c, crit, pr in zip(asked, critiques, principles)]
  revisions = [clean_revision(r) for r in _generate(policy, asked, settings.max_new_tokens, settings)]
  return [{"prompt": p, "principle": pr.name, "answer": a, "critique": c, "revision": r}
          for p, pr, a, c, r in zip(prompts, principles, answers, critiques, revisions)]


def choice_conversation(prompt: str, first: str, second: str, principle: Principle) -> list[dict]:
  text = (f"Consider this request to an AI assistant:\n\n{prompt}\n\n{principle.choice}\n\n"
          f"(A) {first}\n\n(B) {second}\n\nAnswer with A or B.")
  return [{"role": "user", "content": text}]


def label_sequences(tokenizer, conversation: list[dict]) -> tuple[list[list[int]], int]:
  """The token ids of the conversation, the assistant's turn opened with CHOICE_PREFIX and then each label,
  and where they start to differ: the one token after that point is each label's (a label the tokenizer
  merges with the end of the prefix is still read whole), so one forward of the shared part reads both."""
  text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True) + CHOICE_PREFIX
  seqs = [tokenizer.encode(text + label, add_special_tokens=False).ids for label in LABELS]
  start = 0
  while start < min(map(len, seqs)) and seqs[0][start] == seqs[1][start]:
    start += 1
  if start == 0 or any(len(s) != start + 1 for s in seqs):
    raise ValueError(f"labels {LABELS} do not tokenize to one distinct token each after the prompt")
  return seqs, start


def label_pairs(policy, pairs: Sequence[Mapping], constitution: Constitution, settings: Settings) -> list[dict]:
  """AI feedback on {prompt, a, b} pairs. Per pair: the principle asked, `p_a_first` = p(A) / (p(A) + p(B))
  with a shown first, `p_a_second` = the same for a with a shown second, `p_a` (their mean: the
  position-debiased probability that a is better) and `choice` ('a', 'b' or 'tie' at exactly 0.5)."""
  principles = principles_for(constitution, len(pairs), settings.seed, "feedback")
  sequences, starts = [], []
  for pair, principle in zip(pairs, principles):
    for first, second in ((pair["a"], pair["b"]), (pair["b"], pair["a"])):
      seqs, start = label_sequences(policy.tokenizer, choice_conversation(pair["prompt"], first, second, principle))
      sequences += seqs
      starts += [start, start]
  prefixes = [q[:s] for q, s in zip(sequences[::2], starts[::2])]
  candidates = [[a[-1], b[-1]] for a, b in zip(sequences[::2], sequences[1::2])]
  sums = harness.next_token_logprobs(policy.cfg, policy.params, prefixes, candidates,
                                     batch_size=settings.batch_size).astype(np.float64)
  sums = sums.reshape(len(pairs), 2, 2)  # [pair, order, label]
  # p(label A) among the two labels, per order.
  p_first_label = 1.0 / (1.0 + np.exp(sums[:, :, 1] - sums[:, :, 0]))
  out = []
  for pair, principle, (p_a_first, b_first) in zip(pairs, principles, p_first_label):
    p_a_second = 1.0 - b_first   # a is label B in the second order
    p_a = 0.5 * (p_a_first + p_a_second)
    choice = "a" if p_a > 0.5 else "b" if p_a < 0.5 else "tie"
    out.append({**pair, "principle": principle.name, "p_a_first": float(p_a_first),
                "p_a_second": float(p_a_second), "p_a": float(p_a), "choice": choice})
  return out


def preference_rows(labelled: Sequence[Mapping]) -> list[dict]:
  """The labelled pairs as {prompt, chosen, rejected} rows (ties dropped)."""
  return [{"prompt": r["prompt"], "chosen": r[r["choice"]], "rejected": r["b" if r["choice"] == "a" else "a"]}
          for r in labelled if r["choice"] != "tie"]


def feedback_report(labelled: Sequence[Mapping]) -> dict:
  """Agreement with the pairs' ground truth (pairs with a `truth` of 'a' or 'b'; a tie counts as a
  miss), overall and per kind, with 95% Wilson intervals; how often the two orders agree, and how often
  the first position is picked (0.5 = no position bias)."""
  judged = [r for r in labelled if r.get("truth") in ("a", "b")]
  kinds = sorted({r.get("kind", "") for r in judged})
  first = [0.5 * (r["p_a_first"] + (1.0 - r["p_a_second"])) for r in labelled]
  return {
      "pairs": len(labelled),
      "agreement": graders.rate(r["choice"] == r["truth"] for r in judged),
      "agreement_by_kind": {k: graders.rate(r["choice"] == r["truth"] for r in judged
                                                  if r.get("kind", "") == k) for k in kinds},
      "orders_agree": graders.rate((r["p_a_first"] > 0.5) == (r["p_a_second"] > 0.5) for r in labelled),
      "mean_p_first_position": float(np.mean(first)) if first else None,
  }


# ----------------------------------------------------------------------------------------------
# Inputs.


def _read_jsonl_rows(path: str, keys: tuple) -> list[dict]:
  """The rows of a JSONL file, each an object with non-empty text at `keys` (ValueError naming file:line)."""
  rows = []
  for where, row in read_jsonl(path):
    if not isinstance(row, dict):
      raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in keys:
      if not isinstance(row.get(key), str) or not row[key].strip():
        raise ValueError(f"{where}: {key!r} must be non-empty text")
    rows.append(row)
  return rows


def red_team_prompts(source: str, count: int, seed: int) -> list[str]:
  """`count` prompts (all when 0): the harmful and jailbreak requests of `safety:<split>` (or of its seeded
  sample `safety:<split>:<N of each kind>`), alternating the two kinds, or a JSONL file's `prompt` fields,
  in a seeded order."""
  if source.startswith("safety:"):
    from alignment.safety import data as safety_data
    split, per_kind = safety_data.parse_source(source)
    records = safety_data.sample_per_kind(safety_data.load_splits(seed)[split], per_kind, seed)
    by_kind = [[r["prompt"] for r in records if r["kind"] == kind] for kind in safety_data.HARMFUL_KINDS]
    for i, prompts in enumerate(by_kind):
      random.Random(f"{seed}/prompts/{i}").shuffle(prompts)
    prompts = [p for pair in zip(*by_kind) for p in pair] + [p for kind in by_kind for p in kind[min(map(len, by_kind)):]]
  else:
    prompts = [r["prompt"] for r in _read_jsonl_rows(source, ("prompt",))]
    random.Random(f"{seed}/prompts").shuffle(prompts)
  return prompts[:count] if count else prompts


def ground_truth_pairs(source: str, count: int, seed: int) -> list[dict]:
  """`count` pairs (all when 0) as {prompt, a, b, truth, kind}: the gym's train pairs (`gym:train`) or a
  JSONL file of {prompt, chosen, rejected}; which of chosen and rejected is `a` is drawn at random."""
  if source == "gym:train":
    from alignment.evals import gym
    rows = gym.preference_pairs("train")
  else:
    rows = _read_jsonl_rows(source, ("prompt", "chosen", "rejected"))
  rng = random.Random(f"{seed}/pairs")
  rows = rng.sample(rows, count) if count and count < len(rows) else list(rows)
  out = []
  for row in rows:
    swap = rng.random() < 0.5
    a, b = (row["rejected"], row["chosen"]) if swap else (row["chosen"], row["rejected"])
    out.append({"prompt": row["prompt"], "a": a, "b": b, "truth": "b" if swap else "a", "kind": row.get("kind", "")})
  return out


def run(policy, constitution: Constitution, prompts: Sequence[str], pairs: Sequence[Mapping], out_dir: str,
        settings: Settings) -> dict:
  """(a) then (b) as the module docstring says; writes OUT's files and returns the summary."""
  os.makedirs(out_dir, exist_ok=True)
  times, summary = {}, {"constitution": constitution.name, "settings": dataclasses.asdict(settings)}
  start = time.time()
  revisions = critique_and_revise(policy, prompts, constitution, settings) if prompts else []
  times["critique_revise_s"] = time.time() - start
  kept = [r for r in revisions if r["revision"] and r["revision"] != r["answer"]]
  summary["revisions"] = {
      "prompts": len(revisions), "kept": len(kept),
      "answer_refused": graders.rate(graders.is_refusal(r["answer"]) for r in revisions),
      "revision_refused": graders.rate(graders.is_refusal(r["revision"]) for r in kept)}
  start = time.time()
  own = [{"prompt": r["prompt"], "a": r["revision"], "b": r["answer"], "kind": "revision"} for r in kept]
  labelled = label_pairs(policy, list(pairs) + own, constitution, settings) if pairs or own else []
  times["feedback_s"] = time.time() - start
  summary["feedback"] = feedback_report(labelled[:len(pairs)])
  summary["revision_preferred"] = graders.rate(r["choice"] == "a" for r in labelled[len(pairs):])
  summary["time"] = times
  write_jsonl(os.path.join(out_dir, "revisions.jsonl"), revisions)
  write_jsonl(os.path.join(out_dir, "sft.jsonl"), [{"prompt": r["prompt"], "completion": r["revision"]} for r in kept])
  write_jsonl(os.path.join(out_dir, "feedback.jsonl"), labelled)
  write_jsonl(os.path.join(out_dir, "preferences.jsonl"), preference_rows(labelled))
  with open(os.path.join(out_dir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
  return summary


def format_summary(summary: Mapping) -> str:
  def pct(r):
    return "n/a" if r["rate"] is None else f"{100 * r['rate']:.1f}% [{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}] (n={r['n']})"
  rev, fb = summary["revisions"], summary["feedback"]
  lines = [f"constitution {summary['constitution']}",
           f"critique and revision: {rev['prompts']} prompts, {rev['kept']} revisions kept "
           f"({summary['time']['critique_revise_s']:.0f}s)",
           f"  answers refused   {pct(rev['answer_refused'])}",
           f"  revisions refused {pct(rev['revision_refused'])}",
           f"  labeller prefers the revision {pct(summary['revision_preferred'])}",
           f"AI feedback: {fb['pairs']} pairs with ground truth ({summary['time']['feedback_s']:.0f}s, both orders)",
           f"  agreement         {pct(fb['agreement'])}"]
  lines += [f"    {kind:<14}  {pct(r)}" for kind, r in fb["agreement_by_kind"].items()]
  if fb["pairs"]:
    lines += [f"  orders agree      {pct(fb['orders_agree'])}",
              f"  first position picked with mean probability {fb['mean_p_first_position']:.3f}"]
  return "\n".join(lines)


def main(argv):
  from alignment import console
  try:
    _main(argv)
  except (ValueError, OSError) as e:
    console.fail(str(e))


def _main(argv):
  import sys
  from absl import flags
  from alignment.safety import constitution as constitution_lib
  from alignment.train.model import check_model_source, load_policy
  F = flags.FLAGS
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}")
  if not F.out:
    raise ValueError("--out is required: the folder the datasets are written to")
  check_model_source(F.model)
  constitution = constitution_lib.load(F.constitution)
  prompts = red_team_prompts(F.prompts, F.num_prompts, F.seed) if F.prompts else []
  pairs = ground_truth_pairs(F.pairs, F.num_pairs, F.seed) if F.pairs else []
  if not prompts and not pairs:
    raise ValueError("nothing to do: give --prompts and/or --pairs")
  policy = load_policy(F.model, dtype=F.dtype)
  if policy.tokenizer is None or getattr(policy.tokenizer, "chat_template", None) is None:
    raise ValueError(f"--model={F.model}: needs a tokenizer with a chat template")
  settings = Settings(max_new_tokens=F.max_new_tokens, critique_tokens=F.critique_tokens, batch_size=F.batch_size,
                      seed=F.seed)
  summary = run(policy, constitution, prompts, pairs, F.out, settings)
  print(format_summary(summary))
  print(f"wrote {F.out}/sft.jsonl and {F.out}/preferences.jsonl", file=sys.stderr)


def _define_flags():
  from absl import flags
  flags.DEFINE_string("model", "smollm2-135m-instruct", "the model that answers, critiques, revises and labels")
  flags.DEFINE_string("constitution", "harmless", "a bundled constitution's name or a YAML file")
  flags.DEFINE_string("prompts", "safety:train", "red-team prompts: safety:<split>, safety:<split>:<N of "
                      "each kind> or a JSONL file of {prompt}")
  flags.DEFINE_integer("num_prompts", 64, "prompts to critique and revise (0 = all)")
  flags.DEFINE_string("pairs", "gym:train", "pairs to label: gym:train or a JSONL of {prompt, chosen, rejected}; "
                      "'' for none")
  flags.DEFINE_integer("num_pairs", 200, "pairs to label (0 = all)")
  flags.DEFINE_string("out", "", "output folder")
  flags.DEFINE_integer("max_new_tokens", 128, "tokens per answer and revision")
  flags.DEFINE_integer("critique_tokens", 96, "tokens per critique")
  flags.DEFINE_integer("batch_size", 16, "rows per sampler batch")
  flags.DEFINE_integer("seed", 0, "draws principles and pairs")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "param and compute dtype")


if __name__ == "__main__":
  from alignment import console
  _define_flags()
  console.run(main)
