"""SFT conversations as a TFDS dataset: local JSONL -> array_record -> random-access data source.

Each JSONL line is one example in either shape:

    {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
    {"prompt": str, "completion": str}      # becomes [user: prompt, assistant: completion]

Other keys on a line are ignored. Every line of every input file is validated before anything is
written; the first problem raises a ValueError naming `file:line` and what is wrong. The prepared
dataset stores normalised conversations (`messages`: a Sequence of `{role, content}` Text features)
under `data_dir/sft_conversations/<fingerprint>/1.0.0/`, where the fingerprint hashes the input
files' bytes and the split settings: edited files are prepared afresh, unchanged ones are reused.

    sources = prepare_sft("train.jsonl", eval_path="eval.jsonl", data_dir=cache_dir)
    sources["train"][0]  ->  {"messages": {"role": [b"user", ...], "content": [b"...", ...]}}
    record_to_messages(sources["train"][0])  ->  [{"role": "user", "content": "..."}, ...]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Mapping, Sequence

import tensorflow_datasets as tfds
from etils import epath

from alignment import console
from alignment.data import filters as filters_lib
from alignment.data.chat import ROLES, prompt_completion_to_messages

Conversation = list[dict[str, str]]

# Bump when the stored format or the validation rules change: it is part of the fingerprint.
FORMAT_VERSION = "sft-v2"

# ----------------------------------------------------------------------------------------------
# Reading and validating JSONL.


def _normalise(row, where: str) -> Conversation:
  """Returns the conversation of one parsed JSONL row, or raises naming `where` (file:line)."""
  if not isinstance(row, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
  if "messages" in row:
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
      raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects, "
                       f"got {json.dumps(messages)[:80]}")
    out = []
    for j, m in enumerate(messages):
      if not isinstance(m, dict):
        raise ValueError(f"{where}: messages[{j}] must be an object with 'role' and 'content', "
                         f"got {type(m).__name__}")
      for key in ("role", "content"):
        if key not in m:
          raise ValueError(f"{where}: messages[{j}] is missing key '{key}'")
        if not isinstance(m[key], str):
          raise ValueError(f"{where}: messages[{j}].{key} must be a string, "
                           f"got {type(m[key]).__name__}")
      if m["role"] not in ROLES:
        raise ValueError(f"{where}: messages[{j}].role {m['role']!r} is not one of {list(ROLES)}")
      out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
      raise ValueError(f"{where}: conversation has no assistant message, so nothing to learn")
    return out
  if "prompt" in row or "completion" in row:
    for key in ("prompt", "completion"):
      if key not in row:
        raise ValueError(f"{where}: missing key '{key}' (a prompt/completion row needs both)")
      if not isinstance(row[key], str):
        raise ValueError(f"{where}: '{key}' must be a string, got {type(row[key]).__name__}")
    return prompt_completion_to_messages(row["prompt"], row["completion"])
  raise ValueError(f"{where}: missing key: a row needs 'messages' or 'prompt' and 'completion' "
                   f"(keys found: {sorted(row)})")


def read_jsonl(path: str | pathlib.Path) -> list[tuple[str, object]]:
  """Reads a JSONL file as `[(where, row)]`, `where` = `"{path}:{line}"` (blank lines are skipped).

    Raises ValueError `"{path}:{line}: malformed JSON ..."` for the first unparsable line, and
    `"{path}: file is empty ..."` for a file without any row.
    """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file")
  rows = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{lineno}"
      line = line.rstrip("\r\n")  # with the newline, an error at the end of the row is reported at line 2, column 1
      try:
        rows.append((where, json.loads(line)))
      except json.JSONDecodeError as e:
        at = "the end of the line" if e.pos >= len(line) else f"column {e.colno}"
        raise ValueError(f"{where}: malformed JSON ({e.msg} at {at})") from None
  if not rows:
    raise ValueError(f"{path}: file is empty (no JSONL rows); expected one JSON object per line")
  return rows


def write_jsonl(path: str | pathlib.Path, rows: Sequence[Mapping]) -> None:
  """One JSON object per line, written to a temporary file and renamed over `path` (a reader never sees
  half a file)."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  with open(tmp, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")
  os.replace(tmp, path)


def read_conversations(path: str | pathlib.Path) -> list[Conversation]:
  """Reads and validates a JSONL file of conversations (blank lines are skipped).

    Raises ValueError `"{path}:{line}: <what is wrong>"` for the first bad line, and
    `"{path}: file is empty ..."` for a file without any row.
    """
  return [_normalise(row, where) for where, row in read_jsonl(path)]


def held_out_split(rows: Sequence, fraction: float, *, group=None) -> tuple[list, list]:
  """Deterministically splits off about `round(fraction * n)` (at least 1) rows for eval.

    Rows are held out by group, whole groups at a time: `group(row) -> str` names a row's group (for
    preference pairs, its prompt, so that train and eval share no prompt); by default every row is
    its own group, keyed by `f"{index}\0{json.dumps(row, sort_keys=True)}"`. Groups are taken in
    increasing sha256 of their key until at least `round(fraction * n)` rows are held out, so the
    choice depends on nothing but the data; both parts keep file order.
    """
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"eval_fraction must be in (0, 1), got {fraction}")
  n = len(rows)
  k = max(1, round(fraction * n))
  if group is None:
    keys = [f"{i}\0{json.dumps(row, sort_keys=True)}" for i, row in enumerate(rows)]
  else:
    keys = [group(row) for row in rows]
  members = {}
  for i, key in enumerate(keys):
    members.setdefault(key, []).append(i)
  held = set()
  for key in sorted(members, key=lambda key: hashlib.sha256(key.encode()).hexdigest()):
    if len(held) >= k:
      break
    held.update(members[key])
  if len(held) >= n:
    raise ValueError(f"eval_fraction={fraction} of {n} rows ({len(members)} groups) leaves no training rows")
  train = [row for i, row in enumerate(rows) if i not in held]
  evals = [row for i, row in enumerate(rows) if i in held]
  return train, evals


def fingerprint(train_path,
                eval_path=None,
                eval_fraction: float = 0.0,
                *,
                version: str = FORMAT_VERSION,
                settings: Sequence[str] = ()) -> str:
  """A short hash of the input files' bytes, the stored format `version` and the split and parsing
    `settings` (not of the paths)."""
  h = hashlib.sha256(f"{version}\0{eval_fraction!r}\0".encode())
  for setting in settings:
    h.update(f"{setting}\0".encode())
  for role, path in (("train", train_path), ("eval", eval_path)):
    h.update(role.encode() + b"\0")
    if path is not None:
      h.update(hashlib.sha256(pathlib.Path(path).read_bytes()).digest())
  return h.hexdigest()[:20]


# ----------------------------------------------------------------------------------------------
# The TFDS builders.


class LocalJsonlBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the builders over local JSONL: the rows arrive validated and in memory (`splits`).

    A subclass defines `_info()` (its features) and may override `_example(row)` to turn a
    validated row into a feature dict. Prepare through `prepare_builder`.
    """

  # TFDS derives this through `importlib_resources`, which is not a dependency here; it only
  # serves to look for a (nonexistent) checksums file next to the code.
  code_path = epath.Path(__file__)

  def __init__(self,
               *,
               config: tfds.core.BuilderConfig,
               data_dir: str | pathlib.Path,
               splits: Mapping[str, list] | None = None):
    # `splits` holds the already validated rows; only needed to prepare.
    self._splits = splits
    super().__init__(config=config, data_dir=str(data_dir), file_format="array_record")

  def _split_generators(self, dl_manager):
    if self._splits is None:
      raise RuntimeError(f"{type(self).__name__} needs `splits` to prepare; use its prepare_* function")
    return {name: self._generate_examples(rows) for name, rows in self._splits.items()}

  def _generate_examples(self, rows):
    for i, row in enumerate(rows):
      yield i, self._example(row)

  def _example(self, row) -> dict:
    return row


def prepare_builder(builder: LocalJsonlBuilder, read_splits, metadata: Mapping | None = None) -> dict:
  """Prepares `builder` unless already prepared, then returns `{split: data source}`.

    `read_splits() -> {split: rows}` reads and validates the inputs; it runs only when the dataset is
    not there yet, and before anything is written, so a bad file leaves no prepared dataset behind.
    `metadata(splits) -> dict`, when given, goes to the dataset's `info.metadata` (`metadata.json`).
    """
  if not (builder.data_path / "dataset_info.json").exists():
    splits = read_splits()
    builder._splits = splits
    if metadata is not None:
      builder.info.metadata.update(metadata(splits))
    with console.quiet_stdout():
      builder.download_and_prepare()
  return {split: builder.as_data_source(split) for split in builder.info.splits}


def resolve_inputs(train_path, eval_path, eval_fraction: float) -> tuple[pathlib.Path, pathlib.Path | None]:
  """Checks the split arguments and returns the absolute input paths."""
  if eval_path is not None and eval_fraction:
    raise ValueError("pass either eval_path or eval_fraction, not both")
  train_path = pathlib.Path(train_path).resolve()
  eval_path = None if eval_path is None else pathlib.Path(eval_path).resolve()
  for path in (train_path, eval_path):
    if path is not None and not path.is_file():
      raise FileNotFoundError(f"{path}: no such file")
  return train_path, eval_path


@dataclasses.dataclass(eq=False)
class SftConfig(tfds.core.BuilderConfig):
  """One prepared variant; `name` is `fp<fingerprint>` so edited inputs get a new directory."""
  train_path: str = ""
  eval_path: str | None = None
  eval_fraction: float = 0.0


class SftConversations(LocalJsonlBuilder):
  """Conversations from local JSONL, stored as array_record (read with `as_data_source`)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Normalised {role, content} conversations from local JSONL."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="SFT conversations (normalised to {role, content} messages) from local JSONL.",
        features=tfds.features.FeaturesDict({
            "messages":
                tfds.features.Sequence({
                    "role": tfds.features.Text(),
                    "content": tfds.features.Text(),
                }),
        }),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,  # Keep file order; the grain pipeline shuffles.
    )

  def _example(self, messages):
    return {"messages": messages}


def prepare_sft(train_path: str | pathlib.Path,
                eval_path: str | pathlib.Path | None = None,
                *,
                data_dir: str | pathlib.Path,
                eval_fraction: float = 0.0,
                filters: filters_lib.Options = filters_lib.DEFAULTS) -> dict:
  """Prepares (once per input fingerprint) and returns `{split: data source}`.

    Splits: 'train' from `train_path`; 'eval' from `eval_path`, or else, when `eval_fraction > 0`,
    a deterministic held-out fraction of the train file (see `held_out_split`); no 'eval' otherwise.
    `filters` run over the files' rows before the held-out split (`alignment.data.filters`); what each
    removed is logged and kept in the dataset's metadata (`filter_counts`).
    Each data source is a random-access `ArrayRecordDataSource` (`len(src)`, `src[i]`) whose records
    `record_to_messages` turns back into conversations. All inputs are validated before anything is
    written, so a bad file leaves no prepared dataset behind.
    """
  train_path, eval_path = resolve_inputs(train_path, eval_path, eval_fraction)
  config = SftConfig(name="fp" + fingerprint(train_path, eval_path, eval_fraction,
                                             settings=filters_lib.settings(filters)),
                     description=f"train={train_path} eval={eval_path} eval_fraction={eval_fraction}",
                     train_path=str(train_path),
                     eval_path=None if eval_path is None else str(eval_path),
                     eval_fraction=eval_fraction)

  removed = {}

  def read_splits():
    splits = {"train": read_conversations(train_path)}
    if eval_path is not None:
      splits["eval"] = read_conversations(eval_path)
    splits, counts = filters_lib.filter_splits(splits, filters, text=conversation_text)
    filters_lib.log_counts("SFT data", counts)
    removed.update(counts)
    if eval_fraction:
      splits["train"], splits["eval"] = held_out_split(splits["train"], eval_fraction)
    return splits

  return prepare_builder(SftConversations(config=config, data_dir=data_dir), read_splits,
                         lambda splits: {"filter_counts": removed})


def conversation_text(messages: Conversation) -> str:
  """A conversation's turns as one text (what the data filters read)."""
  return "\n".join(m["content"] for m in messages)


def record_to_messages(record: Mapping) -> Conversation:
  """Decodes one stored record (Text features come back as bytes) into a conversation."""
  messages = record["messages"]
  return [{"role": _text(r), "content": _text(c)} for r, c in zip(messages["role"], messages["content"])]


def _text(x) -> str:
  return x.decode("utf-8") if isinstance(x, bytes) else str(x)
