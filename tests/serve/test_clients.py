"""The field's tools against the server: lm-evaluation-harness (a generation task through
`local-chat-completions`, a log-likelihood task through `local-completions`, both offline from local
JSONL files) and garak (a probe run through its OpenAI-compatible generator).

References: the sampler's greedy decode of the same chat prompt (the generations) and the model's full
logits log-softmaxed in float64 NumPy over lm-eval's own context/continuation split (the log-likelihoods)."""

import glob
import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from alignment import models
from alignment.models import sampler
from tests.serve.conftest import MODEL, REPO

QUESTIONS = [{"question": "What is the capital of France?", "answer": "Paris"},
             {"question": "Name a primary colour.", "answer": "red"},
             {"question": "What is 2 + 3?", "answer": "5"},
             {"question": "Say hello.", "answer": "hello"}]
CHOICES = [{"question": "The sky on a clear day is", "choices": ["blue", "green", "loud"], "label": 0},
           {"question": "Two plus two equals", "choices": ["four", "five"], "label": 0},
           {"question": "Ice is frozen", "choices": ["water", "fire", "sand"], "label": 0}]

GEN_TASK = """task: alignment_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 16
  temperature: 0
metric_list:
  - metric: exact_match
"""
MC_TASK = """task: alignment_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
"""


def _lm_eval(tmp_path, server, model_type, endpoint, task, *extra):
  out = tmp_path / f"out_{task}"
  proc = subprocess.run(
      [sys.executable, "-m", "lm_eval", "--model", model_type, "--model_args",
       f"base_url={server}/v1/{endpoint},model={MODEL},num_concurrent=4,max_retries=1,tokenizer_backend=remote",
       "--include_path", str(tmp_path), "--tasks", task, "--output_path", str(out), "--log_samples", *extra],
      cwd=REPO, capture_output=True, text=True, timeout=900, env={**os.environ, "HF_DATASETS_OFFLINE": "1",
                                                                  "HF_HUB_OFFLINE": "1"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  samples = glob.glob(str(out / "**" / f"samples_{task}_*.jsonl"), recursive=True)
  assert len(samples) == 1, samples
  return [json.loads(line) for line in open(samples[0])], proc.stdout


def _write(tmp_path, name, rows, task):
  data = tmp_path / f"{name}.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  (tmp_path / f"{name}.yaml").write_text(task.format(data=data))


@pytest.mark.slow
def test_lm_eval_runs_a_generation_task_through_chat_completions(server, reference, tmp_path):
  model, tokenizer = reference
  _write(tmp_path, "gen", QUESTIONS, GEN_TASK)
  samples, stdout = _lm_eval(tmp_path, server, "local-chat-completions", "chat/completions", "alignment_gen",
                             "--apply_chat_template")
  assert "alignment_gen" in stdout and "exact_match" in stdout
  assert len(samples) == len(QUESTIONS)
  eos, pad = sampler.stop_and_pad_ids(tokenizer)
  cfg = sampler.SamplingConfig(max_new_tokens=16, greedy=True, eos_ids=eos, pad_id=pad)
  for s in samples:
    want = sampler.generate_text(model, tokenizer, [s["doc"]["question"]], cfg)[0][0].split("\n")[0]
    assert s["resps"][0][0] == want


def _encode_pair(tokenizer, context, continuation):
  """lm-eval's split of a (context, continuation) request into tokens (`TemplateAPI._encode_pair`)."""
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces:
    continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
  whole = tokenizer.encode(context + continuation, add_special_tokens=False).ids
  ctx = tokenizer.encode(context, add_special_tokens=False).ids
  return ctx, whole[len(ctx):]


@pytest.mark.slow
def test_lm_eval_runs_a_loglikelihood_task_through_completions(server, reference, tmp_path):
  model, tokenizer = reference
  _write(tmp_path, "mc", CHOICES, MC_TASK)
  samples, stdout = _lm_eval(tmp_path, server, "local-completions", "completions", "alignment_mc")
  assert "alignment_mc" in stdout and "acc" in stdout
  assert len(samples) == len(CHOICES)
  for s in samples:
    requests = [s["arguments"][f"gen_args_{k}"] for k in range(len(s["arguments"]))]
    assert len(requests) == len(s["doc"]["choices"]) == len(s["resps"])
    for request, resp in zip(requests, s["resps"]):
      ctx, cont = _encode_pair(tokenizer, request["arg_0"], request["arg_1"])
      ids = ctx + cont
      logits = np.asarray(models.logits(model, jnp.asarray([ids], jnp.int32))[0], np.float64)
      top = logits.max(-1, keepdims=True)
      logp = logits - (np.log(np.exp(logits - top).sum(-1, keepdims=True)) + top)
      want = sum(logp[t - 1, ids[t]] for t in range(len(ctx), len(ids)))
      greedy = all(logp[t - 1].argmax() == ids[t] for t in range(len(ctx), len(ids)))
      got_ll, got_greedy = resp[0]  # the samples file holds them as strings
      assert float(got_ll) == pytest.approx(want, abs=1e-4)
      assert got_greedy == str(greedy)


GARAK = os.path.join(REPO, ".venv-garak", "bin", "garak")


@pytest.mark.slow
def test_garak_completes_a_probe_run_against_the_server(server, tmp_path):
  if not os.path.exists(GARAK):
    pytest.skip("garak's own environment is missing: `make test` creates .venv-garak")
  options = tmp_path / "generator.json"
  options.write_text(json.dumps({"openai": {"OpenAICompatible": {
      "uri": server + "/v1", "api_key": "none", "model": MODEL, "stop": [], "max_tokens": 24,
      "suppressed_params": ["n", "frequency_penalty", "presence_penalty"]}}}))
  report = tmp_path / "garak"
  proc = subprocess.run([GARAK, "--target_type", "openai.OpenAICompatible", "--target_name", MODEL,
                         "--generator_option_file", str(options), "--probes", "dan.Dan_11_0", "--generations", "2",
                         "--report_prefix", "run", "--parallel_attempts", "1"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=900,
                        env={**os.environ, "XDG_DATA_HOME": str(report), "HF_HUB_OFFLINE": "1"})
  assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
  reports = glob.glob(str(report / "**" / "run.report.jsonl"), recursive=True)
  assert reports, proc.stdout[-2000:]
  entries = [json.loads(line) for line in open(reports[0])]
  attempts = [e for e in entries if e["entry_type"] == "attempt" and e["status"] == 2]
  assert attempts and all(o and isinstance(o.get("text"), str) for a in attempts for o in a["outputs"])
  evals = [e for e in entries if e["entry_type"] == "eval"]  # each detector graded every output
  outputs = sum(len(a["outputs"]) for a in attempts)
  assert outputs == 2 and evals and all(e["total_evaluated"] == outputs and e["nones"] == 0 for e in evals)
  shutil.rmtree(report, ignore_errors=True)
