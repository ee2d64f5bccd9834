"""Preference pairs as a TFDS dataset: local JSONL in three formats -> array_record -> data source.

A pair is normalised to

    {"prompt": [{"role", "content"}, ...],   # the conversation so far (ends with a user turn)
     "chosen": str, "rejected": str,         # the two final assistant replies
     "margin": float}                        # how much better chosen is; 0.0 when not given

from one of these JSONL row shapes (`format=`, or `'auto'`: detected per file from its first row):

  'hh'             Anthropic HH-RLHF: {"chosen": str, "rejected": str}, two full transcripts of
                   "\\n\\nHuman: ..." / "\\n\\nAssistant: ..." turns. A transcript is cut into turns at
                   each "\\n\\nHuman:" / "\\n\\nAssistant:" (or at such a marker opening the text), the one
                   space after the colon dropped. Its last turn must be an Assistant turn (the
                   completion, possibly empty); the turns before it form the prompt, which must be
                   non-empty, start with a Human turn and be the same in both transcripts: the prompt
                   is everything up to and including the last "\\n\\nAssistant:" the two share.
                   Human -> user, Assistant -> assistant; consecutive turns of one role are kept as
                   they are. Margin 0.
  'ultrafeedback'  UltraFeedback binarized: {"prompt": str, "chosen": [messages], "rejected":
                   [messages], "score_chosen"?: number, "score_rejected"?: number}. The last message
                   of each list must be the assistant's (the completion); the messages before it must
                   be the same in both lists and end with a user message whose content is `prompt`
                   (compared without surrounding whitespace). Margin = score_chosen - score_rejected
                   when both are given, else 0.
  'jsonl'          Generic: {"prompt": str | [messages], "chosen": str, "rejected": str,
                   "margin"?: number}. A string prompt is one user turn; a message list must not end
                   with an assistant turn.

Auto-detection from a file's first row: 'chosen' is a list -> 'ultrafeedback'; else a 'prompt' key ->
'jsonl'; else 'hh'. Every later row must have the detected shape.

Rule for bad rows: every line of every input is validated before anything is written. With
`on_invalid='error'` (the default) the first bad line raises a ValueError naming `file:line` and
what is wrong (an empty file names the file). Anthropic's HH-RLHF is a human-written, multi-turn
format where a pair that does not split (no shared prompt, no final assistant turn) is a data error,
not an expected case, so we fail by default rather than quietly lose data; `on_invalid='drop'` skips
such rows (and any other row that parses as JSON but fails validation) instead, counts them, records
the count and the first reasons in the dataset's `info.metadata["invalid"]` and logs a warning.
Malformed JSON, a first row whose format cannot be detected, and a file with no valid row are errors
either way.

Splits: 'train' from `train_path`; 'eval' from `eval_path`, or a deterministic held-out fraction of
the train file taken by prompt, so that no prompt is in both splits (`sft.held_out_split`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import re
from collections.abc import Mapping

import numpy as np
import tensorflow_datasets as tfds

from alignment.choices import PREFERENCE_FORMATS
from alignment.data import filters as filters_lib
from alignment.data.chat import ROLES
from alignment.data.sft import (LocalJsonlBuilder, _text, conversation_text, fingerprint, held_out_split,
                                prepare_builder, read_jsonl, resolve_inputs)

Pair = dict  # {"prompt": [messages], "chosen": str, "rejected": str, "margin": float}

FORMATS = PREFERENCE_FORMATS
# Bump when the stored format or the parsing rules change: it is part of the fingerprint.
FORMAT_VERSION = "preference-v1"
MAX_REASONS = 20  # Bad-row reasons kept in the metadata with on_invalid='drop'.

# ----------------------------------------------------------------------------------------------
# Parsing the three row shapes. Each parser returns a Pair or raises ValueError("where: ...").

_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def split_hh_transcript(text: str) -> list[dict[str, str]]:
  """An HH transcript -> its turns as messages (see the module docstring for the rule).

    Raises ValueError when there is text before the first turn marker or no marker at all.
    """
  markers = list(_HH_TURN.finditer(text))
  if not markers or text[:markers[0].start()].strip():
    raise ValueError(f"transcript does not start with a '\\n\\nHuman:' turn: {text[:60]!r}")
  turns = []
  for k, m in enumerate(markers):
    end = markers[k + 1].start() if k + 1 < len(markers) else len(text)
    content = text[m.end():end]
    if content.startswith(" "):
      content = content[1:]
    turns.append({"role": _HH_ROLES[m.group(1)], "content": content})
  return turns


def parse_hh(row: Mapping, where: str) -> Pair:
  _require(row, where, {"chosen": str, "rejected": str}, "an Anthropic HH row")
  sides = {}
  for key in ("chosen", "rejected"):
    try:
      turns = split_hh_transcript(row[key])
    except ValueError as e:
      raise ValueError(f"{where}: '{key}' {e}") from None
    if turns[-1]["role"] != "assistant":
      raise ValueError(f"{where}: '{key}' has no final '\\n\\nAssistant:' turn (it ends with a Human turn), "
                       f"so there is no completion")
    if len(turns) < 2 or turns[0]["role"] != "user":
      raise ValueError(f"{where}: '{key}' must start with a Human turn before its final Assistant turn "
                       f"(the prompt is empty or starts with the Assistant)")
    sides[key] = turns
  prompt, other = sides["chosen"][:-1], sides["rejected"][:-1]
  if prompt != other:
    k = next((k for k, (a, b) in enumerate(zip(prompt, other)) if a != b), min(len(prompt), len(other)))
    raise ValueError(f"{where}: 'chosen' and 'rejected' do not share their prompt (every turn before the final "
                     f"Assistant turn); they differ at turn {k + 1} ({len(prompt)} vs {len(other)} prompt turns)")
  return _pair(prompt, sides["chosen"][-1]["content"], sides["rejected"][-1]["content"], 0.0)


def parse_ultrafeedback(row: Mapping, where: str) -> Pair:
  _require(row, where, {"prompt": str, "chosen": list, "rejected": list}, "an UltraFeedback row")
  sides = {key: validate_messages(row[key], f"{where}: '{key}'") for key in ("chosen", "rejected")}
  for key, messages in sides.items():
    if messages[-1]["role"] != "assistant":
      raise ValueError(f"{where}: '{key}' must end with the assistant's message (the completion), "
                       f"got role {messages[-1]['role']!r}")
    if len(messages) < 2 or messages[-2]["role"] != "user":
      raise ValueError(f"{where}: '{key}' must have a user message right before its final assistant message")
  prompt = sides["chosen"][:-1]
  if prompt != sides["rejected"][:-1]:
    raise ValueError(f"{where}: the messages before the final assistant message differ between 'chosen' and "
                     f"'rejected' (they must be the same prompt)")
  if prompt[-1]["content"].strip() != row["prompt"].strip():
    raise ValueError(f"{where}: 'prompt' {row['prompt'][:60]!r} is not the last user message of 'chosen' "
                     f"{prompt[-1]['content'][:60]!r}")
  scores = [_number(row, key, where) for key in ("score_chosen", "score_rejected")]
  margin = scores[0] - scores[1] if None not in scores else 0.0
  return _pair(prompt, sides["chosen"][-1]["content"], sides["rejected"][-1]["content"], margin)


def parse_generic(row: Mapping, where: str) -> Pair:
  _require(row, where, {"prompt": (str, list), "chosen": str, "rejected": str}, "a {prompt, chosen, rejected} row")
  prompt = row["prompt"]
  if isinstance(prompt, str):
    prompt = [{"role": "user", "content": prompt}]
  else:
    prompt = validate_messages(prompt, f"{where}: 'prompt'")
    if prompt[-1]["role"] == "assistant":
      raise ValueError(f"{where}: 'prompt' must not end with an assistant message (the completions follow it)")
  margin = _number(row, "margin", where)
  return _pair(prompt, row["chosen"], row["rejected"], 0.0 if margin is None else margin)


PARSERS = {"hh": parse_hh, "ultrafeedback": parse_ultrafeedback, "jsonl": parse_generic}


def detect_format(row, where: str) -> str:
  """The format of a file from its first row (see the module docstring)."""
  if not isinstance(row, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
  if "chosen" not in row or "rejected" not in row:
    raise ValueError(f"{where}: missing key: a preference row needs 'chosen' and 'rejected' "
                     f"(keys found: {sorted(row)})")
  if isinstance(row["chosen"], list):
    return "ultrafeedback"
  return "jsonl" if "prompt" in row else "hh"


def read_preferences(path: str | pathlib.Path,
                     format: str = "auto",
                     *,
                     on_invalid: str = "error") -> tuple[list[Pair], list[str]]:
  """Reads and validates a JSONL file of preference pairs: returns `(pairs, invalid)`.

    `invalid` lists `"file:line: reason"` for each skipped row (always empty with
    `on_invalid='error'`, which raises on the first one instead).
    """
  if format != "auto" and format not in FORMATS:
    raise ValueError(f"format must be 'auto' or one of {list(FORMATS)}, got {format!r}")
  if on_invalid not in ("error", "drop"):
    raise ValueError(f"on_invalid must be 'error' or 'drop', got {on_invalid!r}")
  rows = read_jsonl(path)
  if format == "auto":
    where, first = rows[0]
    format = detect_format(first, where)
    detected = f" (format '{format}' detected from line {where.rsplit(':', 1)[1]})"
  else:
    detected = f" (format '{format}')"
  parse = PARSERS[format]
  pairs, invalid = [], []
  for where, row in rows:
    try:
      if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
      pairs.append(parse(row, where))
    except ValueError as e:
      if on_invalid == "error":
        raise ValueError(f"{e}{detected}") from None
      invalid.append(str(e))
  if not pairs:
    raise ValueError(f"{path}: no valid preference pair among {len(rows)} rows{detected}; first problem: "
                     f"{invalid[0]}")
  return pairs, invalid


def _require(row: Mapping, where: str, types: Mapping, what: str) -> None:
  for key, kind in types.items():
    if key not in row:
      raise ValueError(f"{where}: missing key '{key}' ({what} needs {sorted(types)}; keys found: {sorted(row)})")
    if not isinstance(row[key], kind):
      names = " or ".join(t.__name__ for t in (kind if isinstance(kind, tuple) else (kind,)))
      raise ValueError(f"{where}: '{key}' must be {names}, got {type(row[key]).__name__}")


def validate_messages(messages, where: str) -> list[dict[str, str]]:
  """A JSON list of {role, content} turns, checked and normalised, or ValueError naming `where`[j] and the key."""
  if not isinstance(messages, list) or not messages:
    raise ValueError(f"{where} must be a non-empty list of {{role, content}} messages")
  out = []
  for j, m in enumerate(messages):
    if not isinstance(m, dict):
      raise ValueError(f"{where}[{j}] must be an object with 'role' and 'content', got {type(m).__name__}")
    for key in ("role", "content"):
      if key not in m:
        raise ValueError(f"{where}[{j}] is missing key '{key}'")
      if not isinstance(m[key], str):
        raise ValueError(f"{where}[{j}].{key} must be a string, got {type(m[key]).__name__}")
    if m["role"] not in ROLES:
      raise ValueError(f"{where}[{j}].role {m['role']!r} is not one of {list(ROLES)}")
    out.append({"role": m["role"], "content": m["content"]})
  return out


def _number(row: Mapping, key: str, where: str) -> float | None:
  if key not in row or row[key] is None:
    return None
  value = row[key]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ValueError(f"{where}: '{key}' must be a finite number, got {json.dumps(value)[:40]}")
  return float(value)


def _pair(prompt, chosen: str, rejected: str, margin: float) -> Pair:
  return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": float(margin)}


def prompt_key(pair: Pair) -> str:
  """The identity of a pair's prompt (the held-out split keeps each prompt on one side)."""
  return json.dumps(pair["prompt"], sort_keys=True, ensure_ascii=False)


# ----------------------------------------------------------------------------------------------
# The TFDS builder.


@dataclasses.dataclass(eq=False)
class PreferenceConfig(tfds.core.BuilderConfig):
  """One prepared variant; `name` is `fp<fingerprint>` so edited inputs or settings get a new directory."""
  train_path: str = ""
  eval_path: str | None = None
  eval_fraction: float = 0.0
  format: str = "auto"
  on_invalid: str = "error"


class PreferencePairs(LocalJsonlBuilder):
  """Preference pairs from local JSONL, stored as array_record (read with `as_data_source`)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Normalised {prompt messages, chosen, rejected, margin} from local JSONL."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Preference pairs (HH-RLHF, UltraFeedback binarized or generic JSONL), normalised.",
        features=tfds.features.FeaturesDict({
            "prompt": tfds.features.Sequence({
                "role": tfds.features.Text(),
                "content": tfds.features.Text(),
            }),
            "chosen": tfds.features.Text(),
            "rejected": tfds.features.Text(),
            "margin": tfds.features.Scalar(dtype=np.float32),
        }),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,  # Keep file order; the grain pipeline shuffles.
    )


def prepare_preferences(train_path: str | pathlib.Path,
                        eval_path: str | pathlib.Path | None = None,
                        *,
                        data_dir: str | pathlib.Path,
                        eval_fraction: float = 0.0,
                        format: str = "auto",
                        on_invalid: str = "error",
                        filters: filters_lib.Options = filters_lib.DEFAULTS) -> dict:
  """Prepares (once per input fingerprint) and returns `{split: data source}`.

    Splits: 'train' from `train_path`; 'eval' from `eval_path`, or else, when `eval_fraction > 0`, the
    pairs of about that fraction of the train file's distinct prompts (whole prompts, smallest sha256
    first; see `sft.held_out_split`). `format` ('auto' | 'hh' | 'ultrafeedback' | 'jsonl') applies to
    every file ('auto': detected per file). Records come back with bytes text fields;
    `record_to_pair` decodes them. Everything is validated before anything is written (see the module
    docstring for `on_invalid`). `filters` run before the held-out split: the quality heuristics read the
    prompt and the chosen answer (a rejected answer may be junk on purpose), the dedups the whole pair.
    """
  if format != "auto" and format not in FORMATS:
    raise ValueError(f"format must be 'auto' or one of {list(FORMATS)}, got {format!r}")
  if on_invalid not in ("error", "drop"):
    raise ValueError(f"on_invalid must be 'error' or 'drop', got {on_invalid!r}")
  train_path, eval_path = resolve_inputs(train_path, eval_path, eval_fraction)
  fp = fingerprint(train_path,
                   eval_path,
                   eval_fraction,
                   version=FORMAT_VERSION,
                   settings=(f"format={format}", f"on_invalid={on_invalid}", *filters_lib.settings(filters)))
  config = PreferenceConfig(name="fp" + fp,
                            description=f"train={train_path} eval={eval_path} eval_fraction={eval_fraction} "
                            f"format={format} on_invalid={on_invalid}",
                            train_path=str(train_path),
                            eval_path=None if eval_path is None else str(eval_path),
                            eval_fraction=eval_fraction,
                            format=format,
                            on_invalid=on_invalid)
  invalid, removed = {}, {}

  def read_splits():
    train, invalid["train"] = read_preferences(train_path, format, on_invalid=on_invalid)
    splits = {"train": train}
    if eval_path is not None:
      splits["eval"], invalid["eval"] = read_preferences(eval_path, format, on_invalid=on_invalid)
    splits, counts = filters_lib.filter_splits(splits, filters, text=lambda p: _pair_text(p, "chosen"),
                                               dedup_text=lambda p: _pair_text(p, "chosen", "rejected"))
    filters_lib.log_counts("preference data", counts)
    removed.update(counts)
    if eval_fraction:
      splits["train"], splits["eval"] = held_out_split(train, eval_fraction, group=prompt_key)
    for split, reasons in invalid.items():
      if reasons:
        logging.warning("preference data: dropped %d invalid rows of the %s file (on_invalid='drop'); first: %s",
                        len(reasons), split, reasons[0])
    return splits

  def metadata(splits):
    return {"invalid": {split: {"count": len(r), "first": r[:MAX_REASONS]} for split, r in invalid.items()},
            "filter_counts": removed}

  return prepare_builder(PreferencePairs(config=config, data_dir=data_dir), read_splits, metadata)


def _pair_text(pair: Pair, *answers: str) -> str:
  return "\n".join([conversation_text(pair["prompt"])] + [pair[a] for a in answers])


def record_to_pair(record: Mapping) -> Pair:
  """One record -> Pair: a stored TFDS record (bytes text, prompt as {"role": [...], "content": [...]}),
    or an in-memory row already in the normalised shape (a string prompt is one user turn)."""
  prompt = record["prompt"]
  if isinstance(prompt, (str, bytes)):
    prompt = [{"role": "user", "content": _text(prompt)}]
  elif isinstance(prompt, Mapping):
    prompt = [{"role": _text(r), "content": _text(c)} for r, c in zip(prompt["role"], prompt["content"])]
  else:
    prompt = [{"role": _text(m["role"]), "content": _text(m["content"])} for m in prompt]
  return _pair(prompt, _text(record["chosen"]), _text(record["rejected"]), float(record.get("margin", 0.0)))
