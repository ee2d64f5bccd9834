"""From tokenized examples to fixed-length training rows (packed, or one example per row).

A tokenized example is `{"ids": int32 [L], "loss_mask": int32 [L]}` (from
`chat.tokenize_conversation`). A row of length T is a dict of five int32 [T] arrays:

    inputs[t]       token fed to the model at t
    targets[t]      the token after inputs[t] in the same example (segment)
    loss_mask[t]    1 iff targets[t] is a loss token (assistant content or end-of-turn), else 0
    positions[t]    position of inputs[t] within its example: 0, 1, ... restarting per segment
    segment_ids[t]  1, 2, ... for the examples packed in the row, in order; 0 for padding

Padding (segment 0) has inputs = targets = loss_mask = positions = 0. An example of L tokens fills
L-1 cells (inputs ids[:-1], targets ids[1:], loss mask[1:]), so a row never predicts across an
example boundary and attention must be masked by `segment_ids` (same segment, causal).

Truncation rule: an example longer than T+1 tokens keeps its first T+1 tokens (it then fills one
row exactly) and is counted as `truncated`. An example with no loss token left among its targets
(after truncation, or with fewer than 2 tokens) is skipped and counted as `dropped`.

Packing is grain's first-fit packer (`grain.experimental.FirstFitPackIterDataset`): it keeps
`num_bins` open rows, puts each example in the first row with room, and emits all rows when an
example fits nowhere. It checkpoints by replaying from the start of the current group of rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import grain
import numpy as np

FEATURES = ("inputs", "targets", "loss_mask", "positions", "segment_ids")
COUNTS_KEY = "sft_counts"  # Where a CountingMapDataset keeps its counters in an iterator's state.


def shift_example(ids, loss_mask, seq_len: int) -> tuple[dict[str, np.ndarray] | None, bool]:
  """Turns one tokenized example into next-token `inputs/targets/loss_mask` of length <= seq_len.

    Returns `(example_or_None, truncated)`: None when no target is a loss token (drop it);
    `truncated` when the example had more than `seq_len + 1` tokens.
    """
  ids = np.asarray(ids, np.int32)
  loss_mask = np.asarray(loss_mask, np.int32)
  if ids.shape != loss_mask.shape or ids.ndim != 1:
    raise ValueError(f"ids and loss_mask must be equal-length vectors, got {ids.shape} and {loss_mask.shape}")
  truncated = len(ids) > seq_len + 1
  ids, loss_mask = ids[:seq_len + 1], loss_mask[:seq_len + 1]
  if len(ids) < 2 or not loss_mask[1:].any():
    return None, truncated
  return {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": loss_mask[1:]}, truncated


def pad_row(example: Mapping[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
  """One shifted example -> one row of length seq_len (unpacked mode): segment 1, then padding."""
  n = len(example["inputs"])
  row = {k: np.zeros(seq_len, np.int32) for k in FEATURES}
  for k in ("inputs", "targets", "loss_mask"):
    row[k][:n] = example[k]
  row["positions"][:n] = np.arange(n, dtype=np.int32)
  row["segment_ids"][:n] = 1
  return row


def empty_rows(batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
  """An all-padding batch [batch_size, seq_len] (segment 0, loss 0)."""
  return {k: np.zeros((batch_size, seq_len), np.int32) for k in FEATURES}


def stack_and_pad(rows, batch_size: int) -> dict[str, np.ndarray]:
  """Stacks rows into [batch_size, T] arrays, filling missing rows (the last batch) with padding."""
  batch = {k: np.stack([r[k] for r in rows]).astype(np.int32) for k in FEATURES}
  missing = batch_size - len(rows)
  if missing:
    batch = {k: np.concatenate([v, np.zeros((missing, v.shape[1]), np.int32)]) for k, v in batch.items()}
  return batch


class _CountingMapIterator(grain.DatasetIterator):
  """Maps each element with `fn -> (out | None, counts)`, skipping None, summing `counts` in its state."""

  def __init__(self, parent: grain.DatasetIterator, fn, keys):
    super().__init__(parent)
    self._fn = fn
    self._counts = {k: 0 for k in keys}

  def __next__(self):
    while True:
      out, counts = self._fn(next(self._parent))
      for k, v in counts.items():
        self._counts[k] += int(v)
      if out is not None:
        return out

  def get_state(self):
    return {"parent": self._parent.get_state(), COUNTS_KEY: dict(self._counts)}

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._counts = {k: int(v) for k, v in state[COUNTS_KEY].items()}


class CountingMapDataset(grain.IterDataset):
  """A filter-map that counts what it sees: `fn(element) -> (out_or_None, {counter: increment})`.

    None drops the element. The counters (named by `keys`) live in the iterator state under
    `COUNTS_KEY`, so a restored iterator continues them; `example_counts(iterator)` reads them.
    """

  def __init__(self, parent: grain.IterDataset, fn, keys, name: str = "CountingMap"):
    super().__init__(parent)
    self._fn = fn
    self._keys = tuple(keys)
    self._name = name

  def __iter__(self):
    return _CountingMapIterator(self._parent.__iter__(), self._fn, self._keys)

  def __str__(self):
    return self._name


def _shift_and_count(seq_len: int):

  def fn(example):
    out, truncated = shift_example(example["ids"], example["loss_mask"], seq_len)
    return out, {"examples": 1, "truncated": truncated, "dropped": out is None}

  return fn


def _packed_to_row(packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  # The packer writes segment ids and positions per feature; the three features were packed
  # together (same lengths), so the ones of `inputs` serve for all.
  return {
      "inputs": packed["inputs"],
      "targets": packed["targets"],
      "loss_mask": packed["loss_mask"],
      "positions": packed["inputs_positions"],
      "segment_ids": packed["inputs_segment_ids"],
  }


def rows_dataset(examples: grain.IterDataset,
                 seq_len: int,
                 *,
                 pack: bool = True,
                 num_bins: int = 8) -> grain.IterDataset:
  """Tokenized examples -> rows of length seq_len (see the module docstring), as a grain IterDataset.

    The counters `{"examples", "truncated", "dropped"}` are kept in the iterator state under
    `COUNTS_KEY`, so they are restored with it; `example_counts(iterator)` reads them.
    """
  ds = CountingMapDataset(examples,
                          _shift_and_count(seq_len), ("examples", "truncated", "dropped"),
                          name=f"ShiftTruncate(seq_len={seq_len})")
  if not pack:
    return ds.map(lambda ex: pad_row(ex, seq_len))
  length = {"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len}
  ds = grain.experimental.FirstFitPackIterDataset(ds,
                                                  length_struct=length,
                                                  num_packing_bins=num_bins,
                                                  shuffle_bins=False)
  return ds.map(_packed_to_row)


def example_counts(iterator: grain.DatasetIterator) -> dict[str, int] | None:
  """The counters of the (first) `CountingMapDataset` stage in an iterator chain, e.g.
    `{"examples", "truncated", "dropped"}` so far for `rows_dataset`.

    Live counts: examples already placed in rows that are not yet emitted are included. (The copy
    kept in `get_state()` is the one as of the last emitted group, which is what a restore replays.)
    """
  todo, seen = [iterator], set()
  while todo:
    it = todo.pop()
    if id(it) in seen:
      continue
    seen.add(id(it))
    if isinstance(it, _CountingMapIterator):
      return dict(it._counts)
    todo.extend(getattr(it, "_parents", ()))
  return None


def pack_examples(examples: Iterable[tuple[np.ndarray, np.ndarray]],
                  seq_len: int,
                  *,
                  pack: bool = True,
                  num_bins: int = 8) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Packs a finite list of `(ids, loss_mask)` into rows: returns `({feature: [N, T]}, counts)`."""
  items = [{"ids": np.asarray(i, np.int32), "loss_mask": np.asarray(m, np.int32)} for i, m in examples]
  it = iter(
      rows_dataset(grain.MapDataset.source(items).to_iter_dataset(), seq_len, pack=pack, num_bins=num_bins))
  rows = list(it)
  counts = example_counts(it)
  if not rows:
    return {k: np.zeros((0, seq_len), np.int32) for k in FEATURES}, counts
  return {k: np.stack([r[k] for r in rows]) for k in FEATURES}, counts
