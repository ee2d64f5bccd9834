"""Preference pairs -> packed preference batches (format below), on per-host grain iterators.

    sources = preference.prepare_preferences(train_path, data_dir=cache_dir, eval_fraction=0.1)
    it = make_preference_iterator(sources["train"], tokenizer=tok, template=tpl, seq_len=512,
                                  batch_size=8, pairs_per_row=2, seed=0)
    batch = next(it)        # R = batch_size rows of T = seq_len tokens, P = pairs_per_row pairs a row
    it.get_state() / it.set_state(state)   # JSON-serialisable position, restored exactly
    it.stats                # {"pairs", "truncated", "dropped"} read so far

The batch (numpy, the job's global batch: every host gets the same, as in `alignment.data.pipeline`):

    inputs, targets, loss_mask, positions, segment_ids   int32 [R, T]
    chosen_end, rejected_end, pair_mask                  int32 [R, P]
    margin                                               float32 [R, P]
    pair_index                                           int32 [R, P]: the pair's record index in
                                                         `source` (e.g. to look up cached reference
                                                         log-probs); -1 for an empty slot

Pair p of a row is segment 2p+1 (chosen) and segment 2p+2 (rejected), always in the same row and
adjacent. Each sequence is the full conversation, prompt + [assistant: completion], rendered with the
chat template and tokenized (`chat.tokenize_conversation`), ending at the final assistant turn's
end-of-turn token (`<|im_end|>` for ChatML; the template's text after it, a newline, is not part of
the sequence). Its tokens before the completion are exactly the render of the prompt with
`add_generation_prompt=True`. A sequence of L tokens fills L cells: inputs = its tokens,
targets = tokens[1:] then 0, loss_mask[t] = 1 iff targets[t] is a completion token (0 at its last
cell), positions 0..L-1. `chosen_end`/`rejected_end` = the cell of each sequence's last token (its
end-of-turn token unless truncated), found from the segment layout, never from token ids, so they
are right when the pad id equals the end-of-turn id. Padding cells: segment 0, inputs = `pad_id`,
everything else 0; an empty pair slot has pair_mask = chosen_end = rejected_end = margin = 0 and
pair_index = -1.

Length rule (`max_length`, per sequence, default seq_len // 2 so that a pair always fits a row):
- a pair whose prompt leaves no room, prompt tokens >= max_length - 1, is dropped (the prompt is
  never cut);
- otherwise a sequence longer than max_length keeps its first max_length tokens (its completion is
  cut at the end; the last kept token is then where `*_end` points) and the pair counts as
  `truncated`; with `truncation='drop'` such a pair is dropped instead (counted in both).
Counts, in `.stats` and in the iterator state: `pairs` read, `truncated`, `dropped`.

Packing (`pairs_per_row` P > 1): grain's first-fit packer over `packing_bins` open rows (default
batch_size) with at most P pairs a row; a pair is packed as one unit, so its two sequences never
split. P = 1 puts one pair per row.
"""

from __future__ import annotations

from collections.abc import Mapping

import grain
import numpy as np
import tokenizers

from alignment.choices import TRUNCATIONS
from alignment.data import packing
from alignment.data.chat import tokenize_conversation
from alignment.data.pipeline import BatchIterator, records
from alignment.data.preference import record_to_pair

ROW_FEATURES = packing.FEATURES  # int32 [R, T]
PAIR_FEATURES = ("chosen_end", "rejected_end", "pair_mask", "margin", "pair_index")  # [R, P]; margin float32
COUNTERS = ("pairs", "truncated", "dropped")
TRUNCATION = TRUNCATIONS
_PACKED = ("inputs", "targets", "loss_mask", "sub")  # Per-token features of a packed pair.

# ----------------------------------------------------------------------------------------------
# One pair: tokenize, fit to max_length, lay out as a packable unit.


def tokenize_sequence(prompt, completion: str, tokenizer: tokenizers.Tokenizer, template: str,
                      **template_kwargs) -> tuple[np.ndarray, np.ndarray]:
  """prompt messages + completion -> `(ids, completion_mask)`, int32 [L].

    `ids` is the tokenization of the full render of prompt + [assistant: completion], cut right after
    the final assistant turn's last masked token (its end-of-turn token); `completion_mask` is 1 on
    the completion's tokens (content + end-of-turn), 0 on the prompt. All zero (and the full render)
    when the template gives the completion no token at all.
    """
  messages = list(prompt) + [{"role": "assistant", "content": completion}]
  ids, mask = tokenize_conversation(messages, tokenizer, template, last_turn_only=True, **template_kwargs)
  loss = np.flatnonzero(mask)
  if loss.size:
    ids, mask = ids[:loss[-1] + 1], mask[:loss[-1] + 1]
  return ids, mask


def tokenize_pair(record, tokenizer: tokenizers.Tokenizer, template: str, *, index: int = -1,
                  **template_kwargs) -> dict:
  """A record (stored or in-memory, see `preference.record_to_pair`) -> both sequences, the margin and
    the record's `index`: `{"chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask": int32 [L],
    "margin": float32, "index": int32}`."""
  pair = record_to_pair(record)
  out = {"margin": np.float32(pair["margin"]), "index": np.int32(index)}
  for side in ("chosen", "rejected"):
    ids, mask = tokenize_sequence(pair["prompt"], pair[side], tokenizer, template, **template_kwargs)
    out[f"{side}_ids"], out[f"{side}_mask"] = ids, mask
  return out


def fit_pair(tokenized: Mapping, max_length: int, truncation: str = "truncate") -> tuple[dict | None, dict]:
  """Applies the length rule (module docstring) to a tokenized pair.

    Returns `(unit_or_None, counts)`: the pair as one packable unit, chosen's cells then rejected's,
    `{"inputs", "targets", "loss_mask", "sub" (1 chosen, 2 rejected): int32 [Lc + Lr],
    "margin": float32, "index": int32}`, or None when dropped; counts `{"pairs", "truncated", "dropped"}`.
    """
  counts = {"pairs": 1, "truncated": 0, "dropped": 0}
  sides = [(tokenized[f"{s}_ids"], tokenized[f"{s}_mask"]) for s in ("chosen", "rejected")]
  if not all(mask.any() for _, mask in sides):
    counts["dropped"] = 1  # A completion without any token: nothing to score.
    return None, counts
  prompt_len = max(int(np.argmax(mask)) for _, mask in sides)
  if prompt_len >= max_length - 1:
    counts["dropped"] = 1
    return None, counts
  if any(len(ids) > max_length for ids, _ in sides):
    counts["truncated"] = 1
    if truncation == "drop":
      counts["dropped"] = 1
      return None, counts
  unit = {k: [] for k in _PACKED}
  for sub, (ids, mask) in enumerate(sides, start=1):
    ids, mask = ids[:max_length], mask[:max_length]
    unit["inputs"].append(ids)
    unit["targets"].append(np.append(ids[1:], 0))
    unit["loss_mask"].append(np.append(mask[1:], 0))
    unit["sub"].append(np.full(len(ids), sub))
  unit = {k: np.concatenate(v).astype(np.int32) for k, v in unit.items()}
  unit["margin"] = np.float32(tokenized["margin"])
  unit["index"] = np.int32(tokenized.get("index", -1))
  return unit, counts


# ----------------------------------------------------------------------------------------------
# Rows and batches.


def _finish_row(packed: Mapping, pairs_per_row: int, pad_id: int) -> dict[str, np.ndarray]:
  """The packer's row (pairs as segments 1..k, `sub` inside each) -> a row of the contract."""
  pair_seg = np.asarray(packed["inputs_segment_ids"], np.int32)
  segment_ids = np.where(pair_seg > 0, 2 * (pair_seg - 1) + np.asarray(packed["sub"], np.int32), 0)
  row = {
      "inputs": np.where(segment_ids > 0, packed["inputs"], pad_id).astype(np.int32),
      "targets": np.asarray(packed["targets"], np.int32),
      "loss_mask": np.asarray(packed["loss_mask"], np.int32),
      "positions": np.zeros_like(segment_ids),
      "segment_ids": segment_ids.astype(np.int32),
  }
  pairs = _empty_pairs(pairs_per_row)
  for p in range(pairs_per_row):
    for side, s in (("chosen_end", 2 * p + 1), ("rejected_end", 2 * p + 2)):
      cells = np.flatnonzero(segment_ids == s)
      if cells.size:
        row["positions"][cells] = np.arange(cells.size, dtype=np.int32)
        pairs[side][p] = cells[-1]
    pairs["pair_mask"][p] = int(np.any(segment_ids == 2 * p + 1))
  k = len(packed["margin"])
  pairs["margin"][:k] = np.asarray(packed["margin"], np.float32)
  pairs["pair_index"][:k] = np.asarray(packed["index"], np.int32)
  return {**row, **pairs}


def _empty_pairs(*shape) -> dict[str, np.ndarray]:
  pairs = {k: np.zeros(shape, np.float32 if k == "margin" else np.int32) for k in PAIR_FEATURES}
  pairs["pair_index"][:] = -1
  return pairs


def empty_batch(batch_size: int, seq_len: int, pairs_per_row: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  """An all-padding preference batch (segment 0, loss 0, pair_mask 0)."""
  batch = packing.empty_rows(batch_size, seq_len)
  batch["inputs"][:] = pad_id
  return {**batch, **_empty_pairs(batch_size, pairs_per_row)}


def _stack_and_pad(rows, batch_size: int, seq_len: int, pairs_per_row: int, pad_id: int) -> dict[str, np.ndarray]:
  batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  missing = batch_size - len(rows)
  if missing:
    pad = empty_batch(missing, seq_len, pairs_per_row, pad_id)
    batch = {k: np.concatenate([v, pad[k]]) for k, v in batch.items()}
  return batch


def pair_rows_dataset(tokenized: grain.IterDataset,
                      *,
                      seq_len: int,
                      pairs_per_row: int,
                      max_length: int,
                      truncation: str = "truncate",
                      num_bins: int = 8,
                      pad_id: int = 0) -> grain.IterDataset:
  """Tokenized pairs (`tokenize_pair`) -> rows of the contract (length rule, counting, packing)."""
  ds = packing.CountingMapDataset(tokenized,
                                  lambda pair: fit_pair(pair, max_length, truncation),
                                  COUNTERS,
                                  name=f"FitPair(max_length={max_length}, truncation={truncation})")
  ds = grain.experimental.FirstFitPackIterDataset(ds,
                                                  length_struct={k: seq_len for k in _PACKED},
                                                  num_packing_bins=num_bins,
                                                  shuffle_bins=False,
                                                  meta_features=("margin", "index"),
                                                  max_sequences_per_bin=pairs_per_row)
  return ds.map(lambda packed: _finish_row(packed, pairs_per_row, pad_id))


def _build(source, *, tokenizer, template, seq_len, batch_size, pairs_per_row, max_length, truncation, seed,
           num_epochs, shuffle, packing_bins, pad_id, read_threads, template_kwargs):
  if seq_len < 2 or batch_size < 1 or pairs_per_row < 1:
    raise ValueError(f"seq_len >= 2, batch_size >= 1 and pairs_per_row >= 1 are needed, got {seq_len}, "
                     f"{batch_size} and {pairs_per_row}")
  max_length = seq_len // 2 if max_length is None else max_length
  if not 2 <= max_length <= seq_len // 2:
    raise ValueError(f"max_length={max_length} must be in [2, seq_len // 2 = {seq_len // 2}] so that both "
                     f"sequences of a pair fit one row of seq_len={seq_len}")
  if truncation not in TRUNCATION:
    raise ValueError(f"truncation must be one of {list(TRUNCATION)}, got {truncation!r}")
  ds = records(source, seed=seed, num_epochs=num_epochs, shuffle=shuffle, with_index=True)
  meta = {
      "kind": "preference",
      "num_records": len(source),
      "seq_len": seq_len,
      "batch_size": batch_size,
      "pairs_per_row": pairs_per_row,
      "max_length": max_length,
      "truncation": truncation,
      "seed": seed,
      "num_epochs": num_epochs,
      "shuffle": shuffle,
      "pad_id": pad_id,
  }
  kw = dict(template_kwargs or {})
  ds = ds.map(lambda item: tokenize_pair(item[1], tokenizer, template, index=item[0], **kw))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * batch_size))
  ds = pair_rows_dataset(ds,
                         seq_len=seq_len,
                         pairs_per_row=pairs_per_row,
                         max_length=max_length,
                         truncation=truncation,
                         num_bins=packing_bins or batch_size,
                         pad_id=pad_id)
  ds = ds.batch(batch_size, batch_fn=lambda rows: _stack_and_pad(rows, batch_size, seq_len, pairs_per_row, pad_id))
  return ds, meta


def make_preference_iterator(source,
                             *,
                             tokenizer: tokenizers.Tokenizer,
                             template: str,
                             seq_len: int,
                             batch_size: int,
                             pairs_per_row: int = 1,
                             seed: int = 0,
                             max_length: int | None = None,
                             truncation: str = "truncate",
                             num_epochs: int | None = None,
                             shuffle: bool = True,
                             packing_bins: int | None = None,
                             pad_id: int = 0,
                             read_threads: int = 2,
                             template_kwargs: Mapping | None = None) -> BatchIterator:
  """The training iterator: global batches of `batch_size` rows (module docstring).

    `source` is any random-access sequence of pair records (a data source from
    `preference.prepare_preferences`, or a list of `{"prompt", "chosen", "rejected", "margin"?}`),
    read in a new permutation each epoch (from `seed`); `num_epochs=None` repeats forever, a finite
    run ends with its last batch padded.
    `template_kwargs` go to the chat template (e.g. `bos_token`).
    """
  ds, meta = _build(source,
                           tokenizer=tokenizer,
                           template=template,
                           seq_len=seq_len,
                           batch_size=batch_size,
                           pairs_per_row=pairs_per_row,
                           max_length=max_length,
                           truncation=truncation,
                           seed=seed,
                           num_epochs=num_epochs,
                           shuffle=shuffle,
                           packing_bins=packing_bins,
                           pad_id=pad_id,
                           read_threads=read_threads,
                           template_kwargs=template_kwargs)
  return BatchIterator(ds, meta)


def make_preference_eval_iterator(source,
                                  *,
                                  tokenizer: tokenizers.Tokenizer,
                                  template: str,
                                  seq_len: int,
                                  batch_size: int,
                                  pairs_per_row: int = 1,
                                  max_length: int | None = None,
                                  truncation: str = "truncate",
                                  packing_bins: int | None = None,
                                  pad_id: int = 0,
                                  read_threads: int = 2,
                                  template_kwargs: Mapping | None = None) -> BatchIterator:
  """One deterministic pass over the pairs, in order, no shuffle; the last batch padded (pair_mask 0)."""
  ds, meta = _build(source,
                           tokenizer=tokenizer,
                           template=template,
                           seq_len=seq_len,
                           batch_size=batch_size,
                           pairs_per_row=pairs_per_row,
                           max_length=max_length,
                           truncation=truncation,
                           seed=0,
                           num_epochs=1,
                           shuffle=False,
                           packing_bins=packing_bins,
                           pad_id=pad_id,
                           read_threads=read_threads,
                           template_kwargs=template_kwargs)
  return BatchIterator(ds, meta)
