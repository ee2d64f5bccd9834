"""Preference JSONL (HH-RLHF, UltraFeedback binarized, generic) -> validated pairs -> TFDS data source."""

import hashlib
import importlib.util
import json
import re

import pytest

from alignment.data import preference
from tests.data.conftest import (FIXTURES, PREF_GENERIC_JSONL, PREF_HH_JSONL, PREF_ULTRAFEEDBACK_JSONL, read_rows)

H, A = "\n\nHuman: ", "\n\nAssistant: "


def user(content):
  return {"role": "user", "content": content}


def assistant(content):
  return {"role": "assistant", "content": content}


def pairs_of(source):
  return [preference.record_to_pair(source[i]) for i in range(len(source))]


# ----------------------------------------------------------------------------------------------
# Anthropic HH: splitting transcripts, against hand-written expectations.

HH_CASES = [
    # (chosen, rejected, prompt, chosen completion, rejected completion)
    (H + "Hi" + A + "Hello there.", H + "Hi" + A + "Go away.", [user("Hi")], "Hello there.", "Go away."),
    # Multi-turn; the completions share a long start, which must stay in the completions.
    (H + "What is 2+2?" + A + "4." + H + "And 3+3?" + A + "I think it is 6.",
     H + "What is 2+2?" + A + "4." + H + "And 3+3?" + A + "I think it is 7.",
     [user("What is 2+2?"), assistant("4."), user("And 3+3?")], "I think it is 6.", "I think it is 7."),
    # One completion is a prefix of the other.
    (H + "Say hi" + A + "hi", H + "Say hi" + A + "hi there", [user("Say hi")], "hi", "hi there"),
    # Identical transcripts (real HH has some): a valid, if uninformative, pair.
    (H + "Q" + A + "R", H + "Q" + A + "R", [user("Q")], "R", "R"),
    # An empty final reply, written with or without the space after the colon.
    (H + "Q" + A + "R", H + "Q" + "\n\nAssistant:", [user("Q")], "R", ""),
    # "Human:" inside a turn (no blank line before it) is text, not a turn; newlines inside turns kept.
    (H + "Quote: Human: hi\nthere" + A + "ok\nfine", H + "Quote: Human: hi\nthere" + A + "no",
     [user("Quote: Human: hi\nthere")], "ok\nfine", "no"),
    # Two Human turns in a row stay two user messages.
    (H + "a" + H + "b" + A + "c", H + "a" + H + "b" + A + "d", [user("a"), user("b")], "c", "d"),
]


@pytest.mark.parametrize("chosen, rejected, prompt, c, r", HH_CASES)
def test_hh_split(chosen, rejected, prompt, c, r):
  pair = preference.parse_hh({"chosen": chosen, "rejected": rejected}, "f:1")
  assert pair == {"prompt": prompt, "chosen": c, "rejected": r, "margin": 0.0}


@pytest.mark.parametrize("chosen, rejected, what", [
    (H + "Q" + A + "R", H + "Other" + A + "R", "do not share their prompt .*differ at turn 1"),
    (H + "a" + A + "b" + H + "c" + A + "d", H + "c" + A + "d", "do not share their prompt"),
    (H + "a" + A + "b" + H + "c" + A + "d", H + "a" + A + "b2" + H + "c" + A + "e", "differ at turn 2"),
    (H + "Q" + A + "R" + H + "more?", H + "Q" + A + "S", "'chosen' has no final '.*Assistant:' turn"),
    (H + "Q", H + "Q" + A + "S", "'chosen' has no final"),
    ("Q" + A + "R", H + "Q" + A + "S", "'chosen' transcript does not start with a .*Human:' turn"),
    (H + "Q" + A + "R", A + "S", "'rejected' must start with a Human turn"),
    ("", H + "Q" + A + "S", "does not start with"),
])
def test_hh_unsplittable_rows_are_errors(chosen, rejected, what):
  with pytest.raises(ValueError, match=f"^f:7: .*{what}"):
    preference.parse_hh({"chosen": chosen, "rejected": rejected}, "f:7")


def test_hh_fixture_round_trip(tmp_path):
  rows = read_rows(PREF_HH_JSONL)
  pairs = pairs_of(preference.prepare_preferences(PREF_HH_JSONL, data_dir=tmp_path)["train"])
  assert len(pairs) == len(rows) == 48
  for row, pair in zip(rows, pairs):
    # Reference: the final reply is what follows the last "\n\nAssistant: "; writing the prompt
    # messages back as a transcript gives the text before it, the same for both sides.
    for side in ("chosen", "rejected"):
      k = row[side].rindex(A)
      assert pair[side] == row[side][k + len(A):]
      back = "".join((H if m["role"] == "user" else A) + m["content"] for m in pair["prompt"])
      assert back == row[side][:k]
    assert pair["margin"] == 0.0 and pair["prompt"][-1]["role"] == "user"
  assert any(len(p["prompt"]) > 1 for p in pairs)  # Multi-turn prompts are exercised.


# ----------------------------------------------------------------------------------------------
# UltraFeedback binarized and generic rows.


def test_ultrafeedback_fixture_round_trip(tmp_path):
  rows = read_rows(PREF_ULTRAFEEDBACK_JSONL)
  pairs = pairs_of(preference.prepare_preferences(PREF_ULTRAFEEDBACK_JSONL, data_dir=tmp_path)["train"])
  assert len(pairs) == len(rows) == 48
  for row, pair in zip(rows, pairs):
    assert pair["prompt"] == [user(row["prompt"])] == row["chosen"][:-1]
    assert pair["chosen"] == row["chosen"][-1]["content"] and pair["rejected"] == row["rejected"][-1]["content"]
    assert pair["margin"] == pytest.approx(row["score_chosen"] - row["score_rejected"])


def test_ultrafeedback_rules():
  system = {"role": "system", "content": "Be brief."}
  row = {"prompt": " Q ", "chosen": [system, user("Q"), assistant("a")],
         "rejected": [system, user("Q"), assistant("b")]}  # yapf: disable
  # No scores: margin 0. The prompt is compared without surrounding whitespace.
  want = {"prompt": [system, user("Q")], "chosen": "a", "rejected": "b", "margin": 0.0}
  assert preference.parse_ultrafeedback(row, "f:1") == want
  bad = [
      (dict(row, prompt="other"), "'prompt' 'other' is not the last user message"),
      (dict(row, rejected=[system, user("Q2"), assistant("b")]), "differ between 'chosen' and 'rejected'"),
      (dict(row, chosen=[user("Q")]), "'chosen' must end with the assistant's message"),
      (dict(row, chosen=[assistant("a")]), "'chosen' must have a user message right before"),
      (dict(row, rejected=[user("Q"), {"role": "bot", "content": "b"}]), r"'rejected'\[1\].role 'bot'"),
      (dict(row, score_chosen="high", score_rejected=1), "'score_chosen' must be a finite number"),
      (dict(row, chosen="a"), "'chosen' must be list, got str"),
  ]
  for bad_row, what in bad:
    with pytest.raises(ValueError, match=f"^f:2: .*{what}"):
      preference.parse_ultrafeedback(bad_row, "f:2")


def test_generic_fixture_round_trip(tmp_path):
  rows = read_rows(PREF_GENERIC_JSONL)
  pairs = pairs_of(preference.prepare_preferences(PREF_GENERIC_JSONL, data_dir=tmp_path)["train"])
  assert len(pairs) == len(rows) == 160
  for row, pair in zip(rows, pairs):
    prompt = [user(row["prompt"])] if isinstance(row["prompt"], str) else row["prompt"]
    want = {"prompt": prompt, "chosen": row["chosen"], "rejected": row["rejected"], "margin": row.get("margin", 0.0)}
    assert pair == want
  assert {type(r["prompt"]) for r in rows} == {str, list} and {"margin" in r for r in rows} == {True, False}


def test_generic_rules():
  row = {"prompt": [user("a"), assistant("b"), user("c")], "chosen": "x", "rejected": "y", "margin": 2}
  assert preference.parse_generic(row, "f:1") == dict(row, margin=2.0)
  row = {"prompt": "p", "chosen": "x", "rejected": "y"}
  bad = [
      ({"prompt": "p", "chosen": "x"}, "missing key 'rejected'"),
      (dict(row, prompt=3), "'prompt' must be str or list, got int"),
      (dict(row, chosen=["x"]), "'chosen' must be str, got list"),
      (dict(row, margin=True), "'margin' must be a finite number"),
      (dict(row, margin="1"), "'margin' must be a finite number"),
      (dict(row, margin=float("nan")), "'margin' must be a finite number"),
      (dict(row, prompt=[user("a"), assistant("b")]), "'prompt' must not end with an assistant"),
      (dict(row, prompt=[]), "'prompt' must be a non-empty list"),
  ]
  for bad_row, what in bad:
    with pytest.raises(ValueError, match=f"^f:3: .*{what}"):
      preference.parse_generic(bad_row, "f:3")


@pytest.mark.parametrize("path, fmt", [(PREF_HH_JSONL, "hh"), (PREF_ULTRAFEEDBACK_JSONL, "ultrafeedback"),
                                       (PREF_GENERIC_JSONL, "jsonl")])
def test_auto_detection_equals_explicit_format(path, fmt):
  assert preference.detect_format(read_rows(path)[0], "x") == fmt
  assert preference.read_preferences(path) == preference.read_preferences(path, fmt)


def test_explicit_format_that_does_not_fit_names_the_line():
  with pytest.raises(ValueError, match=f"^{PREF_GENERIC_JSONL}:1: 'chosen' transcript does not start .*format 'hh'"):
    preference.read_preferences(PREF_GENERIC_JSONL, "hh")
  with pytest.raises(ValueError, match="format must be 'auto' or one of"):
    preference.read_preferences(PREF_GENERIC_JSONL, "csv")


# ----------------------------------------------------------------------------------------------
# Validation before writing; errors name file:line; nothing prepared on error.

def hh(prompt, chosen, rejected):
  return json.dumps({"chosen": H + prompt + A + chosen, "rejected": H + prompt + A + rejected})


def uf(prompt, chosen, rejected):
  return json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected})


GOOD = {
    "hh": hh("Q", "a", "b"),
    "ultrafeedback": uf("Q", [user("Q"), assistant("a")], [user("Q"), assistant("b")]),
    "jsonl": json.dumps({"prompt": "Q", "chosen": "a", "rejected": "b"}),
}
BAD = [
    ("jsonl", '{"prompt": "Q", "chosen": "a"', "malformed JSON"),
    ("jsonl", '{"prompt": "Q", "chosen": "a"}', "missing key 'rejected'"),
    ("jsonl", '{"prompt": "Q", "chosen": "a", "rejected": 1}', "'rejected' must be str, got int"),
    ("jsonl", '[1, 2]', "expected a JSON object, got list"),
    ("jsonl", hh("Q", "a", "b"), "missing key 'prompt'"),  # An HH row in a generic file.
    ("hh", json.dumps({"chosen": H + "Q" + A + "a", "rejected": H + "P" + A + "b"}), "do not share their prompt"),
    ("hh", json.dumps({"chosen": H + "Q", "rejected": H + "Q" + A + "b"}), "has no final"),
    ("hh", json.dumps({"chosen": [user("Q")], "rejected": H + "Q"}), "'chosen' must be str, got list"),
    ("ultrafeedback", uf("Q", [user("Q"), assistant("a")], "b"), "'rejected' must be list, got str"),
    ("ultrafeedback", uf("P", [user("Q"), assistant("a")], [user("Q"), assistant("b")]), "not the last user message"),
]


@pytest.mark.parametrize("fmt, bad_line, what", BAD)
@pytest.mark.parametrize("which", ["train", "eval"])
def test_bad_line_names_file_and_line(tmp_path, fmt, bad_line, what, which):
  good = tmp_path / "good.jsonl"
  good.write_text(GOOD[fmt] + "\n")
  bad = tmp_path / "bad.jsonl"
  bad.write_text(f"{GOOD[fmt]}\n\n{GOOD[fmt]}\n{bad_line}\n{GOOD[fmt]}\n")  # Line 4 (the blank line counts).
  data_dir = tmp_path / "cache"
  args = (bad, good) if which == "train" else (good, bad)
  with pytest.raises(ValueError) as err:
    preference.prepare_preferences(*args, data_dir=data_dir)
  message = str(err.value)
  assert "\n" not in message and message.startswith(f"{bad}:4: ")
  assert re.search(what, message), message
  assert not list(data_dir.rglob("dataset_info.json")) and not list(data_dir.rglob("*.array_record*"))


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file_names_the_file(tmp_path, content):
  empty = tmp_path / "empty.jsonl"
  empty.write_text(content)
  with pytest.raises(ValueError, match=f"^{empty}: file is empty"):
    preference.prepare_preferences(empty, data_dir=tmp_path / "cache")
  assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.array_record*"))


def test_first_row_of_unknown_shape(tmp_path):
  path = tmp_path / "x.jsonl"
  path.write_text('{"text": "hi"}\n')
  with pytest.raises(ValueError, match=f"^{path}:1: missing key: a preference row needs 'chosen' and 'rejected'"):
    preference.read_preferences(path)


def test_on_invalid_drop_counts_and_records(tmp_path):
  path = tmp_path / "hh.jsonl"
  unsplittable = json.dumps({"chosen": H + "Q" + A + "a", "rejected": H + "P" + A + "b"})
  path.write_text("\n".join([GOOD["hh"], unsplittable, GOOD["hh"], '{"chosen": 1, "rejected": "x"}']) + "\n")
  with pytest.raises(ValueError, match=f"^{path}:2: "):
    preference.prepare_preferences(path, data_dir=tmp_path / "a")
  sources = preference.prepare_preferences(path, data_dir=tmp_path / "b", on_invalid="drop")
  assert len(sources["train"]) == 2
  import tensorflow_datasets as tfds
  (info,) = list((tmp_path / "b").rglob("dataset_info.json"))
  invalid = tfds.builder_from_directory(str(info.parent)).info.metadata["invalid"]
  assert invalid["train"]["count"] == 2
  assert [re.match(r".*:(\d+): ", r).group(1) for r in invalid["train"]["first"]] == ["2", "4"]
  path.write_text(unsplittable + "\n")
  with pytest.raises(ValueError, match="no valid preference pair among 1 rows"):
    preference.prepare_preferences(path, data_dir=tmp_path / "c", on_invalid="drop")


# ----------------------------------------------------------------------------------------------
# Splits and preparation.


def test_held_out_prompts_are_not_in_train(pref_sources):
  rows = preference.read_preferences(PREF_GENERIC_JSONL)[0]
  train, evals = pairs_of(pref_sources["train"]), pairs_of(pref_sources["eval"])
  assert len(train) + len(evals) == len(rows) and len(evals) >= round(0.2 * len(rows))
  key = lambda p: json.dumps(p["prompt"], sort_keys=True)  # noqa: E731
  assert not {key(p) for p in train} & {key(p) for p in evals}
  assert len({key(p) for p in rows}) < len(rows)  # The fixture repeats prompts, so this is a real check.
  # The documented rule: whole prompts, in increasing sha256 of the prompt, until >= 20% of the rows;
  # both parts keep file order.
  groups = sorted({key(p) for p in rows}, key=lambda k: hashlib.sha256(k.encode()).hexdigest())
  held = set()
  for k in groups:
    if sum(key(p) in held for p in rows) >= round(0.2 * len(rows)):
      break
    held.add(k)
  assert evals == [p for p in rows if key(p) in held]
  assert train == [p for p in rows if key(p) not in held]


def test_eval_file_split_and_reuse(tmp_path):
  sources = preference.prepare_preferences(PREF_HH_JSONL, PREF_ULTRAFEEDBACK_JSONL, data_dir=tmp_path)
  assert {k: len(v) for k, v in sources.items()} == {"train": 48, "eval": 48}
  assert pairs_of(sources["eval"])[0]["chosen"] == read_rows(PREF_ULTRAFEEDBACK_JSONL)[0]["chosen"][-1]["content"]
  (info,) = list(tmp_path.rglob("dataset_info.json"))
  mtime = info.stat().st_mtime_ns
  preference.prepare_preferences(PREF_HH_JSONL, PREF_ULTRAFEEDBACK_JSONL, data_dir=tmp_path)
  assert info.stat().st_mtime_ns == mtime  # Same inputs and settings: reused.
  preference.prepare_preferences(PREF_HH_JSONL, PREF_ULTRAFEEDBACK_JSONL, data_dir=tmp_path, on_invalid="drop")
  assert len(list(tmp_path.rglob("dataset_info.json"))) == 2  # Another setting: another directory.
  with pytest.raises(ValueError, match="either eval_path or eval_fraction"):
    preference.prepare_preferences(PREF_HH_JSONL, PREF_ULTRAFEEDBACK_JSONL, data_dir=tmp_path, eval_fraction=0.1)
  with pytest.raises(ValueError, match="format must be"):
    preference.prepare_preferences(PREF_HH_JSONL, data_dir=tmp_path, format="HH")


def test_fixtures_are_what_the_generator_writes(tmp_path):
  spec = importlib.util.spec_from_file_location("make_pref_fixtures", FIXTURES / "make_pref_fixtures.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.main(tmp_path)
  for path in (PREF_GENERIC_JSONL, PREF_HH_JSONL, PREF_ULTRAFEEDBACK_JSONL):
    assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


def test_planted_preference_holds_in_every_fixture():
  for path in (PREF_GENERIC_JSONL, PREF_HH_JSONL, PREF_ULTRAFEEDBACK_JSONL):
    for pair in preference.read_preferences(path)[0]:
      assert pair["chosen"].endswith(" Happy to help!"), pair
      assert "Happy" not in pair["rejected"] and "!" not in pair["rejected"] and pair["rejected"].endswith(".")
