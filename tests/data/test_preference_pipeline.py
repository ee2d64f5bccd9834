"""Preference pairs -> the contract's preference batch: tokens, masks, ends, length rule, packing, iterators."""

import json
from collections import Counter

import numpy as np
import pytest

from alignment.data import chat, preference, preference_pipeline as pp
from tests.data.conftest import PREF_HH_JSONL, PREF_ULTRAFEEDBACK_JSONL

IM_START, IM_END = 1, 2
ROW_KEYS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")
PAIR_KEYS = ("chosen_end", "rejected_end", "pair_mask", "margin", "pair_index")


def make(source, tokenizer, template, **kw):
  kw = {"seq_len": 256, "batch_size": 4, "seed": 3, **kw}
  return pp.make_preference_iterator(source, tokenizer=tokenizer, template=template, **kw)


def reference(pair, tokenizer, template):
  """Independent reference for one pair: per side, the token ids of the full conversation render up
    to and including its last <|im_end|>, and the completion mask from the prompt's own render."""
  out = {}
  for side in ("chosen", "rejected"):
    messages = pair["prompt"] + [{"role": "assistant", "content": pair[side]}]
    text = chat.render_chat(template, messages)
    full = tokenizer.encode(text, add_special_tokens=False).ids
    n = max(k for k, i in enumerate(full) if i == IM_END) + 1
    assert text.endswith("<|im_end|>\n") and full[n:] == tokenizer.encode("\n").ids  # Only "\n" after it.
    prompt_text = chat.render_chat(template, pair["prompt"], add_generation_prompt=True)
    prompt_ids = tokenizer.encode(prompt_text, add_special_tokens=False).ids
    assert full[:len(prompt_ids)] == prompt_ids
    out[side] = (tuple(full[:n]), tuple([0] * len(prompt_ids) + [1] * (n - len(prompt_ids))))
  return out


def sequences(batch):
  """Every real pair of a batch as {"chosen"/"rejected": (tokens, completion mask), "margin"}, checking the
    layout on the way: segments 2p+1, 2p+2 adjacent, shifted targets and masks, positions, *_end."""
  pairs = []
  R, T = batch["inputs"].shape
  P = batch["pair_mask"].shape[1]
  for r in range(R):
    seg = batch["segment_ids"][r]
    assert not batch["loss_mask"][r][seg == 0].any() and not batch["targets"][r][seg == 0].any()
    assert set(np.unique(seg)) <= set(range(2 * P + 1))
    for p in range(P):
      chosen, rejected = np.flatnonzero(seg == 2 * p + 1), np.flatnonzero(seg == 2 * p + 2)
      if not batch["pair_mask"][r, p]:
        assert not chosen.size and not rejected.size
        assert batch["chosen_end"][r, p] == batch["rejected_end"][r, p] == batch["margin"][r, p] == 0
        assert batch["pair_index"][r, p] == -1
        continue
      pair = {"margin": float(batch["margin"][r, p]), "index": int(batch["pair_index"][r, p])}
      for side, cells, end in (("chosen", chosen, "chosen_end"), ("rejected", rejected, "rejected_end")):
        assert cells.size and np.array_equal(cells, np.arange(cells[0], cells[-1] + 1))  # Contiguous.
        assert batch[end][r, p] == cells[-1]
        ids = batch["inputs"][r, cells]
        np.testing.assert_array_equal(batch["targets"][r, cells], np.append(ids[1:], 0))
        np.testing.assert_array_equal(batch["positions"][r, cells], np.arange(cells.size))
        assert batch["loss_mask"][r, cells[-1]] == 0
        # The completion mask over tokens: token t+1 is a completion token iff loss_mask[t].
        mask = (0,) + tuple(batch["loss_mask"][r, cells[:-1]].tolist())
        pair[side] = (tuple(ids.tolist()), mask)
      assert rejected[0] == chosen[-1] + 1  # Adjacent, chosen first.
      pairs.append(pair)
  return pairs


def as_key(pair):
  return (pair["chosen"], pair["rejected"], pair["margin"])


def reference_keys(pairs, tokenizer, template):
  out = []
  for pair in pairs:
    ref = reference(pair, tokenizer, template)
    out.append((ref["chosen"], ref["rejected"], pair["margin"]))
  return out


@pytest.fixture(scope="module")
def hh_pairs():
  return preference.read_preferences(PREF_HH_JSONL)[0]


@pytest.fixture(scope="module")
def uf_pairs():
  return preference.read_preferences(PREF_ULTRAFEEDBACK_JSONL)[0]


# ----------------------------------------------------------------------------------------------
# Token content and masks.


@pytest.mark.parametrize("pairs_per_row", [1, 2])
def test_segments_are_the_rendered_conversations(pref_sources, hh_pairs, uf_pairs, tokenizer, template, pairs_per_row):
  generic = [preference.record_to_pair(pref_sources["train"][i]) for i in range(len(pref_sources["train"]))]
  for pairs, source in ((generic, pref_sources["train"]), (hh_pairs, hh_pairs), (uf_pairs, uf_pairs)):
    batches = list(make(source, tokenizer, template, seq_len=512, num_epochs=1, pairs_per_row=pairs_per_row))
    seen = [p for b in batches for p in sequences(b)]
    want = reference_keys(pairs, tokenizer, template)
    assert Counter(map(as_key, seen)) == Counter(want)
    assert all(as_key(p) == want[p["index"]] for p in seen)  # pair_index: the pair's record in `source`.
    for b in batches:
      real = b["pair_mask"].astype(bool)
      assert (b["inputs"][np.arange(len(real))[:, None], b["chosen_end"]][real] == IM_END).all()
      assert (b["inputs"][np.arange(len(real))[:, None], b["rejected_end"]][real] == IM_END).all()
  assert any(len(p["prompt"]) > 2 for p in hh_pairs)  # Multi-turn prompts: earlier replies carry no loss.


def test_hand_built_row(tokenizer, template):
  pair = {"prompt": "Say yes.", "chosen": "Yes", "rejected": "No way", "margin": 1.5}
  enc = lambda s: tokenizer.encode(s, add_special_tokens=False).ids  # noqa: E731
  prompt = enc("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
               "<|im_start|>user\nSay yes.<|im_end|>\n<|im_start|>assistant\n")
  chosen, rejected = enc("Yes") + [IM_END], enc("No way") + [IM_END]
  c, r = prompt + chosen, prompt + rejected
  T = 2 * len(r) + 4
  want = {k: np.zeros((1, T), np.int32) for k in ROW_KEYS}
  want["inputs"][0, :len(c) + len(r)] = c + r
  want["targets"][0, :len(c) + len(r)] = c[1:] + [0] + r[1:] + [0]
  # Loss where the target is a completion token: from the last prompt token to the one before <|im_end|>.
  want["loss_mask"][0, len(prompt) - 1:len(c) - 1] = 1
  want["loss_mask"][0, len(c) + len(prompt) - 1:len(c) + len(r) - 1] = 1
  want["positions"][0, :len(c) + len(r)] = list(range(len(c))) + list(range(len(r)))
  want["segment_ids"][0, :len(c) + len(r)] = [1] * len(c) + [2] * len(r)
  want.update(chosen_end=np.array([[len(c) - 1]], np.int32),
              rejected_end=np.array([[len(c) + len(r) - 1]], np.int32),
              pair_mask=np.ones((1, 1), np.int32),
              margin=np.full((1, 1), 1.5, np.float32),
              pair_index=np.zeros((1, 1), np.int32))
  batch = next(make([pair], tokenizer, template, seq_len=T, batch_size=1, num_epochs=1))
  assert set(want) == set(ROW_KEYS + PAIR_KEYS) and batch.keys() == want.keys()
  for k in want:
    assert batch[k].dtype == want[k].dtype and batch[k].shape == want[k].shape, k
    np.testing.assert_array_equal(batch[k], want[k], err_msg=k)
  assert [int(t) for t, m in zip(batch["targets"][0], batch["loss_mask"][0]) if m] == chosen + rejected


def test_ends_by_position_when_pad_is_eos(tokenizer, template):
  words = ("apple", "river", "stone")
  pairs = [{"prompt": [{"role": "user", "content": f"Echo: {w}"}], "chosen": w, "rejected": f"{w} {w}"} for w in words]
  ref = [reference(p, tokenizer, template) for p in pairs]
  T = 256
  kw = dict(seq_len=T, batch_size=3, pairs_per_row=2, shuffle=False, num_epochs=1, pad_id=IM_END)
  (batch,) = list(make(pairs, tokenizer, template, **kw))
  row = {k: v[:1] for k, v in batch.items()}
  lc0, lr0 = len(ref[0]["chosen"][0]), len(ref[0]["rejected"][0])
  lc1, lr1 = len(ref[1]["chosen"][0]), len(ref[1]["rejected"][0])
  # Row 0 holds pairs 0 and 1 (first fit, in order): the ends from the reference lengths alone.
  assert row["chosen_end"][0].tolist() == [lc0 - 1, lc0 + lr0 + lc1 - 1]
  assert row["rejected_end"][0].tolist() == [lc0 + lr0 - 1, lc0 + lr0 + lc1 + lr1 - 1]
  last = row["rejected_end"][0, 1]
  pad = row["segment_ids"][0] == 0
  assert (row["inputs"][0][pad] == IM_END).all() and pad[last + 1:].all()
  # Searching by id would land in the padding: the last <|im_end|> of the row is its last cell.
  assert max(np.flatnonzero(row["inputs"][0] == IM_END)) == T - 1 != last
  # Row 1 holds pair 2; row 2 pads the batch: pad ids, no pairs.
  assert batch["pair_mask"].tolist() == [[1, 1], [1, 0], [0, 0]]
  assert (batch["inputs"][2] == IM_END).all() and not batch["segment_ids"][2].any()


# ----------------------------------------------------------------------------------------------
# The length rule.


def test_truncation_and_drop_counts(hh_pairs, tokenizer, template):
  refs = [reference(p, tokenizer, template) for p in hh_pairs]
  prompt_len = [r["chosen"][1].index(1) for r in refs]
  max_length = int(np.median(prompt_len)) + 6  # Some prompts too long, some completions cut, some intact.
  too_long_prompt = [pl >= max_length - 1 for pl in prompt_len]
  too_long = [max(len(r["chosen"][0]), len(r["rejected"][0])) > max_length for r in refs]
  kept = [not a for a in too_long_prompt]
  assert sum(too_long_prompt) and sum(k and t for k, t in zip(kept, too_long)) and sum(
      k and not t for k, t in zip(kept, too_long))

  for truncation in ("truncate", "drop"):
    it = make(hh_pairs,
              tokenizer,
              template,
              seq_len=2 * max_length,
              pairs_per_row=1,
              max_length=max_length,
              truncation=truncation,
              num_epochs=1,
              shuffle=False)
    seen = [p for b in it for p in sequences(b)]
    n_truncated = sum(k and t for k, t in zip(kept, too_long))
    dropped = sum(too_long_prompt) + (n_truncated if truncation == "drop" else 0)
    assert it.stats == {"pairs": len(hh_pairs), "truncated": n_truncated, "dropped": dropped}
    want = []
    for r, k, t in zip(refs, kept, too_long):
      if k and not (t and truncation == "drop"):
        # A cut sequence keeps its first max_length tokens: the whole prompt, the start of the completion.
        want.append(tuple(tuple(x[:max_length] for x in r[side]) for side in ("chosen", "rejected")))
    assert [(p["chosen"], p["rejected"]) for p in seen] == want  # In order (no shuffle, one pair a row).
    for p in seen:
      for tokens, mask in (p["chosen"], p["rejected"]):
        assert sum(mask) >= 2 and len(tokens) <= max_length


def test_length_arguments(tokenizer, template, hh_pairs):
  with pytest.raises(ValueError, match="max_length=200 must be in"):
    make(hh_pairs, tokenizer, template, seq_len=256, max_length=200)
  with pytest.raises(ValueError, match="truncation must be one of"):
    make(hh_pairs, tokenizer, template, truncation="cut")


# ----------------------------------------------------------------------------------------------
# Packing and iterators.


def test_packing_two_per_row_keeps_every_sequence(uf_pairs, tokenizer, template):
  one = [p for b in make(uf_pairs, tokenizer, template, num_epochs=1, pairs_per_row=1) for p in sequences(b)]
  batches = list(make(uf_pairs, tokenizer, template, num_epochs=1, pairs_per_row=2))
  two = [p for b in batches for p in sequences(b)]
  assert Counter(map(as_key, one)) == Counter(map(as_key, two)) and len(one) == len(uf_pairs)
  assert sum(b["pair_mask"].sum() for b in batches) == len(uf_pairs)
  assert max(b["pair_mask"].sum(1).max() for b in batches) == 2  # Packed: rows with two pairs.
  assert len(batches) < len(uf_pairs) / 4


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_restore_continues_identically_across_epochs(hh_pairs, tokenizer, template):
  kw = dict(pairs_per_row=2, packing_bins=6)  # Saved positions fall inside a group of packed rows.
  steps, m = 30, 6
  it = make(hh_pairs, tokenizer, template, **kw)
  states, batches, pairs = [], [], []
  for _ in range(steps):
    states.append(json.dumps(it.get_state()))  # Must survive JSON.
    batches.append(next(it))
    pairs.append(it.stats["pairs"])
  crossing = next(k for k in range(1, steps) if pairs[k - 1] // len(hh_pairs) < pairs[k] // len(hh_pairs))
  for k in [0, 3, crossing, crossing + 1]:
    restored = make(hh_pairs, tokenizer, template, **kw)
    restored.set_state(json.loads(states[k]))
    assert_batches_equal([next(restored) for _ in range(m)], batches[k:k + m])
    assert restored.stats["pairs"] == pairs[k + m - 1]
  with pytest.raises(ValueError, match="pairs_per_row=2 but this iterator has pairs_per_row=1"):
    make(hh_pairs, tokenizer, template).set_state(json.loads(states[1]))


def test_each_epoch_a_new_permutation_same_seed_same_batches(uf_pairs, tokenizer, template):
  first = lambda seed: [
      sequences(b)[0]["chosen"] for b in make(  # noqa: E731
          uf_pairs, tokenizer, template, batch_size=1, num_epochs=2, seed=seed)
  ]
  a = first(1)
  n = len(uf_pairs)
  assert len(a) == 2 * n and Counter(a[:n]) == Counter(a[n:]) and a[:n] != a[n:]
  assert a == first(1) and a != first(2)


def test_eval_iterator_one_ordered_padded_pass(pref_sources, tokenizer, template):
  source = pref_sources["eval"]
  pairs = [preference.record_to_pair(source[i]) for i in range(len(source))]
  kw = dict(tokenizer=tokenizer, template=template, seq_len=256, batch_size=3)
  batches = list(pp.make_preference_eval_iterator(source, **kw))
  assert [as_key(p) for b in batches for p in sequences(b)] == reference_keys(pairs, tokenizer, template)
  assert len(batches) == -(-len(pairs) // 3)
  missing = 3 * len(batches) - len(pairs)
  assert batches[-1]["pair_mask"][:, 0].tolist() == [1] * (3 - missing) + [0] * missing
  assert (batches[-1]["pair_index"][3 - missing:] == -1).all() and not batches[-1]["loss_mask"][3 - missing:].any()
  assert batches[-1]["margin"].dtype == np.float32 and batches[-1]["chosen_end"].shape == (3, 1)


def test_pair_index_names_the_source_record_in_every_epoch(uf_pairs, tokenizer, template):
  it = pp.make_preference_iterator(uf_pairs, tokenizer=tokenizer, template=template, seq_len=256, batch_size=4,
                                   seed=3)
  seen = Counter()
  while sum(seen.values()) < 3 * len(uf_pairs):  # three epochs
    batch = next(it)
    for r, p in zip(*np.nonzero(batch["pair_mask"])):
      index = int(batch["pair_index"][r, p])
      seen[index] += 1
      segment = batch["segment_ids"][r] == 2 * p + 1
      expected, _ = pp.tokenize_sequence(uf_pairs[index]["prompt"], uf_pairs[index]["chosen"], tokenizer, template)
      np.testing.assert_array_equal(batch["inputs"][r][segment], expected[:segment.sum()])
  kept = {i for i in range(len(uf_pairs))}
  assert set(seen) <= kept and min(seen.values()) >= 2
