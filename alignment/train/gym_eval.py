"""Gym evals during training (`config.evals`): every `every` steps, at the last step, and at step 0 when
`config.train.eval_at_start`, the policy answers the suite's probes (greedy, with the KV-cache sampler
on the live params), the answers are graded, and

  WORKDIR/evals/step_NNNNNN.json   gets the full report (per-kind rates with 95% intervals, every response),
  metrics.jsonl                    gets gym/<kind>, gym/helpful|honest|harmless, gym/mean_response_tokens,
                                   gym/kl_to_reference (runs with a live reference, on `kl_probes` of the
                                   probes, after step 0) and the reward-hacking
                                   monitors (`alignment.evals.monitors`).
"""

import sys
import time
from typing import Optional

from alignment import workdir as workdir_lib
from alignment.evals import harness, monitors


class GymEvaluator:
  """Runs the evals of one training run and keeps what the monitors compare against."""

  def __init__(self, config, task, workdir):
    e = config.evals
    if task.model_cfg is None or task.tokenizer is None:
      raise ValueError(f"config.evals.every={e.every}: algorithm {config.algorithm!r} trains no generating model")
    self.probes = harness.sample_probes(harness.load_probes(e.suite, e.probes), e.limit)
    self.settings = harness.EvalSettings(max_new_tokens=e.max_new_tokens, batch_size=e.batch_size)
    self.kl_probes, self.every = e.kl_probes, e.every
    self.cfg, self.tokenizer, self.reward_metric = task.model_cfg, task.tokenizer, task.reward_metric
    self.workdir = workdir_lib.resolve(workdir)
    self.first, self.previous = self._saved_metrics()
    self.reward_before: Optional[float] = None
    self.window: list = []

  def _saved_metrics(self):
    """(first, last) flat metrics of the evals already in the workdir (a resumed run)."""
    paths = reports(self.workdir)
    read = lambda p: harness.flat_metrics(harness.read_report(p))
    return (read(paths[0]), read(paths[-1])) if paths else (None, None)

  def observe(self, record: dict) -> None:
    """Takes one step's logged metrics (the training reward, for the monitors)."""
    if self.reward_metric and self.reward_metric in record:
      self.window.append(record[self.reward_metric])

  def at_step(self, run, step: int, last: bool, parts, record: dict, summary: dict) -> None:
    """A training loop's turn: observes the step's record, and on an eval step (every `every` steps and the
    last) evaluates `parts()`, timed by `run`, into the record and the summary."""
    self.observe(record)
    if step % self.every == 0 or last:
      with run.timed("gym_eval", record):
        record.update(self.run(step, parts()))
      summary.update({k: v for k, v in record.items() if k.startswith(("gym/", "monitor/"))})

  def run(self, step: int, parts: dict) -> dict:
    """Evaluates `parts['policy']` (with the KL to `parts['ref']` when there is one); writes the report;
    returns the flat metrics and monitors for this step."""
    start = time.time()
    print(f"gym eval at step {step}: {len(self.probes)} probes ...", file=sys.stderr, flush=True)
    # At step 0 the policy is its reference: the KL is 0 by construction, and not worth two forwards.
    report = harness.evaluate_probes(self.cfg, parts["policy"], self.tokenizer, self.probes, self.settings,
                                     ref_params=parts.get("ref") if step else None, kl_probes=self.kl_probes or None)
    report = {"step": step, **report}
    path = self.workdir / "evals" / f"step_{step:06d}.json"
    harness.write_report(report, path)
    metrics = harness.flat_metrics(report)
    scores = ", ".join(f"{k[4:]} {v:.2f}" for k, v in metrics.items() if k in monitors.SCORE_KEYS)
    print(f"gym eval at step {step}: {scores} ({time.time() - start:.0f} s; {path})", file=sys.stderr, flush=True)
    reward_now = sum(self.window) / len(self.window) if self.window else None
    out = {**metrics, **monitors.hacking_monitors(self.first or metrics, self.previous, metrics,
                                                  reward_before=self.reward_before, reward_now=reward_now)}
    self.first = self.first or metrics
    self.previous = metrics
    if reward_now is not None:
      self.reward_before, self.window = reward_now, []
    return out


def reports(workdir) -> list:
  """Paths of the gym eval reports of a run, in step order."""
  return sorted(workdir_lib.resolve(workdir).glob("evals/step_*.json"), key=str)
