"""Packing against a plain-Python re-derivation of the row format and of first-fit."""

import random
from collections import Counter

import numpy as np
import pytest

from alignment.data import packing


def random_examples(n, seed, max_len=30):
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    length = rng.randint(1, max_len)
    ids = [rng.randint(3, 511) for _ in range(length)]
    # A prompt part without loss, then an answer with loss; some have no answer at all.
    cut = rng.randint(0, length)
    mask = [0] * cut + [1] * (length - cut)
    if rng.random() < 0.1:
      mask = [0] * length
    out.append((ids, mask))
  return out


def reference_segment(ids, mask, T):
  """Plain Python: the (inputs, targets, loss) cells one example fills, or None to drop."""
  ids, mask = list(ids)[:T + 1], list(mask)[:T + 1]
  inputs = ids[:-1]
  targets = [ids[t + 1] for t in range(len(ids) - 1)]
  loss = [mask[t + 1] for t in range(len(ids) - 1)]
  return (inputs, targets, loss) if any(loss) else None


def reference_first_fit(examples, T, num_bins):
  """Plain Python first-fit: rows as lists of segments, plus counts."""
  rows, bins = [], []
  counts = Counter(examples=0, truncated=0, dropped=0)
  for ids, mask in examples:
    counts["examples"] += 1
    counts["truncated"] += len(ids) > T + 1
    seg = reference_segment(ids, mask, T)
    if seg is None:
      counts["dropped"] += 1
      continue
    n = len(seg[0])
    for b in bins:
      if sum(len(s[0]) for s in b) + n <= T:
        b.append(seg)
        break
    else:
      if len(bins) < num_bins:
        bins.append([seg])
      else:
        rows += bins
        bins = [[seg]]
  return rows + bins, dict(counts)


def reference_row(segments, T):
  row = {k: [0] * T for k in packing.FEATURES}
  t = 0
  for s, (inputs, targets, loss) in enumerate(segments, start=1):
    for p in range(len(inputs)):
      row["inputs"][t], row["targets"][t], row["loss_mask"][t] = inputs[p], targets[p], loss[p]
      row["positions"][t], row["segment_ids"][t] = p, s
      t += 1
  return row


@pytest.mark.parametrize("T, num_bins, seed", [(16, 1, 0), (16, 4, 1), (32, 8, 2), (7, 3, 3)])
def test_packed_rows_equal_plain_python(T, num_bins, seed):
  examples = random_examples(60, seed, max_len=2 * T)
  rows, counts = packing.pack_examples(examples, T, num_bins=num_bins)
  ref_rows, ref_counts = reference_first_fit(examples, T, num_bins)
  assert counts == ref_counts
  assert counts["truncated"] > 0 and counts["dropped"] > 0  # The cases are exercised.
  assert rows["inputs"].shape == (len(ref_rows), T)
  for k in packing.FEATURES:
    assert rows[k].dtype == np.int32
    np.testing.assert_array_equal(rows[k], [reference_row(r, T)[k] for r in ref_rows], err_msg=k)


def test_packed_row_invariants():
  """Invariants that hold whatever the placement: next token within a segment, fresh positions."""
  T = 24
  examples = random_examples(80, seed=7)
  rows, _ = packing.pack_examples(examples, T, num_bins=5)
  kept = Counter()
  for ids, mask in examples:
    seg = reference_segment(ids, mask, T)
    if seg is not None:
      kept[tuple(map(tuple, seg))] += 1
  found = Counter()
  for r in range(len(rows["inputs"])):
    seg_ids = rows["segment_ids"][r]
    n_seg = seg_ids.max()
    assert np.all(np.diff(seg_ids[seg_ids > 0]) >= 0)  # Contiguous, in order.
    assert np.all(seg_ids[np.argmax(seg_ids == 0):] == 0) if (seg_ids == 0).any() else True
    assert set(np.unique(seg_ids[seg_ids > 0])) == set(range(1, n_seg + 1))
    pad = seg_ids == 0
    for k in ("inputs", "targets", "loss_mask", "positions"):
      assert not rows[k][r][pad].any()
    for s in range(1, n_seg + 1):
      sel = seg_ids == s
      inputs, targets = rows["inputs"][r][sel], rows["targets"][r][sel]
      np.testing.assert_array_equal(rows["positions"][r][sel], np.arange(sel.sum()))
      np.testing.assert_array_equal(targets[:-1], inputs[1:])  # Next token, same segment.
      found[(tuple(inputs.tolist()), tuple(targets.tolist()), tuple(rows["loss_mask"][r][sel].tolist()))] += 1
  assert found == kept


def test_unpacked_rows_and_truncation_rule():
  T = 5
  examples = [
      ([10, 11, 12], [0, 1, 1]),  # short: padded
      ([10, 11, 12, 13, 14, 15], [0, 0, 0, 0, 1, 1]),  # exactly T+1: not truncated
      ([10, 11, 12, 13, 14, 15, 16], [0, 0, 1, 1, 1, 1, 1]),  # T+2: keeps its first T+1 tokens
      ([10, 11, 12, 13, 14, 15, 16, 17], [0] * 6 + [1, 1]),  # loss only beyond T+1: dropped
      ([10], [1]),  # one token: nothing to predict, dropped
      ([10, 11], [1, 0]),  # loss only on the first token: dropped
  ]
  rows, counts = packing.pack_examples(examples, T, pack=False)
  assert counts == {"examples": 6, "truncated": 2, "dropped": 3}
  np.testing.assert_array_equal(rows["inputs"],
                                [[10, 11, 0, 0, 0], [10, 11, 12, 13, 14], [10, 11, 12, 13, 14]])
  np.testing.assert_array_equal(rows["targets"],
                                [[11, 12, 0, 0, 0], [11, 12, 13, 14, 15], [11, 12, 13, 14, 15]])
  np.testing.assert_array_equal(rows["loss_mask"], [[1, 1, 0, 0, 0], [0, 0, 0, 1, 1], [0, 1, 1, 1, 1]])
  np.testing.assert_array_equal(rows["positions"], [[0, 1, 0, 0, 0], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]])
  np.testing.assert_array_equal(rows["segment_ids"], [[1, 1, 0, 0, 0], [1] * 5, [1] * 5])


def test_unpacked_equals_plain_python():
  T = 12
  examples = random_examples(40, seed=11)
  rows, counts = packing.pack_examples(examples, T, pack=False)
  ref = [reference_segment(i, m, T) for i, m in examples]
  ref = [reference_row([s], T) for s in ref if s is not None]
  assert counts["examples"] == 40 and counts["dropped"] == 40 - len(ref)
  for k in packing.FEATURES:
    np.testing.assert_array_equal(rows[k], [r[k] for r in ref], err_msg=k)


def test_stack_and_pad():
  row = packing.pad_row(
      {
          "inputs": np.array([5, 6]),
          "targets": np.array([6, 7]),
          "loss_mask": np.array([0, 1])
      }, 4)
  batch = packing.stack_and_pad([row], 3)
  assert all(v.shape == (3, 4) and v.dtype == np.int32 for v in batch.values())
  assert not any(batch[k][1:].any() for k in packing.FEATURES)
  np.testing.assert_array_equal(batch["targets"][0], [6, 7, 0, 0])
