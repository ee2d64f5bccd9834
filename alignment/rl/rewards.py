"""Rewards by name, mixed with weights: `config.rl.rewards = "gym:1.0,reward_model:0.5"`.

A reward is `fn(records, completions) -> one float per completion`, where `records` are the prompt
records (`alignment.rl.prompts`: the prompt and whatever else its source carries, e.g. a gym probe's
fields or a math problem's `answer`) and `completions` the decoded texts. Built in:

  gym            the gym's graders as verifiers: 1.0 when `alignment.evals.graders.grade` passes the
                 completion for its probe (prompts from gym:train / gym:test)
  math           exact-answer math through the `math-verify` library: 1.0 when the completion's final
                 answer equals the record's `answer` (LaTeX or plain)
  reward_model   the scorer of a reward model the RM trainer saved (`config.rl.reward_model`, a workdir),
                 normalised by the reward mean and std it saved; it re-tokenizes the decoded text with
                 its own tokenizer, so policy and reward model may tokenize differently
  distinct_words the fraction of a completion's words that are distinct (a repetition penalty)
  vowels         the fraction of a completion's letters that are vowels: a rule any model, even a random
                 one, can learn to raise (the tiny presets' reward, for smoke tests)

Any other name of the form `package.module:function` is imported and called as a reward. A new
built-in is a factory under `@register(name)`: `make(config, mesh) -> fn`.

Verifiers run on the host, each process on its own share of the rows (the rewards are then gathered);
`reward_model` runs on the devices, over every row, on every process. A reward that raises, or returns
the wrong number of values or a non-finite one, stops the run with one line naming it.
"""

import importlib
from typing import Callable, Dict, NamedTuple, Sequence

import jax
import numpy as np

REGISTRY: Dict[str, Callable] = {}


class Reward(NamedTuple):
  name: str
  weight: float
  fn: Callable  # (records, completions) -> floats
  on_device: bool = False  # computed by every process over all rows (a model), not split across hosts


def register(name: str, *, on_device: bool = False):
  """Registers a factory `make(config, mesh) -> fn(records, completions)` as reward `name`."""
  def add(factory):
    REGISTRY[name] = (factory, on_device)
    return factory
  return add


@register("gym")
def _gym(config, mesh):
  from alignment.evals import graders

  def gym(records, completions):
    return [float(graders.grade(r, c)) for r, c in zip(records, completions)]
  return gym


@register("math")
def _math(config, mesh):
  import math_verify

  def math(records, completions):
    out = []
    for record, completion in zip(records, completions):
      if "answer" not in record:
        raise ValueError("a prompt record has no 'answer' key")
      gold = math_verify.parse(str(record["answer"]))
      out.append(float(bool(gold) and math_verify.verify(gold, math_verify.parse(completion))))
    return out
  return math


@register("reward_model", on_device=True)
def _reward_model(config, mesh):
  from alignment.train.rm import RewardScorer
  if not config.rl.reward_model:
    raise ValueError("reward 'reward_model' needs config.rl.reward_model: the workdir of a trained reward model")
  scorer = RewardScorer(config.rl.reward_model, mesh)
  mean, std = scorer.stats.get("reward/mean", 0.0), scorer.stats.get("reward/std", 1.0) or 1.0

  def reward_model(records, completions):
    return (scorer.score([r["prompt"] for r in records], list(completions)) - mean) / std
  return reward_model


@register("distinct_words")
def _distinct_words(config, mesh):
  def distinct_words(records, completions):
    del records
    return [len(set(w)) / len(w) if (w := c.lower().split()) else 0.0 for c in completions]
  return distinct_words


@register("vowels")
def _vowels(config, mesh):
  def vowels(records, completions):
    del records
    letters = lambda text: [ch for ch in text.lower() if ch.isalpha()]
    return [sum(ch in "aeiou" for ch in w) / len(w) if (w := letters(c)) else 0.0 for c in completions]
  return vowels


def parse_spec(spec: str) -> list:
  """'name[:weight],...' -> [(name, weight)]; a weight defaults to 1.0. A `module:function` name takes
  its weight after a second colon."""
  out = []
  for item in [s.strip() for s in spec.split(",") if s.strip()]:
    parts = item.split(":")
    importable = len(parts) >= 2 and "." in parts[0] and not _is_number(parts[1])
    name = ":".join(parts[:2]) if importable else parts[0]
    rest = parts[2:] if importable else parts[1:]
    if len(rest) > 1 or (rest and not _is_number(rest[0])):
      raise ValueError(f"config.rl.rewards: {item!r}: expected name[:weight] or package.module:function[:weight]")
    out.append((name, float(rest[0]) if rest else 1.0))
  if not out:
    raise ValueError("config.rl.rewards is empty; name at least one reward, e.g. 'gym' or 'reward_model'")
  return out


def _is_number(text: str) -> bool:
  try:
    float(text)
    return True
  except ValueError:
    return False


def check_spec(spec: str) -> None:
  """Refuses an unknown reward name before anything runs (importable names are imported here)."""
  for name, _ in parse_spec(spec):
    if name in REGISTRY:
      continue
    if ":" not in name:
      raise ValueError(f"config.rl.rewards: unknown reward {name!r}; valid: {', '.join(sorted(REGISTRY))}, "
                       f"or package.module:function")
    _import(name)


def _import(name: str) -> Callable:
  module, function = name.split(":")
  try:
    fn = getattr(importlib.import_module(module), function)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"config.rl.rewards: cannot import reward {name!r}: {e}") from None
  if not callable(fn):
    raise ValueError(f"config.rl.rewards: {name!r} is not callable")
  return fn


def make_rewards(config, mesh) -> list:
  """The rewards `config.rl.rewards` names, built (a reward model is loaded here)."""
  out = []
  for name, weight in parse_spec(config.rl.rewards):
    if name in REGISTRY:
      factory, on_device = REGISTRY[name]
      out.append(Reward(name, weight, factory(config, mesh), on_device))
    else:
      out.append(Reward(name.split(":")[1], weight, _import(name)))
  return out


def _call(reward: Reward, records, completions, rows) -> np.ndarray:
  try:
    values = reward.fn([records[i] for i in rows], [completions[i] for i in rows])
  except Exception as e:  # a user's function: any failure stops the run, named
    raise RuntimeError(f"reward {reward.name!r} raised {type(e).__name__}: {e}") from e
  values = np.asarray(values, np.float64) if not isinstance(values, np.ndarray) else values.astype(np.float64)
  if values.shape != (len(rows),):
    raise RuntimeError(f"reward {reward.name!r} returned shape {values.shape} for {len(rows)} completions; "
                       f"expected one float per completion")
  bad = np.flatnonzero(~np.isfinite(values))
  if bad.size:
    i = rows[bad[0]]
    raise RuntimeError(f"reward {reward.name!r} returned {values[bad[0]]} for completion {i} "
                       f"(prompt {str(records[i]['prompt'])[:60]!r}); rewards must be finite")
  return values


def score(rewards: Sequence[Reward], records: Sequence[dict], completions: Sequence[str]) -> dict:
  """{name: float32 [N]} per reward and 'total' (the weighted sum), the same on every process. Host
  verifiers score rows p, p + P, ... on process p of P, then the rows are gathered."""
  n = len(completions)
  count, index = jax.process_count(), jax.process_index()
  out = {}
  for reward in rewards:
    if reward.on_device or count == 1:
      out[reward.name] = _call(reward, records, completions, list(range(n)))
      continue
    from jax.experimental import multihost_utils
    mine = list(range(index, n, count))
    local = np.zeros(-(-n // count), np.float32)
    local[:len(mine)] = _call(reward, records, completions, mine)
    gathered = np.asarray(multihost_utils.process_allgather(local))  # [P, ceil(n / P)]
    values = np.zeros(n, np.float64)
    for p in range(count):
      rows = list(range(p, n, count))
      values[rows] = gathered[p, :len(rows)]
    out[reward.name] = values
  out["total"] = sum(r.weight * out[r.name] for r in rewards)
  return {k: v.astype(np.float32) for k, v in out.items()}
