"""Constitutions: the principles a model critiques, revises and compares its own answers against.

    constitution = load("harmless")                      # or a path: load("my_rules.yaml")
    constitution.principles[0].critique                  # a user turn asking for a critique
    constitution.few_shot(principle)                     # worked example turns for the critique prompt

A constitution is a YAML file (the bundled ones are `configs/constitutions/*.yaml`):

    name: harmless
    description: one line                                 # optional
    principles:                                           # at least one
      - name: harm
        critique: Explain how your last answer could ...  # asks for a critique of the last answer
        revision: Rewrite your answer so that ...         # asks for the rewrite
        choice: Which response gives less help with ...   # the question the AI labeller answers
    examples:                                             # optional: worked critique-revision examples
      - {prompt: ..., response: ..., critique: ..., revision: ...}

A malformed file is refused with one line naming the file, the entry and the key.
"""

from __future__ import annotations

import dataclasses
import pathlib

import yaml

BUNDLED = pathlib.Path(__file__).resolve().parents[2] / "configs" / "constitutions"
PRINCIPLE_KEYS = ("name", "critique", "revision", "choice")
EXAMPLE_KEYS = ("prompt", "response", "critique", "revision")


@dataclasses.dataclass(frozen=True)
class Principle:
  name: str
  critique: str
  revision: str
  choice: str


@dataclasses.dataclass(frozen=True)
class Constitution:
  name: str
  description: str
  principles: tuple[Principle, ...]
  examples: tuple[dict, ...]

  def few_shot(self, principle: Principle) -> list[dict]:
    """The examples as chat turns (request, answer, critique request, critique, revision request,
    revision) asked with `principle`'s wording: what the model sees before its own critique."""
    turns = []
    for e in self.examples:
      turns += [{"role": "user", "content": e["prompt"]}, {"role": "assistant", "content": e["response"]},
                {"role": "user", "content": principle.critique}, {"role": "assistant", "content": e["critique"]},
                {"role": "user", "content": principle.revision}, {"role": "assistant", "content": e["revision"]}]
    return turns


def bundled() -> list[str]:
  return sorted(p.stem for p in BUNDLED.glob("*.yaml"))


def resolve(name_or_path: str) -> pathlib.Path:
  """A bundled constitution's name (`harmless`) or a YAML file's path -> the file's path."""
  path = pathlib.Path(name_or_path)
  if path.suffix in (".yaml", ".yml") or path.exists():
    if not path.is_file():
      raise ValueError(f"constitution {name_or_path}: no such file")
    return path
  if (BUNDLED / f"{name_or_path}.yaml").is_file():
    return BUNDLED / f"{name_or_path}.yaml"
  raise ValueError(f"constitution {name_or_path!r}: not a YAML file nor a bundled constitution "
                   f"({', '.join(bundled())})")


def _strings(entry, keys: tuple, where: str) -> dict:
  if not isinstance(entry, dict):
    raise ValueError(f"{where}: expected a mapping with keys {', '.join(keys)}, got {type(entry).__name__}")
  unknown = sorted(set(entry) - set(keys))
  if unknown:
    raise ValueError(f"{where}: unknown key {unknown[0]!r} (expected {', '.join(keys)})")
  for key in keys:
    if key not in entry:
      raise ValueError(f"{where}: missing key {key!r}")
    if not isinstance(entry[key], str) or not entry[key].strip():
      raise ValueError(f"{where}.{key}: expected non-empty text, got {entry[key]!r}")
  return {key: entry[key].strip() for key in keys}


def parse(document, where: str) -> Constitution:
  """A parsed YAML document -> Constitution, or ValueError naming `where` and the entry."""
  if not isinstance(document, dict):
    raise ValueError(f"{where}: expected a mapping with 'name' and 'principles', got {type(document).__name__}")
  unknown = sorted(set(document) - {"name", "description", "principles", "examples"})
  if unknown:
    raise ValueError(f"{where}: unknown key {unknown[0]!r} (expected name, description, principles, examples)")
  name = document.get("name")
  if not isinstance(name, str) or not name.strip():
    raise ValueError(f"{where}: 'name' must be non-empty text, got {name!r}")
  principles = document.get("principles")
  if not isinstance(principles, list) or not principles:
    raise ValueError(f"{where}: 'principles' must be a non-empty list, got {principles!r}")
  parsed = tuple(Principle(**_strings(p, PRINCIPLE_KEYS, f"{where}: principles[{i}]")) for i, p in enumerate(principles))
  names = [p.name for p in parsed]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ValueError(f"{where}: principle name {repeated[0]!r} is used twice")
  examples = document.get("examples") or []
  if not isinstance(examples, list):
    raise ValueError(f"{where}: 'examples' must be a list, got {type(examples).__name__}")
  description = document.get("description") or ""
  if not isinstance(description, str):
    raise ValueError(f"{where}: 'description' must be text, got {description!r}")
  return Constitution(name.strip(), description.strip(), parsed,
                      tuple(_strings(e, EXAMPLE_KEYS, f"{where}: examples[{i}]") for i, e in enumerate(examples)))


def load(name_or_path: str) -> Constitution:
  path = resolve(name_or_path)
  try:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
  except yaml.YAMLError as e:
    mark = getattr(e, "problem_mark", None)
    line = f":{mark.line + 1}" if mark is not None else ""
    raise ValueError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
  return parse(document, str(path))
