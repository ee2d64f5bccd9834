"""Evaluate a model on the alignment gym or on your own probes: generate, grade, print a table, write JSON.

  python -m alignment.evaluate --model=smollm2-135m-instruct --suite=gym:test
  python -m alignment.evaluate --model=workdirs/demo/policy --suite=gym:test --reference=smollm2-135m-instruct
  python -m alignment.evaluate --model=smollm2-135m-instruct --probes=mine.jsonl --output=mine_eval.json
  python -m alignment.evaluate --model=workdirs/demo/policy --suite=safety:held_out --guard=workdirs/demo/guard

--model and --reference take a model name, a .gguf file, an HF checkpoint directory, or a training
run's workdir (its latest checkpoint). --suite is `gym:test`, `gym:train`, or `safety:held_out` /
`safety:calibration` (real-world harmful, jailbreak and benign prompts, `alignment.safety.data`); --probes is a JSONL file
of probes, one object per line (see `alignment.evals.gym.read_probes_jsonl`; a malformed row stops the
run with file:line). With both, the suite's probes and the file's are evaluated together.

The JSON report (`alignment.evals.harness`) goes to --output (default: WORKDIR/evals/eval_<suite>.json
for a workdir, else eval_<model>.json in the current directory), with every probe's response.
"""

import os
import time

from absl import flags

from alignment import console

flags.DEFINE_string("model", "smollm2-135m-instruct", "model name, .gguf file, HF directory or workdir")
flags.DEFINE_string("suite", "gym:test", "gym:test | gym:train | '' (only --probes)")
flags.DEFINE_string("probes", "", "a JSONL file of probes")
flags.DEFINE_string("reference", "", "a model to report the KL to (same forms as --model)")
flags.DEFINE_integer("max_new_tokens", 64, "tokens generated per probe at most")
flags.DEFINE_integer("batch_size", 16, "prompts per sampler call")
flags.DEFINE_integer("limit", 0, "evaluate N probes spread over the kinds, the same N every time (0: all)")
flags.DEFINE_string("system", None, "an optional system message before every probe")
flags.DEFINE_string("output", "", "where to write the JSON report")
flags.DEFINE_string("guard", "", "a safety classifier's workdir: check each prompt before and each response after")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "param and compute dtype of a loaded model")
F = flags.FLAGS


def default_output(model: str, suite: str, probes_file: str) -> str:
  from alignment.train.model import is_workdir
  name = suite.replace(":", "_") if suite and not probes_file else os.path.splitext(os.path.basename(probes_file))[0]
  if is_workdir(model):
    return os.path.join(model, "evals", f"eval_{name}.json")
  return f"eval_{os.path.basename(model.rstrip('/')) or 'model'}_{name}.json"


def main(argv):
  if len(argv) > 1:
    console.fail(f"unexpected arguments {argv[1:]}")
  from alignment.evals import harness
  try:  # bad input stops here, before any model is loaded
    probes = harness.load_probes(F.suite, F.probes)
  except (ValueError, OSError) as e:
    console.fail(str(e))
  probes = harness.sample_probes(probes, F.limit)
  output = F.output or default_output(F.model, F.suite, F.probes)

  from alignment.train.model import check_model_source, load_policy
  try:
    check_model_source(F.model)
    if F.reference:
      check_model_source(F.reference, "--reference")
  except ValueError as e:
    console.fail(str(e))
  start = time.time()
  from alignment.safety import guard as guard_lib
  try:
    guard = guard_lib.open_flag("--guard", F.guard, batch_size=F.batch_size)
  except ValueError as e:
    console.fail(str(e))
  policy = load_policy(F.model, dtype=F.dtype)
  if policy.tokenizer is None:
    console.fail(f"--model={F.model}: the model ships no tokenizer")
  reference = load_policy(F.reference, dtype=F.dtype) if F.reference else None
  if reference is not None and reference.cfg.vocab_size != policy.cfg.vocab_size:
    console.fail(f"--reference={F.reference}: vocabulary {reference.cfg.vocab_size} != the model's {policy.cfg.vocab_size}")
  settings = harness.EvalSettings(max_new_tokens=F.max_new_tokens, batch_size=F.batch_size, system=F.system)
  report = harness.evaluate_probes(policy.cfg, policy.params, policy.tokenizer, probes, settings,
                                   ref_params=reference.params if reference else None, guard=guard)
  report = {"model": policy.description, "suite": F.suite, "probes_file": F.probes,
            "reference": reference.description if reference else None,
            "settings": {"max_new_tokens": F.max_new_tokens, "batch_size": F.batch_size, "greedy": True,
                         "system": F.system, "guard": F.guard or None},
            "seconds": round(time.time() - start, 1), **report}
  harness.write_report(report, output)
  print(f"{policy.description} on {F.suite or F.probes} ({report['num_probes']} probes, greedy, "
        f"max {F.max_new_tokens} new tokens)")
  print(harness.format_table(report))
  print(f"report: {output}")


if __name__ == "__main__":
  console.run(main)
