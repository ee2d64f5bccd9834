"""JSONL -> TFDS array_record -> data source, validation errors, fingerprinting."""

import hashlib
import json
import re

import pytest

from alignment.data import chat, sft
from tests.data.conftest import MESSAGES_JSONL, PROMPT_COMPLETION_JSONL, read_rows


def as_conversations(source):
  return [sft.record_to_messages(source[i]) for i in range(len(source))]


def test_round_trip_messages_and_prompt_completion(tmp_path):
  sources = sft.prepare_sft(MESSAGES_JSONL, PROMPT_COMPLETION_JSONL, data_dir=tmp_path)
  assert set(sources) == {"train", "eval"}
  assert as_conversations(sources["train"]) == [r["messages"] for r in read_rows(MESSAGES_JSONL)]
  assert as_conversations(sources["eval"]) == [
      chat.prompt_completion_to_messages(r["prompt"], r["completion"])
      for r in read_rows(PROMPT_COMPLETION_JSONL)
  ]
  # Stored as array_record under data_dir, readable without our builder class.
  import tensorflow_datasets as tfds
  (info,) = list(tmp_path.rglob("dataset_info.json"))
  assert list(info.parent.glob("*.array_record*"))
  assert len(tfds.builder_from_directory(str(info.parent)).as_data_source("train")) == len(sources["train"])


def test_train_only_and_held_out_fraction(sources, tmp_path):
  rows = [r["messages"] for r in read_rows(MESSAGES_JSONL)]
  only = sft.prepare_sft(MESSAGES_JSONL, data_dir=tmp_path)
  assert set(only) == {"train"} and len(only["train"]) == len(rows)

  train, evals = as_conversations(sources["train"]), as_conversations(sources["eval"])
  assert len(evals) == round(0.1 * len(rows)) and len(train) + len(evals) == len(rows)
  # The documented rule: the rows with the smallest sha256 of (index, content) are held out, and
  # both parts keep file order.
  key = lambda i: hashlib.sha256(f"{i}\0{json.dumps(rows[i], sort_keys=True)}".encode()).hexdigest(
  )  # noqa: E731
  held = sorted(sorted(range(len(rows)), key=key)[:len(evals)])
  assert evals == [rows[i] for i in held]
  assert train == [r for i, r in enumerate(rows) if i not in held]


def test_reuses_unchanged_and_reprepares_edited_files(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text('{"prompt": "a", "completion": "b"}\n')
  data_dir = tmp_path / "cache"
  first = sft.prepare_sft(path, data_dir=data_dir)
  (info,) = list(data_dir.rglob("dataset_info.json"))
  mtime = info.stat().st_mtime_ns
  again = sft.prepare_sft(path, data_dir=data_dir)
  assert info.stat().st_mtime_ns == mtime and len(again["train"]) == len(first["train"]) == 1

  path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n')
  edited = sft.prepare_sft(path, data_dir=data_dir)
  assert len(edited["train"]) == 2
  assert as_conversations(edited["train"])[1] == chat.prompt_completion_to_messages("c", "d")
  assert len(list(data_dir.rglob("dataset_info.json"))) == 2  # A new fingerprint directory.


GOOD = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}'


@pytest.mark.parametrize("bad_line, what", [
    ('{"messages": [{"role": "user", "content": "hi"}', "malformed JSON"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "yo"}]}', "missing key 'content'"),
    ('{"prompt": "hi"}', "missing key 'completion'"),
    ('{"text": "hi"}', "missing key"),
    ('{"prompt": "hi", "completion": 3}', "'completion' must be a string, got int"),
    ('{"messages": [{"role": "user", "content": ["hi"]}]}',
     r"messages\[0\].content must be a string, got list"),
    ('{"messages": "hi"}', "'messages' must be a non-empty list"),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', "role 'robot' is not one of"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('[1, 2]', "expected a JSON object, got list"),
])
@pytest.mark.parametrize("which", ["train", "eval"])
def test_bad_line_names_file_and_line(tmp_path, bad_line, what, which):
  good = tmp_path / "good.jsonl"
  good.write_text(GOOD + "\n")
  bad = tmp_path / "bad.jsonl"
  bad.write_text(f"{GOOD}\n\n{GOOD}\n{bad_line}\n{GOOD}\n")  # Line 4 (the blank line counts).
  data_dir = tmp_path / "cache"
  args = (bad, good) if which == "train" else (good, bad)
  with pytest.raises(ValueError) as err:
    sft.prepare_sft(*args, data_dir=data_dir)
  message = str(err.value)
  assert "\n" not in message
  assert message.startswith(f"{bad}:4: ")
  assert re.search(what, message), message
  assert not list(data_dir.rglob("dataset_info.json")) and not list(data_dir.rglob("*.array_record*"))


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_names_the_file(tmp_path, content):
  empty = tmp_path / "empty.jsonl"
  empty.write_text(content)
  data_dir = tmp_path / "cache"
  with pytest.raises(ValueError, match=f"^{empty}: file is empty"):
    sft.prepare_sft(empty, data_dir=data_dir)
  assert not list(data_dir.rglob("dataset_info.json")) and not list(data_dir.rglob("*.array_record*"))


def test_missing_file_and_bad_arguments(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    sft.prepare_sft(tmp_path / "nope.jsonl", data_dir=tmp_path)
  with pytest.raises(ValueError, match="either eval_path or eval_fraction"):
    sft.prepare_sft(MESSAGES_JSONL, PROMPT_COMPLETION_JSONL, data_dir=tmp_path, eval_fraction=0.1)
  with pytest.raises(ValueError, match="eval_fraction must be in"):
    sft.prepare_sft(MESSAGES_JSONL, data_dir=tmp_path, eval_fraction=1.5)
