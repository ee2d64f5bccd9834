"""Prompts for online RL: where they come from, their token ids, and a resumable stream of them.

`config.rl.prompts` names the source:
  gym:train | gym:test   the alignment gym's probes; each record keeps its probe fields, so the gym's
                         graders can verify a completion (`alignment.rl.rewards`, reward `gym`)
  PATH.jsonl             one JSON object per line: `prompt` (a string: one user turn; or a list of
                         {role, content} messages) and any other keys, handed to the reward functions
                         (e.g. `answer` for the `math` reward)

`config.rl.kind_weights` (`kind:weight,...`) resamples a set whose records carry a `kind` (the gym's).
Every host reads the whole (small) prompt set and draws the same global batch of prompts each step; a
prompt longer than `config.rl.max_prompt_tokens` is truncated from the left (its end, where the question
usually is, kept) or dropped (`config.rl.long_prompts`), and counted.
"""

import json
from typing import NamedTuple, Sequence

import numpy as np

from alignment import workdir as workdir_lib
from alignment.evals import gym


class PromptSet(NamedTuple):
  records: list   # dicts with `prompt` (str or messages) and what the rewards read
  ids: list       # token id lists, chat-templated with the generation prompt
  info: dict      # counts: prompts, truncated, dropped


def read_records(source: str) -> list:
  """The prompt records of `source` (module docstring); ValueError naming the file, line and key."""
  if source in ("gym:train", "gym:test"):
    return [dict(p, prompt=gym.probe_text(p)) for p in gym.load_probes(source.split(":")[1])]
  path = workdir_lib.resolve(source)
  if not path.exists():
    raise ValueError(f"config.rl.prompts={source}: no such file (expected gym:train, gym:test or a .jsonl file)")
  records = []
  for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{number}: not JSON ({e.msg} at column {e.colno})") from None
    prompt = row.get("prompt") if isinstance(row, dict) else None
    valid_messages = isinstance(prompt, list) and prompt and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in prompt)
    if not (isinstance(prompt, str) and prompt.strip()) and not valid_messages:
      raise ValueError(f"{path}:{number}: key 'prompt' must be a non-empty string or a list of "
                       f"{{role, content}} messages")
    records.append(row)
  if not records:
    raise ValueError(f"{path}: no prompts")
  return records


def encode(tokenizer, records: Sequence[dict]) -> list:
  """Token ids of each record's prompt in the tokenizer's chat template, with the generation prompt."""
  out = []
  for record in records:
    prompt = record["prompt"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    out.append(tokenizer.encode(text, add_special_tokens=False).ids)
  return out


def weigh_kinds(records: list, spec: str) -> list:
  """The records with each kind's count scaled by its weight (`kind:weight,...`; kinds not named keep
  weight 1): a kind of n records becomes round(w * n) of them, whole copies first, then a fixed seeded
  draw without repeats. Balances a set like the gym's, half of whose train prompts are sycophancy."""
  weights = {}
  for part in filter(None, spec.split(",")):
    kind, _, weight = part.partition(":")
    try:
      weights[kind.strip()] = float(weight)
    except ValueError:
      raise ValueError(f"config.rl.kind_weights={spec!r}: {part!r} is not kind:weight") from None
    if not weights[kind.strip()] > 0:
      raise ValueError(f"config.rl.kind_weights={spec!r}: the weight of {kind!r} must be > 0")
  by_kind = {}
  for i, record in enumerate(records):
    if "kind" not in record:
      raise ValueError(f"config.rl.kind_weights: prompt {i} has no 'kind' to weigh")
    by_kind.setdefault(record["kind"], []).append(record)
  unknown = sorted(set(weights) - set(by_kind))
  if unknown:
    raise ValueError(f"config.rl.kind_weights: no prompts of kind {', '.join(unknown)}; kinds: {', '.join(by_kind)}")
  rng = np.random.default_rng(0)
  out = []
  for kind, group in by_kind.items():
    target = int(round(weights.get(kind, 1.0) * len(group)))
    copies, rest = divmod(target, len(group))
    out += group * copies + [group[i] for i in sorted(rng.choice(len(group), rest, replace=False))]
  return out


def load_prompts(rl_config, tokenizer) -> PromptSet:
  """The prompt set of `config.rl` with its kind weights and length rule applied (module docstring)."""
  records = read_records(rl_config.prompts)
  if rl_config.get("kind_weights"):
    records = weigh_kinds(records, rl_config.kind_weights)
  ids = encode(tokenizer, records)
  budget = rl_config.max_prompt_tokens
  long = [i for i, x in enumerate(ids) if len(x) > budget]
  if rl_config.long_prompts == "drop":
    keep = [i for i in range(len(ids)) if len(ids[i]) <= budget]
    records, ids = [records[i] for i in keep], [ids[i] for i in keep]
  else:
    ids = [x[-budget:] for x in ids]
  if not ids:
    raise ValueError(f"config.rl.max_prompt_tokens={budget}: every one of the {len(long)} prompts is longer; "
                     f"raise it or use long_prompts=truncate")
  info = {"prompts": len(ids), f"prompts_{'dropped' if rl_config.long_prompts == 'drop' else 'truncated'}": len(long),
          "prompt_tokens_max": max(len(x) for x in ids)}
  return PromptSet(records, ids, info)


class PromptStream:
  """Indices into a prompt set, `n` at a time, in a fresh seeded permutation per epoch; its position
  round-trips through `get_state` / `set_state` (saved with each checkpoint), so a resumed run draws
  the prompts the uninterrupted one would have."""

  def __init__(self, size: int, seed: int):
    self.size, self.seed = size, seed
    self.epoch, self.position = 0, 0

  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.size)

  def take(self, n: int) -> np.ndarray:
    out = []
    while len(out) < n:
      order = self._order(self.epoch)
      chunk = order[self.position:self.position + n - len(out)]
      out.extend(int(i) for i in chunk)
      self.position += len(chunk)
      if self.position >= self.size:
        self.epoch, self.position = self.epoch + 1, 0
    return np.asarray(out, np.int64)

  def get_state(self) -> dict:
    return {"epoch": self.epoch, "position": self.position}

  def set_state(self, state: dict) -> None:
    self.epoch, self.position = int(state["epoch"]), int(state["position"])
