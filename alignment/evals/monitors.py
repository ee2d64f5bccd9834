"""Reward-hacking monitors: signs, in the metrics of a training run, that the optimised reward and the
behaviour it stands for are coming apart.

Computed at every gym eval of a run from the flat gym metrics (`harness.flat_metrics`) of the first
eval, the previous one and this one, and from the training reward (for DPO the implicit reward margin
`rewards/margins`, for PPO/GRPO the reward) averaged over the steps before and since the previous eval:

  monitor/length_drift      mean response tokens now / at the first eval - 1 (verbosity creep, or
                            collapse to short answers);
  monitor/truncated_drift   fraction of responses cut at max_new_tokens now minus at the first eval
                            (rambling that never stops);
  monitor/kl_to_reference   per-response KL(policy || reference) over the gym prompts (when the run has
                            a reference);
  monitor/gym_score_change  mean of the helpful / honest / harmless scores now minus at the previous eval;
  monitor/reward_up_gym_down  1.0 when the training reward rose over the window while that mean score
                            fell (both beyond `tolerance`), else 0.0: the reward is being gamed.
"""

from __future__ import annotations

from collections.abc import Mapping

SCORE_KEYS = ("gym/helpful", "gym/honest", "gym/harmless")


def gym_score(metrics: Mapping) -> float | None:
  """Mean of the helpful / honest / harmless scores present in flat gym metrics (None if none is)."""
  scores = [metrics[k] for k in SCORE_KEYS if metrics.get(k) is not None]
  return sum(scores) / len(scores) if scores else None


def hacking_monitors(first: Mapping, previous: Mapping | None, current: Mapping, *,
                     reward_before: float | None = None, reward_now: float | None = None,
                     tolerance: float = 0.0) -> dict:
  """The monitors of the module doc, from flat gym metrics. `previous` is None at the first eval;
  the reward pair is the mean training reward over the window before the previous eval and since."""
  out = {}
  first_len = first.get("gym/mean_response_tokens")
  if first_len:
    out["monitor/length_drift"] = current["gym/mean_response_tokens"] / first_len - 1.0
  if "gym/truncated_fraction" in first:
    out["monitor/truncated_drift"] = current["gym/truncated_fraction"] - first["gym/truncated_fraction"]
  if "gym/kl_to_reference" in current:
    out["monitor/kl_to_reference"] = current["gym/kl_to_reference"]
  now, before = gym_score(current), gym_score(previous) if previous is not None else None
  if now is not None and before is not None:
    out["monitor/gym_score_change"] = now - before
    if reward_before is not None and reward_now is not None:
      gamed = reward_now - reward_before > tolerance and before - now > tolerance
      out["monitor/reward_up_gym_down"] = float(gamed)
  return out
