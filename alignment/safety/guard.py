"""The Guard: a trained safety classifier around a policy, checking what goes in and what comes out.

    guard = Guard("workdirs/guard")                 # a classifier run's workdir (configs/classifier.py)
    out = guard.respond(prompts, generate)          # generate(indices) -> responses to prompts[indices]
    out.responses, out.stages                       # stage per prompt: "input", "output" or None
    guard.reward(prompts, responses)                # float32 [N]: -1 where the output check flags, else 0
    guard.flag_responses(prompts, responses)        # bool [N]: the output check alone

The input check scores the prompt alone; a flagged prompt is refused before anything is generated. The
output check scores the prompt with the policy's response; a flagged response is replaced by the
refusal. Each compares the classifier's score with its own threshold saved with it (`threshold` and
`output_threshold`, chosen together on the calibration split's prompts and prompt-response pairs so that
the two checks block at most a target share of its benign prompts: `classifier.summarize`). `python -m alignment.generate --guard=DIR` and
`python -m alignment.evaluate --guard=DIR` run through it; the evaluate report counts what each stage
blocked.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np

from alignment.safety.classifier import Classifier

REFUSAL = "I'm sorry, but I can't help with that request."  # in the wording refusal detectors (garak's) know
STAGES = ("input", "output")


class Guarded(NamedTuple):
  responses: list       # what the user gets: the policy's response, or the refusal
  stages: list          # per prompt: the stage that blocked it ("input" | "output"), or None
  scores: dict          # stage -> float32 [N] (NaN where that stage did not run)


class Guard:

  def __init__(self, workdir, mesh=None, *, refusal: str = REFUSAL, batch_size: int = 16):
    self.classifier = Classifier(workdir, mesh)
    self.refusal = refusal
    self.batch_size = batch_size

  @property
  def threshold(self) -> float:
    """The input check's threshold."""
    return self.classifier.threshold

  @property
  def output_threshold(self) -> float:
    return self.classifier.output_threshold

  def check_prompts(self, prompts: Sequence) -> np.ndarray:
    """float32 [N] scores of the prompts alone (flagged where >= threshold)."""
    return self.classifier.score(list(prompts), batch_size=self.batch_size)

  def check_responses(self, prompts: Sequence, responses: Sequence[str]) -> np.ndarray:
    """float32 [N] scores of each prompt with its response (flagged where >= output_threshold)."""
    return self.classifier.score(list(prompts), list(responses), batch_size=self.batch_size)

  @property
  def checks_output(self) -> bool:
    """False when the output check is off: an infinite `output_threshold`, chosen where flagging answers
    bought nothing within the calibration set's false-positive budget."""
    return bool(np.isfinite(self.output_threshold))

  def flag_responses(self, prompts: Sequence, responses: Sequence[str]) -> np.ndarray:
    """bool [N]: the output check's verdicts (nothing scored when it is off)."""
    if not self.checks_output:
      return np.zeros(len(responses), bool)
    return self.check_responses(prompts, responses) >= self.output_threshold

  def respond(self, prompts: Sequence, generate: Callable[[list], list], prompt_scores=None) -> Guarded:
    """Input check, `generate(indices)` (the responses to `prompts[i]` for those indices) on the prompts
    that pass it, output check (module docstring). `prompt_scores`: the input check's scores when they
    were computed already (`check_prompts(prompts)`)."""
    n = len(prompts)
    scores = {stage: np.full(n, np.nan, np.float32) for stage in STAGES}
    scores["input"] = self.check_prompts(prompts) if prompt_scores is None else np.asarray(prompt_scores, np.float32)
    allowed = [i for i in range(n) if scores["input"][i] < self.threshold]
    responses, stages = [self.refusal] * n, ["input"] * n
    if allowed:
      generated = generate(allowed)
      out = (self.check_responses([prompts[i] for i in allowed], generated) if self.checks_output
             else np.full(len(allowed), np.nan, np.float32))
      for i, response, score in zip(allowed, generated, out):
        scores["output"][i] = score
        flagged = score >= self.output_threshold
        responses[i], stages[i] = (self.refusal, "output") if flagged else (response, None)
    return Guarded(responses, stages, scores)

  def reward(self, prompts: Sequence, responses: Sequence[str]) -> np.ndarray:
    """An RL reward: -1 for a response the output check flags, 0 otherwise."""
    return -self.flag_responses(prompts, responses).astype(np.float32)


def open_flag(flag: str, path: str, **kwargs) -> Guard | None:
  """The Guard a command-line flag names (None when it is empty): `open_flag('--guard', F.guard)`. A path
  that holds no Guard raises ValueError naming the flag."""
  if not path:
    return None
  try:
    return Guard(path, **kwargs)
  except (ValueError, OSError) as e:
    raise ValueError(f"{flag}={path}: {e}") from None
