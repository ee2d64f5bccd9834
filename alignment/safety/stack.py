"""The stack demo: a model made safer by every layer the library has, measured before and after on
held-out prompts, with and without the Guard.

  python -m alignment.safety.stack --workdir=workdirs/demo          # what `make demo` runs
  python -m alignment.evaluate --model=workdirs/demo/policy --guard=workdirs/demo/guard

Stages, each writing under WORKDIR:
  evals/base_*     the model as loaded answers the gym's test probes and a seeded sample of the held-out
                   safety split (`--held_out_per_kind` prompts of each kind), greedily;
  redteam/         it is attacked with the safety train split's behaviours, plain and inside that split's
                   jailbreak templates (`alignment.safety.redteam`); what got through becomes refusal data;
  cai/             with --revisions=N: it critiques and revises its answers to N train-split harmful
                   requests under the `harmless` constitution (`alignment.safety.cai`);
  data/            sft.jsonl: refusals to the train split's harmful and jailbreak prompts and to the
                   successful attacks, the revisions, its own answers to the train split's benign prompts
                   (those it did not refuse: helpful answers to keep) and the gym's chosen train answers;
                   dpo.jsonl: the red-team pairs (a refusal over what got through), the gym's train pairs,
                   with --harmful_pairs=N a refusal over N of its answers to the train split's harmful and
                   jailbreak prompts (those it did not refuse; --extra_harmful_prompts=M adds M plain harmful
                   train prompts beyond train_per_kind's) and with --benign_pairs=N N of the helpful
                   answers each over a refusal (against over-refusal);
  sft/             SFT on sft.jsonl (`configs/sft.py:smollm2`, the top layers trained);
  policy/          DPO from sft/ on dpo.jsonl (`configs/dpo.py:gym`): the aligned policy;
  guard/           the safety classifier (`configs/classifier.py:safety`, reading layers 6 to 18) on a
                   per-kind sample of the train split, its threshold chosen on a sample of the calibration
                   split: the Guard (trained beside SFT and DPO);
  evals/policy_*   the aligned policy answers the same probes; the Guard's verdicts apply to both models'
                   answers (`harness.with_guard`).
Then it prints the gym table and the held-out table (base, base + Guard, aligned, aligned + Guard) and
writes them with each stage's time to WORKDIR/stack.json. No split the demo reports on trains anything:
the gym's test templates and the held-out safety split share no template, behaviour or source prompt
with what is trained on.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from alignment import console

BENIGN_KINDS = ("careful", "edgy", "over_refusal", "everyday")
# Per preset: the model, the trainers' configs and what the stack sets in all three or in one of them.
# On SmolLM2 the embedding and the bottom 20 of 30 layers stay frozen in SFT and DPO (the DPO demo's
# choice, configs/dpo.py:gym: a step is one shared trunk pass) and SFT reads rows of 512 tokens.
PRESETS = {
    "smollm2": dict(model="smollm2-135m-instruct", sft="configs/sft.py:smollm2", dpo="configs/dpo.py:gym",
                    guard="configs/classifier.py:safety",
                    policy={"model.frozen_layers": 20, "model.frozen_embeddings": True, "train.batch_size": 2},
                    sft_overrides={"data.seq_len": 512, "optim.lr": 2e-5, "optim.schedule": "constant",
                                   "optim.warmup_steps": 0},
                    # the residual stream up to layer 18 of 30: each check runs 18 layers, not 30
                    guard_overrides={"classifier.taps": "6,10,14,18"}),
    "tiny": dict(model="tiny-random", sft="configs/sft.py:tiny", dpo="configs/dpo.py:tiny",
                 guard="configs/classifier.py:tiny", policy={}, sft_overrides={}, guard_overrides={}),
}


@dataclasses.dataclass(frozen=True)
class Settings:
  """What the stack does (the flags of `python -m alignment.safety.stack` are these fields)."""
  preset: str = "smollm2"         # smollm2: the demo; tiny: tiny-random and the trainers' tiny presets
  model: str = ""                 # the model to align; empty: the preset's
  held_out_per_kind: int = 12     # held-out safety prompts of each of its 6 kinds evaluated
  train_per_kind: int = 16        # safety train prompts of each kind whose refusals / answers SFT learns
  attack_behaviours: int = 1      # train-split behaviours the red team attacks (plain and in each family)
  revisions: int = 0              # harmful train requests critiqued and revised under the constitution (0 on
                                  # a CPU: 8 cost SmolLM2 2 min 20 s, and it mostly copies the worked example)
  gym_answers: int = 64           # the gym's chosen train answers in the SFT set
  gym_pairs: int = 48             # the gym's train pairs in the DPO set beside the red-team pairs
  harmful_pairs: int = 0          # harmful train prompts in the DPO set with a refusal over its own answer
  extra_harmful_prompts: int = 0  # plain harmful train prompts beyond train_per_kind's that --harmful_pairs
                                  # also draws on (seeded sample; all of them, in split order, when this is
                                  # at least their number): DPO sees plain requests SFT did not
  benign_pairs: int = 0           # benign train prompts in the DPO set with its own answer over a refusal
  sft_steps: int = 12             # two 512-token rows each on SmolLM2
  dpo_steps: int = 12
  guard_per_kind: int = 16        # train (and calibration) prompts of each kind the classifier learns (is
                                  # calibrated) on
  guard_steps: int = 60           # full-batch steps of its head (about 0.36 s each beside SFT on 2 cores)
  max_new_tokens: int = 32        # tokens each evaluated answer may have
  seed: int = 0                   # draws every sample


def _log(message: str) -> None:
  print(f"[stack {time.strftime('%H:%M:%S')}] {message}", flush=True)


def start_training(config: str, workdir: str, overrides: Mapping[str, object]) -> tuple:
  """`python -m alignment.main` in a process of its own (its memory is returned when it ends), its output
  in WORKDIR.log; the command is printed. `finish` waits for it."""
  cmd = [sys.executable, "-m", "alignment.main", f"--config={config}", f"--workdir={workdir}"]
  cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
  _log(" ".join(cmd[1:]))
  log = open(workdir + ".log", "w", encoding="utf-8")
  return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True), log, config


def finish(run: tuple) -> None:
  """Waits for a `start_training` run; a failed one stops the demo with its last line."""
  proc, log, config = run
  proc.wait()
  log.close()
  if proc.returncode:
    lines = open(log.name, encoding="utf-8").read().strip().splitlines()
    raise RuntimeError(f"{config} failed (its output: {log.name}): {lines[-1] if lines else proc.returncode}")


def even_batch(count: int, most: int = 33) -> int:
  """The batch size that splits `count` prompts into the fewest batches of at most `most` with the least
  filler: a sampler batch is filled up with repeats of its prompts, and the longest prompts (jailbreak
  templates of several hundred tokens) share the last batch, so filler there costs most."""
  batches = -(-count // most)
  return -(-count // batches)


def evaluate(policy, suite: str, settings) -> dict:
  from alignment.evals import harness
  probes = harness.load_probes(suite)
  settings = dataclasses.replace(settings, batch_size=even_batch(len(probes), settings.batch_size))
  return harness.evaluate_probes(policy.cfg, policy.params, policy.tokenizer, probes, settings)


def answered(policy, records: Sequence[Mapping], settings) -> list[dict]:
  """The policy's greedy answers to the records' prompts, as SFT rows, where it answered (did not refuse):
  for benign prompts the helpful answers to keep, for harmful ones what DPO should turn into refusals.
  Batched as `evaluate` batches (`even_batch`, at most settings.batch_size a batch)."""
  from alignment.evals import graders, harness
  prompts = [r["prompt"] for r in records]
  batch_size = even_batch(len(prompts), settings.batch_size)
  answers = harness.answers(policy, prompts, dataclasses.replace(settings, batch_size=batch_size))
  return [{"prompt": p, "completion": a} for p, a in zip(prompts, answers) if a and not graders.is_refusal(a)]


def extra_harmful(train_split, train_records, count: int, seed: int) -> list[dict]:
  """`count` plain harmful prompts of `train_split` that are not in `train_records`: all of them, in split order,
  when there are no more than `count`, else a seeded sample."""
  taken = {r["prompt"] for r in train_records}
  more = [r for r in train_split if r["kind"] == "harmful" and r["prompt"] not in taken]
  if count >= len(more):
    return more
  return random.Random(f"{seed}/stack/extra_harmful").sample(more, count)


def sft_rows(train_records, attack_rows, revision_rows, helpful_rows, gym_answers: int, seed: int) -> list[dict]:
  """The SFT set: refusals to harmful and jailbreak train prompts (drawn from the red team's refusal pool),
  the red team's refusals to its successful attacks, the revisions, the helpful answers and `gym_answers`
  of the gym's chosen train answers, shuffled."""
  from alignment.evals import gym
  from alignment.safety import data as safety_data, redteam
  rng = random.Random(f"{seed}/stack/sft")
  pool = redteam.refusal_pool()
  rows = [{"prompt": r["prompt"], "completion": rng.choice(pool)} for r in train_records
          if r["kind"] in safety_data.HARMFUL_KINDS]
  rows += list(attack_rows) + list(revision_rows) + list(helpful_rows)
  pairs = gym.preference_pairs("train")
  rows += [{"prompt": p["prompt"], "completion": p["chosen"]} for p in rng.sample(pairs, min(gym_answers, len(pairs)))]
  rng.shuffle(rows)
  return rows


def dpo_rows(red_team_pairs, helpful_rows, complied_rows, benign_pairs: int, harmful_pairs: int,
             seed: int) -> list[dict]:
  """The DPO set: the red team's pairs (a refusal over what got through, and the gym's pairs), then
  `harmful_pairs` of the answers to harmful prompts each rejected for a refusal, and `benign_pairs` of the
  helpful answers each chosen over a refusal (seeded samples; the refusals come from the pool the SFT
  refusals come from, so the same strings are right for one kind of prompt and wrong for the other).
  Shuffled when any were added."""
  from alignment.safety import redteam
  if not benign_pairs and not harmful_pairs:
    return list(red_team_pairs)
  rng = random.Random(f"{seed}/stack/dpo")
  pool = redteam.refusal_pool()
  sample = lambda rows, n: rng.sample(list(rows), min(n, len(rows)))
  rows = list(red_team_pairs)
  rows += [{"prompt": h["prompt"], "chosen": rng.choice(pool), "rejected": h["completion"]}
           for h in sample(complied_rows, harmful_pairs)]
  rows += [{"prompt": h["prompt"], "chosen": h["completion"], "rejected": rng.choice(pool)}
           for h in sample(helpful_rows, benign_pairs)]
  rng.shuffle(rows)
  return rows


def held_out_rows(report: Mapping) -> list[tuple[str, int, float, tuple]]:
  """(label, n, pass rate, 95% interval) per source kind of a safety-suite report (harmful and jailbreak
  pass when refused, the benign kinds when answered), then the two totals."""
  from alignment.evals import graders
  from alignment.safety import data as safety_data
  by_kind = {}
  for r in report["results"]:
    by_kind.setdefault(r["template_id"][len("safety/"):], []).append(bool(r["passed"]))
  rows = []
  for kind in safety_data.KINDS:
    if kind in by_kind:
      rate = graders.rate(by_kind[kind])
      verb = "refused" if kind in safety_data.HARMFUL_KINDS else "answered"
      rows.append((f"{kind} ({verb})", rate["n"], rate["rate"], rate["ci95"]))
  for label, kinds in (("harmful + jailbreak refused", safety_data.HARMFUL_KINDS), ("benign answered", BENIGN_KINDS)):
    rate = graders.rate([p for k in kinds for p in by_kind.get(k, [])])
    rows.append((label, rate["n"], rate["rate"], rate["ci95"]))
  return rows


def format_columns(rows_by_column: Sequence[list], names: Sequence[str]) -> str:
  """Rows of (label, n, value, ci) per column, side by side (labels from the first column)."""
  lines = [f"{'':32s} {'n':>4s}" + "".join(f"  {n:>14s}" for n in names)]
  for i, (label, n, _, _) in enumerate(rows_by_column[0]):
    cells = []
    for rows in rows_by_column:
      value = rows[i][2]
      cells.append(f"{'-':>14s}" if value is None else
                   f"{value:14.2f}" if label.startswith("mean response") else f"{100 * value:13.1f}%")
    lines.append(f"{label:32s} {str(n):>4s}" + "".join(f"  {c}" for c in cells))
  return "\n".join(lines)


def gym_rows(report: Mapping) -> list[tuple[str, str, object, object]]:
  from alignment.evals import harness
  return [row for row in harness.report_rows(report) if not row[0].startswith(("guard:", "KL to"))]


def main(argv):
  from absl import flags
  F = flags.FLAGS
  if len(argv) > 1:
    console.fail(f"unexpected arguments {argv[1:]}")
  if not F.workdir:
    console.fail("--workdir is required")
  settings = Settings(**{f.name: getattr(F, f.name) for f in dataclasses.fields(Settings)})
  try:
    summary = run_stack(os.path.abspath(F.workdir), settings)
  except (ValueError, OSError, RuntimeError) as e:
    console.fail(str(e))
  print(summary["tables"])


def run_stack(workdir: str, o: Settings) -> dict:
  """Every stage (module docstring) in `workdir`; returns the summary it writes to WORKDIR/stack.json."""
  from alignment.evals import gym, harness
  from alignment.safety import cai, constitution, data as safety_data, redteam
  from alignment.safety.guard import Guard
  from alignment.train.model import check_model_source, load_policy
  from alignment.data.sft import write_jsonl
  preset = PRESETS[o.preset]
  model = o.model or preset["model"]
  check_model_source(model)
  os.makedirs(os.path.join(workdir, "data"), exist_ok=True)
  times, start = {}, time.time()

  def lap(name):
    nonlocal start
    times[name] = round(time.time() - start, 1)
    start = time.time()
    _log(f"{name}: {times[name]} s")

  read = lambda path: [json.loads(line) for line in open(path, encoding="utf-8")]
  settings = harness.EvalSettings(max_new_tokens=o.max_new_tokens, batch_size=33, seed=o.seed)  # at most: 164 gym probes in 5
  suites = {"gym": "gym:test", "held_out": f"safety:held_out:{o.held_out_per_kind}"}
  base = load_policy(model)
  reports = {}
  for name, suite in suites.items():
    reports[f"base_{name}"] = evaluate(base, suite, settings)
    harness.write_report(reports[f"base_{name}"], os.path.join(workdir, "evals", f"base_{name}.json"))
  lap("evaluate the base model")

  families = redteam.behaviours_and_templates("train", 1, o.seed)[1]
  attacks = o.attack_behaviours * (1 + len(families))  # each behaviour plain and in each template family
  attack = redteam.run(base, None, "train", os.path.join(workdir, "redteam"),
                       redteam.Settings(max_new_tokens=o.max_new_tokens, batch_size=even_batch(attacks), seed=o.seed),
                       num_behaviours=o.attack_behaviours, mix_gym_pairs=o.gym_pairs)
  lap("red-team the base model")
  revisions = []
  if o.revisions:
    cai.run(base, constitution.load("harmless"), cai.red_team_prompts("safety:train", o.revisions, o.seed), [],
            os.path.join(workdir, "cai"), cai.Settings(max_new_tokens=o.max_new_tokens,
                                                        critique_tokens=o.max_new_tokens, seed=o.seed))
    revisions = read(os.path.join(workdir, "cai", "sft.jsonl"))
    lap("critique and revise")
  train_split = safety_data.load_splits(o.seed)["train"]
  train_records = safety_data.sample_per_kind(train_split, o.train_per_kind, o.seed)
  benign = [r for r in train_records if r["kind"] in BENIGN_KINDS]
  helpful = answered(base, benign, settings)
  harmful = [r for r in train_records if r["kind"] in safety_data.HARMFUL_KINDS]
  more_harmful = extra_harmful(train_split, train_records, o.extra_harmful_prompts, o.seed)
  complied = answered(base, harmful + more_harmful, settings) if o.harmful_pairs else []
  del base
  sft = sft_rows(train_records, read(os.path.join(workdir, "redteam", "sft.jsonl")),
                 revisions, helpful, o.gym_answers, o.seed)
  write_jsonl(os.path.join(workdir, "data", "sft.jsonl"), sft)
  dpo = dpo_rows(read(os.path.join(workdir, "redteam", "dpo.jsonl")), helpful, complied, o.benign_pairs,
                 o.harmful_pairs, o.seed)
  write_jsonl(os.path.join(workdir, "data", "dpo.jsonl"), dpo)
  lap("its own answers and the data sets")

  once = {"train.eval_every": 0, "train.ckpt_every": 0, "train.ckpt_every_s": 0,
          "data.data_dir": os.path.join(workdir, "tfds")}
  # The Guard's classifier trains beside SFT and DPO: it needs nothing of theirs, and two processes
  # keep both cores busier than one (the trainers' data preparation and start-up run on one core).
  guard_run = start_training(preset["guard"], os.path.join(workdir, "guard"), {
      **once, **preset["guard_overrides"], "data.train_path": f"safety:train:{o.guard_per_kind}",
      "data.eval_path": f"safety:calibration:{o.guard_per_kind}",
      "classifier.cache_dir": os.path.join(workdir, "features"), "train.steps": o.guard_steps, "seed": o.seed,
      "data.seed": o.seed})
  finish(start_training(preset["sft"], os.path.join(workdir, "sft"), {
      **once, **preset["policy"], **preset["sft_overrides"], "model.name": model,
      "data.train_path": os.path.join(workdir, "data", "sft.jsonl"), "data.eval_fraction": 0.0,
      "train.steps": o.sft_steps}))
  lap("SFT (the Guard's classifier beside it)")
  finish(start_training(preset["dpo"], os.path.join(workdir, "policy"), {
      **once, **preset["policy"], "model.name": os.path.join(workdir, "sft"),
      "data.train_path": os.path.join(workdir, "data", "dpo.jsonl"), "data.eval_fraction": 0.0,
      "train.steps": o.dpo_steps, "train.eval_at_start": False, "evals.every": 0}))
  finish(guard_run)
  lap("DPO (and the Guard's classifier)")

  policy = load_policy(os.path.join(workdir, "policy"))
  for name, suite in suites.items():
    reports[f"policy_{name}"] = evaluate(policy, suite, settings)
    harness.write_report(reports[f"policy_{name}"], os.path.join(workdir, "evals", f"policy_{name}.json"))
  lap("evaluate the aligned policy")
  guard = Guard(os.path.join(workdir, "guard"))
  for name in suites:  # both models saw the same prompts: one input check serves both
    prompt_scores = guard.check_prompts([gym.probe_text(r) for r in reports[f"base_{name}"]["results"]])
    for model in ("base", "policy"):
      guarded = harness.with_guard(reports[f"{model}_{name}"], guard, policy.tokenizer, prompt_scores)
      reports[f"{model}_guard_{name}"] = guarded
      harness.write_report(guarded, os.path.join(workdir, "evals", f"{model}_guard_{name}.json"))
  lap("the Guard's checks on both models' answers")

  names = ("base", "base + Guard", "aligned", "aligned + Guard")
  order = ("base", "base_guard", "policy", "policy_guard")
  gym_table = format_columns([gym_rows(reports[f"{m}_gym"]) for m in order], names)
  held_out_table = format_columns([held_out_rows(reports[f"{m}_held_out"]) for m in order], names)
  total = round(sum(times.values()), 1)
  tables = (f"The gym's test probes ({reports['base_gym']['num_probes']}; pass rates):\n{gym_table}\n\n"
            f"Held-out real-world safety prompts ({reports['base_held_out']['num_probes']}, "
            f"{o.held_out_per_kind} of each kind):\n{held_out_table}\n\n"
            f"red team on the base model (train split): attack success {100 * attack['overall']['asr']['rate']:.1f}% "
            f"of {attack['attacks']}; SFT rows {len(sft)}, DPO pairs {len(dpo)}; Guard threshold {guard.threshold:.3f}\n"
            f"{total:.0f} s in all: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + "\n"
            f"the aligned policy: {os.path.join(workdir, 'policy')}; the Guard: {os.path.join(workdir, 'guard')}")
  summary = {"times_s": times, "total_s": total, "sft_rows": len(sft), "dpo_pairs": len(dpo),
             "red_team": attack, "revisions": len(revisions), "guard_threshold": guard.threshold,
             "reports": {k: {"summary": v["summary"], **({"guard": v["guard"]} if "guard" in v else {})}
                         for k, v in reports.items()},
             "tables": tables}
  with open(os.path.join(workdir, "stack.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=1)
  return summary


def _define_flags():
  from absl import flags
  defaults = Settings()
  flags.DEFINE_string("workdir", None, "where every stage writes (a new folder)")
  flags.DEFINE_enum("preset", defaults.preset, list(PRESETS), "smollm2: the demo; tiny: tiny-random and the "
                    "trainers' tiny presets (the test of the plumbing)")
  flags.DEFINE_string("model", defaults.model, "the model to align (a name, .gguf file or HF directory); "
                      "empty: the preset's")
  for field in dataclasses.fields(Settings):
    if field.type == "int":
      flags.DEFINE_integer(field.name, getattr(defaults, field.name), f"Settings.{field.name} (alignment/safety/stack.py)")


if __name__ == "__main__":
  _define_flags()
  console.run(main)
