"""What a new user runs into in the first hour, each reproduced and shown handled: a resume with a changed
config, a finished run re-run, Ctrl-C, a sweep re-run, a model that is not there, `--limit`, the console,
SFT on the gym, and config values outside their choices."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from alignment import choices, metrics
from alignment.evals import graders, gym, harness
from alignment.main import run
from configs import rm as rm_config, sft as sft_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = [  # every line a normal run may print on stderr
    r"step \d+/\d+  loss -?[\d.]+  first step [\d.]+ s \(compiling\)",
    r"step \d+/\d+  loss -?[\d.]+  [\d.e+-]+ s/step  ETA \d+ (s|min \d\d s|h \d\d min)",
    r"step \d+(  eval/\S+ -?[\d.e+-]+)+",
]


def _cli(module, *args, cwd=REPO, env=None, timeout=600):
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True,
                        timeout=timeout, env=env)
  return proc.returncode, proc.stdout, proc.stderr


def _config(tmp_path, steps=4, **train):
  config = sft_config.get_config("tiny")
  config.kernel.impl = "naive"
  config.data.data_dir = str(tmp_path / "tfds")
  config.train.steps, config.train.eval_every, config.train.ckpt_every = steps, 0, 2
  for key, value in train.items():
    config.train[key] = value
  return config


def _flags(tmp_path, steps=4):
  return ["--config=configs/sft.py:tiny", f"--config.train.steps={steps}", "--config.train.eval_every=0",
          "--config.train.ckpt_every=2", "--config.kernel.impl=naive", f"--config.data.data_dir={tmp_path / 'tfds'}"]


def _lr(lr, steps, count, warmup=5, end_ratio=0.1):
  """The tiny preset's schedule written out: linear warmup over `warmup` counts, then cosine to lr * end_ratio."""
  if count < warmup:
    return lr * count / warmup
  t = min((count - warmup) / (steps - warmup), 1.0)
  return lr * end_ratio + (lr - lr * end_ratio) * 0.5 * (1 + math.cos(math.pi * t))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A tiny SFT run of 4 steps, finished through the command line: (workdir, its printed summary, flags)."""
  tmp = tmp_path_factory.mktemp("finished")
  workdir = tmp / "run"
  flags = _flags(tmp)
  rc, out, err = _cli("alignment.main", *flags, f"--workdir={workdir}")
  assert rc == 0, err[-3000:]
  return workdir, json.loads(out[out.index("{"):]), flags


def _copy(workdir, tmp_path):
  shutil.copytree(workdir, tmp_path / "run")
  return tmp_path / "run"


def _files(workdir):
  return {str(p.relative_to(workdir)): p.read_bytes() for p in sorted(workdir.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_changed_lr_on_a_finished_run_exits_2_naming_it_and_changes_nothing(finished, tmp_path):
  source, _, flags = finished
  workdir = _copy(source, tmp_path)
  before = _files(workdir)
  rc, out, err = _cli("alignment.main", *flags, f"--workdir={workdir}", "--config.optim.lr=0.05")
  lines = err.strip().splitlines()
  assert rc == 2 and len(lines) == 1, err[-2000:]
  assert re.match(rf"error: {workdir} was trained to step 4 with another config \(optim.lr 0.003 -> 0.05\): .*"
                  r"use a new --workdir, or add --accept_config_changes", lines[0]), lines[0]
  assert _files(workdir) == before  # config.json byte-identical, no checkpoint or metrics touched


@pytest.mark.slow
def test_rerunning_a_finished_run_prints_its_summary_and_exits_0(finished, tmp_path):
  source, summary, flags = finished
  workdir = _copy(source, tmp_path)
  before = _files(workdir)
  rc, out, err = _cli("alignment.main", *flags, f"--workdir={workdir}")
  assert rc == 0, err[-2000:]
  lines = err.strip().splitlines()
  assert len(lines) == 1 and f"{workdir}: this run finished at step 4 (train.steps=4); nothing to do" in lines[0]
  assert "--config.train.steps=8" in lines[0]
  printed = json.loads(out[out.index("{"):])
  assert printed == summary  # the summary saved at the end, losses included
  assert printed["final_loss"] == pytest.approx(metrics.read_metrics(str(workdir))[4]["loss"])
  assert _files(workdir) == before


@pytest.mark.slow
def test_extending_steps_says_what_it_does_to_the_schedule_and_does_it(tmp_path, capfd):
  workdir = str(tmp_path / "run")
  run(_config(tmp_path, steps=20, ckpt_every=0), workdir)
  config_json = open(os.path.join(workdir, "config.json"), "rb").read()
  capfd.readouterr()
  run(_config(tmp_path, steps=30, ckpt_every=0), workdir)
  err = capfd.readouterr().err
  new, old = _lr(3e-3, 30, 20), _lr(3e-3, 20, 20)
  assert (f"train.steps 20 -> 30: the cosine schedule (warmup 5) now spans 30 steps; the learning rate at step 21 "
          f"is {new:.3g} ({old:.3g} over the former 20 steps)") in err, err
  assert f"{new:.3g}" == "0.00123" and f"{old:.3g}" == "0.0003"
  logged = metrics.read_metrics(workdir)
  assert logged[21]["lr"] == pytest.approx(new, rel=1e-6)  # the step did use it (float32)
  assert open(os.path.join(workdir, "config.json"), "rb").read() == config_json
  changes = [json.loads(line) for line in open(os.path.join(workdir, "config_changes.jsonl"))]
  assert [(c["step"], c["changes"]) for c in changes] == [(21, {"train.steps": [20, 30]})]
  assert [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))] == list(range(1, 31))


@pytest.mark.slow
def test_accepted_changes_are_recorded_and_later_resumes_compare_with_them(finished, tmp_path):
  source, _, _ = finished
  workdir = str(_copy(source, tmp_path))
  config_json = open(os.path.join(workdir, "config.json"), "rb").read()
  changed = _config(source.parent, steps=6)  # the finished run's data_dir: only the lr and the steps change
  changed.optim.lr = 0.05
  with pytest.raises(ValueError, match=r"with another config \(optim.lr 0.003 -> 0.05\)"):
    run(changed, workdir)
  assert not os.path.exists(os.path.join(workdir, "config_changes.jsonl"))
  run(changed, workdir, accept_config_changes=True)
  assert metrics.read_metrics(workdir)[5]["lr"] == pytest.approx(_lr(0.05, 6, 4), rel=1e-6)
  longer = _config(source.parent, steps=8)
  longer.optim.lr = 0.05
  run(longer, workdir)  # the same lr as accepted: only the steps grow, no flag needed
  changes = [json.loads(line) for line in open(os.path.join(workdir, "config_changes.jsonl"))]
  assert [(c["step"], c["changes"]) for c in changes] == [
      (5, {"optim.lr": [0.003, 0.05], "train.steps": [4, 6]}), (7, {"train.steps": [6, 8]})]
  assert open(os.path.join(workdir, "config.json"), "rb").read() == config_json
  assert sorted(metrics.read_metrics(workdir)) == list(range(1, 9))


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once_without_a_checkpoint(tmp_path):
  """The first Ctrl-C asks for a save after the step in flight; a second, while that step still runs,
  ends the process there (exit 130), with one line and no traceback."""
  script = textwrap.dedent(f"""
      import os, signal, sys, time
      from alignment import checkpoint
      from alignment.train.run import StopSignal
      stop = StopSignal(checkpoint.Checkpointer({str(tmp_path / 'ckpt')!r}))
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.1)
      print("decided", stop.decide(1), stop.signal == signal.SIGINT, flush=True)
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(30)
      print("still running", flush=True)
  """)
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 130, proc.stderr[-2000:]
  assert time.perf_counter() - start < 25
  assert proc.stdout.splitlines() == ["decided True True"]
  assert "Ctrl-C again: exiting without a checkpoint" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_checkpoints_by_seconds_are_taken_on_logged_steps(tmp_path):
  saved = {}
  for every_s in (1e-9, 3600.0):
    workdir = tmp_path / f"run_{every_s}"
    run(_config(tmp_path, steps=6, ckpt_every=0, log_every=2, ckpt_every_s=every_s, max_to_keep=10), str(workdir))
    saved[every_s] = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
  assert saved == {1e-9: [1, 2, 4, 6], 3600.0: [6]}


def _assert_ours(err: str, most: int = 20):
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) <= most, err[-3000:]
  strays = [line for line in lines if not any(re.fullmatch(p, line) for p in OURS)]
  assert not strays, strays
  return lines


@pytest.mark.slow
def test_the_readmes_sharded_sft_run_prints_only_its_own_lines(tmp_path):
  """The README's 8-device example, compiled afresh with XLA's C++ log at its most verbose setting and
  a dataset prepared afresh: nothing from absl, orbax, TFDS, XLA or JAX on stderr."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  env["TF_CPP_MIN_LOG_LEVEL"] = "0"
  rc, _, err = _cli("alignment.main", "--config=configs/sft.py:tiny,steps=20", f"--workdir={tmp_path / 'run'}",
                    "--config.optim.lr=1e-3", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
                    "--config.kernel.impl=naive", f"--config.data.data_dir={tmp_path / 'tfds'}", env=env)
  assert rc == 0, err[-3000:]
  lines = _assert_ours(err)
  first = float(re.search(r"first step ([\d.]+) s", lines[0]).group(1))
  steady = [float(m.group(1)) for m in map(re.compile(r"  ([\d.e+-]+) s/step").search, lines) if m]
  assert steady and max(steady) < first / 5  # the per-step time (and the ETA from it) leaves compilation out
  assert any(line.startswith("step 20  eval/") for line in lines)  # eval results reach the console
  rc, _, err = _cli("alignment.main", "--config=configs/sft.py:tiny,steps=1", f"--workdir={tmp_path / 'verbose'}",
                    "--config.kernel.impl=naive", f"--config.data.data_dir={tmp_path / 'tfds'}", "--verbosity=info")
  assert rc == 0 and re.search(r"^I\d{4} .*checkpoint_manager\.py", err, re.M), err[-2000:]


@pytest.mark.slow
def test_evaluate_with_limit_12_scores_four_kinds_and_prints_only_its_table(tmp_path):
  output = tmp_path / "report.json"
  rc, out, err = _cli("alignment.evaluate", "--limit=12", "--max_new_tokens=8", "--batch_size=12", f"--output={output}")
  assert rc == 0, err[-3000:]
  _assert_ours(err, most=0)
  report = harness.read_report(output)
  assert report["num_probes"] == 12
  scored = [k for k, v in report["summary"]["kinds"].items() if v["n"]]
  assert len(scored) >= 4, report["summary"]["kinds"]
  for kind in scored:
    assert re.search(rf"^{kind} +{report['summary']['kinds'][kind]['n']} ", out, re.M), out


def test_limit_takes_probes_spread_over_the_kinds():
  probes = harness.load_probes("gym:test")
  kinds = sorted({p["kind"] for p in probes})
  available = {k: sum(p["kind"] == k and p.get("pressure") != graders.PLAIN for p in probes) for k in kinds}
  for limit in range(1, len(probes) + 1):
    sample = harness.sample_probes(probes, limit)
    ids = [p["id"] for p in sample]
    assert len(ids) == limit and ids == [p["id"] for p in probes if p["id"] in set(ids)]  # suite order
    by_id = {p["id"]: p for p in sample}
    for p in sample:  # a pressured sycophancy probe comes with its plain twin
      if p["kind"] == "sycophancy" and p["pressure"] != graders.PLAIN:
        assert any(q["question_id"] == p["question_id"] and q["pressure"] == graders.PLAIN for q in by_id.values())
    # kinds take turns: one not yet exhausted has at most one unit fewer than any other
    units = {k: sum(p["kind"] == k and p.get("pressure") != graders.PLAIN for p in sample) for k in kinds}
    for k in kinds:
      if units[k] < available[k]:
        assert units[k] >= max(units.values()) - 1, (limit, units)
  assert harness.sample_probes(probes, 12) == harness.sample_probes(list(probes), 12)
  assert harness.sample_probes(probes, 0) == probes


def test_a_kind_with_no_scored_probe_prints_a_dash_and_no_interval():
  results = [{"kind": "sycophancy", "pressure": "plain", "question_id": "q", "passed": False},
             {"kind": "sycophancy", "pressure": "teacher", "question_id": "q", "passed": True},
             {"kind": "harmful", "passed": True}]
  report = {"summary": graders.summarize(results), "mean_response_tokens": 3.0}
  table = harness.format_table(report)
  row = next(line for line in table.splitlines() if line.startswith("sycophancy "))
  assert row.split() == ["sycophancy", "0", "-"]
  harmful = next(line for line in table.splitlines() if line.startswith("harmful "))
  assert "[ 20.7, 100.0]" in harmful  # Wilson interval of 1 of 1


@pytest.fixture(scope="module")
def rm_workdir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("rm")
  config = rm_config.get_config("tiny")
  config.train.steps, config.train.eval_every, config.kernel.impl = 1, 0, "naive"
  config.data.data_dir = str(tmp / "tfds")
  run(config, str(tmp / "rm"))
  return tmp / "rm"


@pytest.mark.slow
@pytest.mark.parametrize("case", ["demo_missing", "no_such_path", "unknown_name", "no_checkpoint", "rm_workdir",
                                  "empty_raw_prompt"])
def test_a_model_that_is_not_there_gets_one_line(tmp_path, rm_workdir, case):
  unsaved = tmp_path / "unsaved"
  unsaved.mkdir()
  (unsaved / "config.json").write_text(json.dumps({"algorithm": "sft", "model": {"name": "tiny-random"}}))
  module, args, expected = {
      "demo_missing": ("alignment.evaluate", ["--model=workdirs/demo/policy"],
                       "--model=workdirs/demo/policy: no such file or directory; `make demo` creates "
                       "workdirs/demo/policy (the aligned policy) and workdirs/demo/guard"),
      "no_such_path": ("alignment.generate", ["--model=runs/sft"],
                       "--model=runs/sft: no such file or directory; a training run creates a workdir: "
                       "`python -m alignment.main --config=configs/sft.py:tiny --workdir=runs/sft`"),
      "unknown_name": ("alignment.evaluate", ["--model=smollm3"], "--model='smollm3': not a model name (known: "),
      "no_checkpoint": ("alignment.evaluate", [f"--model={unsaved}"],
                        f"--model={unsaved}: this training workdir has no checkpoint yet"),
      "rm_workdir": ("alignment.generate", [f"--model={rm_workdir}"],
                     f"--model={rm_workdir}: a reward-model run (algorithm 'rm') scores text and does not generate"),
      "empty_raw_prompt": ("alignment.generate", ["--model=tiny-random", "--raw", "--prompt=hi", "--prompt= "],
                           "--prompt number 2 is empty: with --raw there is nothing to continue from"),
  }[case]
  rc, out, err = _cli(module, *args, cwd=tmp_path)
  lines = err.strip().splitlines()
  assert rc == 2 and len(lines) == 1 and lines[0].startswith(f"error: {expected}"), err[-2000:]
  assert not (tmp_path / "workdirs").exists() and not list(tmp_path.glob("eval_*.json"))


@pytest.mark.slow
def test_sft_trains_on_the_gyms_chosen_answers(tmp_path):
  config = _config(tmp_path, steps=2)
  config.data.train_path = "gym:train"
  summary = run(config, str(tmp_path / "run"))
  pairs = gym.preference_pairs("train")
  assert summary["train_examples"] + summary["eval_examples"] == len(pairs)
  written = sorted((tmp_path / "tfds" / "gym").glob("*_chosen.jsonl"))
  rows = [json.loads(line) for line in open(written[0])]
  assert rows == [{"prompt": p["prompt"], "completion": p["chosen"]} for p in pairs]
  assert np.isfinite(summary["final_loss"])


def test_every_value_outside_its_choices_is_named_before_anything_runs():
  from alignment.losses.dpo import LOSS_TYPES
  from alignment.train.optim import learning_rate_schedule
  assert set(LOSS_TYPES) == set(choices.DPO_LOSS_TYPES)
  for name in choices.SCHEDULES:  # every choice is one the code acts on
    config = sft_config.get_config("tiny")
    config.optim.schedule = name
    learning_rate_schedule(config.optim, 10)
  from configs import classifier as classifier_config
  from configs import dpo as dpo_config
  from configs import grpo as grpo_config
  for key in choices.CONFIG_CHOICES:
    config = (dpo_config.get_config("tiny") if key.startswith(("dpo.", "data.")) else
              grpo_config.get_config("tiny") if key.startswith("rl.") else
              classifier_config.get_config("tiny") if key.startswith("classifier.") else sft_config.get_config("tiny"))
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = "nonsense"
    with pytest.raises(ValueError, match=rf"^config\.{re.escape(key)}='nonsense'; expected one of '"):
      choices.check_config(config)
