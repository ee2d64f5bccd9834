"""Data filters on constructed corpora: exactly the planted duplicates, near-duplicates and junk go."""

import json
import math

import numpy as np
import pytest

from alignment import choices
from alignment.data import filters, preference, sft
from configs import common
from tests.data.conftest import MESSAGES_JSONL, PROMPT_COMPLETION_JSONL

VOCAB = [f"w{i}" for i in range(2000)]


def _text(rng, n=60):
  return " ".join(rng.choice(VOCAB, n))


def _edit(rng, text, k):
  """`text` with k of its words (at distinct positions) replaced by words outside VOCAB."""
  words = text.split()
  for j, i in enumerate(rng.choice(len(words), k, replace=False)):
    words[i] = f"edit{j}"
  return " ".join(words)


def _shingle_jaccard(a, b, n=3):
  """Exact Jaccard of n-word shingle sets, written without the module's helpers."""
  def grams(t):
    w = t.split()
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}
  ga, gb = grams(a), grams(b)
  return len(ga & gb) / len(ga | gb)


def _corpus():
  """(rows, {kind: indices planted}) : distinct texts, then copies, near copies, far edits and junk."""
  rng = np.random.default_rng(0)
  base = [_text(rng) for _ in range(40)]
  rows, planted = list(base), {"exact": [], "near": [], "far": [], "junk": {}}
  for i in range(10):  # the same text, re-cased and re-punctuated
    rows.append(base[i].upper().replace(" ", " , ", 3) + " .")
    planted["exact"].append(len(rows) - 1)
  for i in range(10, 20):  # two words of 60 changed: shingle Jaccard ~0.82-0.9
    rows.append(_edit(rng, base[i], 2))
    assert _shingle_jaccard(rows[-1], base[i]) > 0.8
    planted["near"].append(len(rows) - 1)
  for i in range(20, 30):  # twelve words changed: well below the threshold
    rows.append(_edit(rng, base[i], 12))
    assert _shingle_jaccard(rows[-1], base[i]) < 0.5
    planted["far"].append(len(rows) - 1)
  junk = {
      "length": [""],
      "non_text": ["\x00\x01\x02 ### ~~~ \x03\x04 |||| ^^^^ {{{{ }}}}", " ".join(["1234"] * 20 + ["§¶•"] * 40)],
      "symbols": [" ".join(VOCAB[j] + ("..." if j % 4 == 0 else "") for j in range(60))],
      "repetition": ["\n".join(["buy now and save"] * 8 + [_text(rng, 30)]),
                     " ".join(["click here"] * 30 + [_text(rng, 20)])],
  }
  for reason, texts in junk.items():
    for t in texts:
      rows.append(t)
      planted["junk"].setdefault(reason, []).append(len(rows) - 1)
  return rows, planted


def _options(apply, **kw):
  return filters.options_from_config({"apply": apply, **kw})


def test_each_filter_removes_exactly_what_was_planted():
  rows, planted = _corpus()
  kept, removed = filters.filter_splits({"train": list(enumerate(rows))}, _options("quality,exact_dedup,near_dedup"),
                                        text=lambda r: r[1])
  gone = set(range(len(rows))) - {i for i, _ in kept["train"]}
  junk = {i for ids in planted["junk"].values() for i in ids}
  assert gone == junk | set(planted["exact"]) | set(planted["near"])
  for reason in filters.QUALITY_REASONS:
    assert removed[f"quality/{reason}"] == {"train": len(planted["junk"].get(reason, []))}, reason
  assert removed["exact_dedup"] == {"train": 10}
  assert removed["near_dedup"] == {"train": 10}
  # Each filter alone: exact dedup keeps the near copies; quality removes no ordinary text.
  only_exact, _ = filters.filter_splits({"train": rows}, _options("exact_dedup"), text=str)
  blank = planted["junk"]["non_text"][0]  # no word characters: the same normalised text as the empty row
  assert only_exact["train"] == [t for i, t in enumerate(rows) if i not in planted["exact"] and i != blank]
  only_quality, _ = filters.filter_splits({"train": rows[:70]}, _options("quality"), text=str)
  assert only_quality["train"] == rows[:70]


def test_the_first_of_each_duplicate_set_is_kept_and_eval_loses_what_train_has():
  rows, planted = _corpus()
  train, evals = rows[:40], [rows[i] for i in planted["exact"] + planted["near"] + planted["far"]]
  kept, removed = filters.filter_splits({"train": train, "eval": evals}, _options("exact_dedup,near_dedup"), text=str)
  assert kept["train"] == train
  assert kept["eval"] == [rows[i] for i in planted["far"]]
  assert removed == {"exact_dedup": {"train": 0, "eval": 10}, "near_dedup": {"train": 0, "eval": 10}}
  # A lower threshold takes the far edits too (twelve edits of 60 words leave a Jaccard of at least 22/94).
  _, loose = filters.filter_splits({"train": train, "eval": evals}, _options("near_dedup", near_threshold=0.2),
                                   text=str)
  assert loose["near_dedup"]["eval"] == 30


@pytest.mark.parametrize("target", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_minhash_estimates_the_exact_jaccard(target):
  num_perm, size = 256, 400
  shared = round(2 * size * target / (1 + target))  # |A & B| for two sets of `size` with Jaccard `target`
  a = {f"a{i}" for i in range(size)}
  b = {f"a{i}" for i in range(shared)} | {f"b{i}" for i in range(size - shared)}
  exact = len(a & b) / len(a | b)
  assert exact == pytest.approx(filters.jaccard(frozenset(a), frozenset(b)))
  estimate = filters.minhash(a, num_perm).jaccard(filters.minhash(b, num_perm))
  # The estimate is a mean of num_perm Bernoulli(J) draws: 4 standard deviations (and a slot's rounding).
  assert abs(estimate - exact) <= 4 * math.sqrt(exact * (1 - exact) / num_perm) + 1 / num_perm


def test_ordinary_chat_data_passes_the_quality_rules():
  for path in (MESSAGES_JSONL, PROMPT_COMPLETION_JSONL):
    for conversation in sft.read_conversations(path):
      assert filters.quality_reason(sft.conversation_text(conversation)) is None, conversation


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def test_prepared_sft_data_records_what_each_filter_removed(tmp_path):
  rows, planted = _corpus()
  records = [{"messages": [{"role": "user", "content": "Go on."}, {"role": "assistant", "content": t}]}
             for t in rows if t]
  train = _write_jsonl(tmp_path / "train.jsonl", records)
  plain = sft.prepare_sft(train, data_dir=tmp_path / "tfds")
  assert len(plain["train"]) == len(records)
  options = _options("quality,exact_dedup,near_dedup")
  sources = sft.prepare_sft(train, data_dir=tmp_path / "tfds", filters=options, eval_fraction=0.1)
  counts = sources["train"].dataset_info.metadata["filter_counts"]
  junk = sum(len(ids) for ids in planted["junk"].values()) - 1  # (the empty text made no row)
  assert counts["exact_dedup"] == {"train": 10} and counts["near_dedup"] == {"train": 10}
  assert sum(sum(c.values()) for k, c in counts.items() if k.startswith("quality/")) == junk
  assert len(sources["train"]) + len(sources["eval"]) == len(records) - 20 - junk
  again = sft.prepare_sft(train, data_dir=tmp_path / "tfds", filters=options, eval_fraction=0.1)
  assert len(again["train"]) == len(sources["train"])  # the same prepared variant, found again


def test_preference_dedup_compares_whole_pairs_and_quality_reads_the_chosen_answer(tmp_path):
  rng = np.random.default_rng(1)
  chosen, other = _text(rng), _text(rng)
  rows = [{"prompt": "Say something.", "chosen": chosen, "rejected": "#### ~~~~ ^^^^ |||| \x00\x01"},
          {"prompt": "Say something.", "chosen": chosen, "rejected": other},           # another pair: kept
          {"prompt": "Say something.", "chosen": chosen, "rejected": other},           # its copy: removed
          {"prompt": "Say more.", "chosen": "§¶• " * 30, "rejected": other}]          # junk chosen: removed
  path = _write_jsonl(tmp_path / "pairs.jsonl", rows)
  sources = preference.prepare_preferences(path, data_dir=tmp_path / "tfds",
                                           filters=_options("quality,exact_dedup"))
  pairs = [preference.record_to_pair(sources["train"][i]) for i in range(len(sources["train"]))]
  assert [p["rejected"] for p in pairs] == [rows[0]["rejected"], other]
  counts = sources["train"].dataset_info.metadata["filter_counts"]
  assert counts["exact_dedup"] == {"train": 1} and counts["quality/non_text"] == {"train": 1}


def test_bad_filter_settings_are_refused_naming_them():
  config = common.preference_data("pref_hh.jsonl")
  config.filters.apply = "quality,minhash"
  with pytest.raises(ValueError, match=r"config.data.filters.apply: unknown item 'minhash'"):
    choices.check_config({"data": config})
  with pytest.raises(ValueError, match=r"config.data.filters.near_treshold: unknown key"):
    filters.options_from_config({"apply": "near_dedup", "near_treshold": 0.5})
  with pytest.raises(ValueError, match=r"near_threshold=1.5"):
    filters.options_from_config({"apply": "near_dedup", "near_threshold": 1.5})
