"""Labelled conversations for a classifier: local JSONL -> TFDS -> packed batches of scored sequences.

Each JSONL line is one example:

    {"prompt": str, "label": 1}                              # a prompt alone (one user turn)
    {"prompt": str, "response": str, "label": 0}             # a prompt with its response
    {"messages": [{"role", "content"}, ...], "label": true}  # a conversation (a final assistant turn
                                                             #   is the response)

`label` is 1 / true (flagged: what a guard blocks) or 0 / false. Other keys are ignored. Every line is
validated before anything is written; the first problem raises a ValueError naming `file:line`.

The sequence a classifier scores is the chat template's render: a prompt alone with the generation
prompt (the very tokens a policy is about to answer from), a response up to and including its end of
turn. The score is read at the sequence's last token. A sequence longer than `max_length` keeps its
last `max_length` tokens (the end, where the score is read, must stay) and counts as `truncated`.

Batches (numpy, the job's global batch, as `alignment.data.pipeline`), R rows of T tokens holding up
to K = `examples_per_row` sequences (first-fit packing):

    inputs, positions, segment_ids      int32 [R, T]   (sequence k of a row is segment k + 1)
    end, label, example_mask, index     int32 [R, K]   (the cell of each sequence's last token, its
                                                       label, 1 for a real slot, its record index; an
                                                       empty slot has 0, 0, 0, -1)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import grain
import numpy as np
import tensorflow_datasets as tfds

from alignment.data import filters as filters_lib
from alignment.data import packing
from alignment.data.chat import render_chat
from alignment.data.pipeline import BatchIterator, records
from alignment.data.preference_pipeline import tokenize_sequence
from alignment.data.preference import validate_messages
from alignment.data.sft import (LocalJsonlBuilder, _text, conversation_text, fingerprint,
                                prepare_builder, read_jsonl, resolve_inputs)

FORMAT_VERSION = "labelled-v1"
EXAMPLE_FEATURES = ("end", "label", "example_mask", "index")
COUNTERS = ("examples", "truncated")


def _label(row: Mapping, where: str) -> int:
  if "label" not in row:
    raise ValueError(f"{where}: missing key 'label' (1 or true: flagged; 0 or false: not)")
  label = row["label"]
  if isinstance(label, bool) or label in (0, 1):
    return int(label)
  raise ValueError(f"{where}: 'label' must be 0, 1, true or false, got {label!r}")


def parse_example(row, where: str) -> dict:
  """One parsed JSONL row -> {"messages": prompt turns, "response": str or None, "label": 0 | 1}."""
  if not isinstance(row, dict):
    raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
  label = _label(row, where)
  if "messages" in row:
    messages = validate_messages(row["messages"], f"{where}: messages")
    if messages[-1]["role"] == "assistant":
      return {"messages": messages[:-1], "response": messages[-1]["content"], "label": label}
    return {"messages": messages, "response": None, "label": label}
  if "prompt" not in row:
    raise ValueError(f"{where}: missing key: a row needs 'prompt' or 'messages' (keys found: {sorted(row)})")
  for key in ("prompt", "response"):
    if key in row and not isinstance(row[key], str):
      raise ValueError(f"{where}: '{key}' must be a string, got {type(row[key]).__name__}")
  return {"messages": [{"role": "user", "content": row["prompt"]}], "response": row.get("response"),
          "label": label}


def read_examples(path) -> list[dict]:
  """The validated examples of a JSONL file, in file order."""
  return [parse_example(row, where) for where, row in read_jsonl(path)]


def example_text(example: Mapping) -> str:
  """An example's text (what the data filters read)."""
  return "\n".join([conversation_text(example["messages"])] + ([example["response"]] if example["response"] else []))


@dataclasses.dataclass(eq=False)
class LabelledConfig(tfds.core.BuilderConfig):
  train_path: str = ""
  eval_path: str | None = None


class LabelledConversations(LocalJsonlBuilder):
  """Labelled prompts and prompt-response pairs from local JSONL, stored as array_record."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Prompt turns, an optional response and a 0/1 label, from local JSONL."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Labelled conversations for a classifier (prompt turns, optional response, label).",
        features=tfds.features.FeaturesDict({
            "messages": tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()}),
            "response": tfds.features.Text(),
            "has_response": tfds.features.Scalar(dtype=np.int32),
            "label": tfds.features.Scalar(dtype=np.int32),
        }),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,
    )

  def _example(self, example):
    return {"messages": example["messages"], "response": example["response"] or "",
            "has_response": int(example["response"] is not None), "label": example["label"]}


def prepare_labelled(train_path, eval_path=None, *, data_dir, filters: filters_lib.Options = filters_lib.DEFAULTS
                     ) -> dict:
  """Prepares (once per input fingerprint) and returns `{split: data source}`: 'train', and 'eval' when
  `eval_path` is given. `filters` run first (eval rows repeating train rows leave eval)."""
  train_path, eval_path = resolve_inputs(train_path, eval_path, 0.0)
  fp = fingerprint(train_path, eval_path, version=FORMAT_VERSION, settings=filters_lib.settings(filters))
  config = LabelledConfig(name="fp" + fp, description=f"train={train_path} eval={eval_path}",
                          train_path=str(train_path), eval_path=None if eval_path is None else str(eval_path))
  removed = {}

  def read_splits():
    splits = {"train": read_examples(train_path)}
    if eval_path is not None:
      splits["eval"] = read_examples(eval_path)
    splits, counts = filters_lib.filter_splits(splits, filters, text=example_text)
    filters_lib.log_counts("labelled data", counts)
    removed.update(counts)
    return splits

  return prepare_builder(LabelledConversations(config=config, data_dir=data_dir), read_splits,
                         lambda splits: {"filter_counts": removed})


def record_to_example(record: Mapping) -> dict:
  """A stored record (bytes text) or an in-memory example -> {"messages", "response" (None: none), "label"}."""
  if "has_response" not in record:
    return {"messages": list(record["messages"]), "response": record.get("response"), "label": int(record["label"])}
  messages = record["messages"]
  return {"messages": [{"role": _text(r), "content": _text(c)} for r, c in zip(messages["role"], messages["content"])],
          "response": _text(record["response"]) if int(record["has_response"]) else None,
          "label": int(record["label"])}


def tokenize_example(messages, response, tokenizer, template: str, **template_kwargs) -> np.ndarray:
  """The ids a classifier scores (module docstring), int32 [L]."""
  if response is None:
    text = render_chat(template, messages, add_generation_prompt=True, **template_kwargs)
    return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, np.int32)
  return tokenize_sequence(messages, response, tokenizer, template, **template_kwargs)[0]


def fit(ids: np.ndarray, max_length: int) -> tuple[np.ndarray, bool]:
  """(the last `max_length` ids, whether any were cut)."""
  return ids[-max_length:], len(ids) > max_length


def _unit(item, max_length: int):
  ids, truncated = fit(item["ids"], max_length)
  return ({"inputs": ids, "label": np.int32(item["label"]), "index": np.int32(item["index"])},
          {"examples": 1, "truncated": int(truncated)})


def _finish_row(packed: Mapping, examples_per_row: int, pad_id: int) -> dict[str, np.ndarray]:
  segment_ids = np.asarray(packed["inputs_segment_ids"], np.int32)
  row = {"inputs": np.where(segment_ids > 0, packed["inputs"], pad_id).astype(np.int32),
         "positions": np.asarray(packed["inputs_positions"], np.int32) * (segment_ids > 0),
         "segment_ids": segment_ids}
  slots = _empty_slots(examples_per_row)
  k = len(packed["label"])
  for s in range(k):
    slots["end"][s] = np.flatnonzero(segment_ids == s + 1)[-1]
  slots["label"][:k], slots["index"][:k], slots["example_mask"][:k] = packed["label"], packed["index"], 1
  return {**row, **slots}


def _empty_slots(*shape) -> dict[str, np.ndarray]:
  slots = {k: np.zeros(shape, np.int32) for k in EXAMPLE_FEATURES}
  slots["index"][:] = -1
  return slots


def _stack_and_pad(rows, batch_size: int, seq_len: int, examples_per_row: int, pad_id: int) -> dict:
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  missing = batch_size - len(rows)
  if missing:
    pad = {**packing.empty_rows(missing, seq_len), **_empty_slots(missing, examples_per_row)}
    pad["inputs"][:] = pad_id
    batch = {k: np.concatenate([v, pad[k]]) for k, v in batch.items()}
  return batch


def make_labelled_iterator(source, *, tokenizer, template: str, seq_len: int, batch_size: int,
                           examples_per_row: int = 1, max_length: int | None = None, seed: int = 0,
                           num_epochs: int | None = None, shuffle: bool = True, pad_id: int = 0,
                           template_kwargs: Mapping | None = None) -> BatchIterator:
  """Global batches of `batch_size` rows (module docstring) over `source` (a data source from
  `prepare_labelled`, or a list of examples), shuffled each epoch from `seed` when `shuffle`;
  `num_epochs=None` repeats forever, a finite pass ends with its last batch padded."""
  max_length = seq_len if max_length is None else max_length
  if not 1 <= max_length <= seq_len or batch_size < 1 or examples_per_row < 1:
    raise ValueError(f"need 1 <= max_length ({max_length}) <= seq_len ({seq_len}), batch_size >= 1 "
                     f"({batch_size}) and examples_per_row >= 1 ({examples_per_row})")
  meta = {"kind": "labelled", "num_records": len(source), "seq_len": seq_len, "batch_size": batch_size,
          "examples_per_row": examples_per_row, "max_length": max_length, "seed": seed,
          "num_epochs": num_epochs, "shuffle": shuffle, "pad_id": pad_id}
  kw = dict(template_kwargs or {})

  def tokenize(item):
    example = record_to_example(item[1])
    ids = tokenize_example(example["messages"], example["response"], tokenizer, template, **kw)
    return {"ids": ids, "label": example["label"], "index": item[0]}

  ds = records(source, seed=seed, num_epochs=num_epochs, shuffle=shuffle, with_index=True).map(tokenize)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4 * batch_size))
  ds = packing.CountingMapDataset(ds, lambda item: _unit(item, max_length), COUNTERS,
                                  name=f"Fit(max_length={max_length})")
  ds = grain.experimental.FirstFitPackIterDataset(ds, length_struct={"inputs": seq_len},
                                                  num_packing_bins=batch_size, shuffle_bins=False,
                                                  meta_features=("label", "index"),
                                                  max_sequences_per_bin=examples_per_row)
  ds = ds.map(lambda packed: _finish_row(packed, examples_per_row, pad_id))
  ds = ds.batch(batch_size, batch_fn=lambda rows: _stack_and_pad(rows, batch_size, seq_len, examples_per_row,
                                                                 pad_id))
  return BatchIterator(ds, meta)
