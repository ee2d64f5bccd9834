"""The per-host grain iterators: batch format, checkpoint/restore, host sharding, epochs, eval."""

import json
from collections import Counter

import numpy as np
import pytest

from alignment.data import chat, packing, pipeline, sft


@pytest.fixture(scope="module")
def train(sources):
  return sources["train"]


@pytest.fixture(scope="module")
def tokenized(train, tokenizer, template):
  """Each record's (ids, loss_mask), tokenized directly, as the reference."""
  return [
      chat.tokenize_conversation(sft.record_to_messages(train[i]), tokenizer, template)
      for i in range(len(train))
  ]


def make(source, tokenizer, template, **kw):
  kw = {"seq_len": 64, "batch_size": 4, "seed": 3, **kw}
  return pipeline.make_sft_iterator(source, tokenizer=tokenizer, template=template, **kw)


def segments(batch):
  """Every segment of a batch as (token sequence, loss mask over its targets)."""
  out = []
  for r in range(batch["inputs"].shape[0]):
    for s in range(1, batch["segment_ids"][r].max() + 1):
      sel = batch["segment_ids"][r] == s
      seq = batch["inputs"][r][sel].tolist() + [int(batch["targets"][r][sel][-1])]
      out.append((tuple(seq), tuple(batch["loss_mask"][r][sel].tolist())))
  return out


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batch_format_and_content(train, tokenizer, template, tokenized):
  T = 128
  it = make(train, tokenizer, template, seq_len=T)
  reference = {}
  for ids, mask in tokenized:
    reference[tuple(ids[:T + 1].tolist())] = tuple(mask[1:T + 1].tolist())
  n_segments = 0
  for _ in range(10):
    batch = next(it)
    assert set(batch) == set(packing.FEATURES)
    assert all(v.shape == (4, T) and v.dtype == np.int32 for v in batch.values())
    pad = batch["segment_ids"] == 0
    assert not (batch["loss_mask"][pad].any() or batch["inputs"][pad].any() or batch["positions"][pad].any())
    assert batch["loss_mask"].sum() > 0
    for seq, loss in segments(batch):
      # Each segment is the first <= T+1 tokens of some record, with its assistant mask.
      assert reference[seq] == loss
      n_segments += 1
  assert n_segments > 1.5 * 40  # Packed: several conversations per row (40 rows).
  assert it.stats["examples"] >= n_segments and it.stats["truncated"] > 0


@pytest.mark.parametrize("pack, packing_bins", [(True, None), (True, 6), (False, None)])
def test_restore_continues_identically_across_epochs(train, tokenizer, template, pack, packing_bins):
  # packing_bins=6 with batches of 4: saved positions fall inside a group of packed rows.
  kw = dict(batch_size=4, pack=pack, packing_bins=packing_bins)
  steps, m = 80, 12
  it = make(train, tokenizer, template, **kw)
  states, batches, examples = [], [], []
  for _ in range(steps):
    states.append(json.dumps(it.get_state()))  # Must survive JSON.
    batches.append(next(it))
    examples.append(it.stats["examples"])
  # Steps whose batch crosses into the next epoch.
  crossings = [k for k in range(1, steps) if examples[k - 1] // len(train) < examples[k] // len(train)]
  assert len(crossings) >= 2, examples[-1]
  for k in [0, 5, crossings[0] - 1, crossings[0], crossings[1]]:
    restored = make(train, tokenizer, template, **kw)
    restored.set_state(json.loads(states[k]))
    n = min(m, steps - k)
    assert_batches_equal([next(restored) for _ in range(n)], batches[k:k + n])
    assert restored.stats["examples"] == examples[k + n - 1]
    if k + n < steps:
      assert restored.get_state() == json.loads(states[k + n])


def test_same_seed_same_batches_other_seed_other(train, tokenizer, template):
  a = [next(it) for it in [make(train, tokenizer, template, seed=1)] for _ in range(3)]
  b = [next(it) for it in [make(train, tokenizer, template, seed=1)] for _ in range(3)]
  c = [next(it) for it in [make(train, tokenizer, template, seed=2)] for _ in range(3)]
  assert_batches_equal(a, b)
  assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c))


def test_each_epoch_is_a_new_permutation(train, tokenizer, template, tokenized):
  it = make(train, tokenizer, template, seq_len=512, batch_size=1, pack=False, num_epochs=2)
  order = [segments(b)[0][0] for b in it]  # Finite: stops after two epochs.
  n = len(train)
  assert len(order) == 2 * n
  everything = Counter(tuple(ids.tolist()) for ids, _ in tokenized)
  assert Counter(order[:n]) == everything and Counter(order[n:]) == everything
  assert order[:n] != order[n:]
  assert order[:n] != [tuple(ids.tolist()) for ids, _ in tokenized]  # Shuffled at all.


def test_finite_run_pads_its_last_batch(train, tokenizer, template):
  batches = list(make(train, tokenizer, template, seq_len=512, batch_size=5, pack=False, num_epochs=1))
  assert len(batches) == -(-len(train) // 5)
  last = batches[-1]
  real = len(train) % 5
  assert last["inputs"].shape == (5, 512)
  assert (last["segment_ids"][:real].max(1) == 1).all() and not last["segment_ids"][real:].any()
  assert not last["loss_mask"][real:].any()


@pytest.mark.parametrize("pack", [False, True])
def test_eval_iterator_one_ordered_pass(sources, tokenizer, template, pack):
  source = sources["eval"]
  kw = dict(tokenizer=tokenizer, template=template, seq_len=512, batch_size=3, pack=pack)
  first = list(pipeline.make_eval_iterator(source, **kw))
  again = list(pipeline.make_eval_iterator(source, **kw))
  assert_batches_equal(first, again)
  seen = [seq for b in first for seq, _ in segments(b)]
  expected = [
      tuple(chat.tokenize_conversation(sft.record_to_messages(source[i]), tokenizer, template)[0].tolist())
      for i in range(len(source))
  ]
  if pack:
    assert Counter(seen) == Counter(expected)
  else:
    assert seen == expected  # File order.
    assert len(first) == -(-len(source) // 3)
    assert not first[-1]["segment_ids"][-2:].any()  # 16 records in batches of 3: 2 padding rows.


def test_set_state_rejects_another_configuration(train, tokenizer, template):
  state = make(train, tokenizer, template, seed=1).get_state()
  with pytest.raises(ValueError, match="seed=1 but this iterator has seed=2"):
    make(train, tokenizer, template, seed=2).set_state(state)
  with pytest.raises(ValueError, match="batch_size=4 but this iterator has batch_size=2"):
    make(train, tokenizer, template, seed=1, batch_size=2).set_state(state)


def test_in_memory_sources(tokenizer, template):
  rows = [{"prompt": f"Echo: {w}", "completion": w} for w in ("apple", "river", "stone")]
  rows.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
  batch = next(make(rows, tokenizer, template, seq_len=128, batch_size=2))
  assert batch["segment_ids"].max() >= 2 and batch["loss_mask"].sum() > 0
