"""Prefix sharing: train a group of completions (GRPO's G samples, DPO's chosen and rejected) against one
copy of their prompt.

An unshared row is prompt + completion, shifted for next-token prediction. A shared row holds the prompt
once and then each completion as its own segment that sees the prompt (`prefix_ids`, see
`alignment.models.transformer.context`) and itself only. The prompt's last token has a different target
in each completion (that completion's first token), so the shared prompt segment stops one token short
and every completion segment starts with the prompt's last token, its positions continuing the prompt's:
each completion token is then predicted from the same context as in its own row, and a group of G saves
(G - 1) * (len(prompt) - 1) tokens.

Host-side NumPy; `gather` is the only jnp function (it runs inside the jitted loss).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Layout(NamedTuple):
  """Training rows and the way back to the completions.

  inputs, targets, positions, segment_ids, prefix_ids, loss_mask: int32 [R, T] (loss_mask 1 where the
  target is a completion token; segment 0 is padding). row [N], cols [N, L], mask [N, L] int32, L the
  longest completion: completion i's token j is the target of cell (row[i], cols[i, j]) where mask[i, j]
  (elsewhere cols is 0). tokens: the real (non-padding) cells, the cost of the layout."""
  inputs: np.ndarray
  targets: np.ndarray
  positions: np.ndarray
  segment_ids: np.ndarray
  prefix_ids: np.ndarray
  loss_mask: np.ndarray
  row: np.ndarray
  cols: np.ndarray
  mask: np.ndarray
  tokens: int


def build_rows(prompts: list[list[int]], completions: list[list[int]], group_size: int, seq_len: int, *,
               share: bool, pad_id: int = 0, rows_multiple: int = 1) -> Layout:
  """prompts [P] token lists; completions [P * group_size], group i's completions at
  i * group_size .. (i + 1) * group_size - 1 -> the Layout of seq_len-cell rows.

  share=False: one row per completion. share=True: each group's prompt once then its completions, whole
  groups packed first-fit into rows. The row count is padded up to a multiple of `rows_multiple` (so a
  batch divides over devices) with padding rows."""
  if group_size < 1 or rows_multiple < 1:
    raise ValueError(f"group_size={group_size}, rows_multiple={rows_multiple}; expected positive ints")
  if len(completions) != len(prompts) * group_size:
    raise ValueError(f"{len(completions)} completions for {len(prompts)} prompts; expected "
                     f"len(prompts) * group_size = {len(prompts) * group_size}")
  for name, seqs in (("prompt", prompts), ("completion", completions)):
    empty = [i for i, s in enumerate(seqs) if not len(s)]
    if empty:
      raise ValueError(f"{name} {empty[0]} is empty; every {name} needs at least one token")
  units = _shared_units(prompts, completions, group_size) if share else _unshared_units(prompts, completions)
  sizes = [sum(len(segment[0]) for segment in unit) for unit in units]
  for i, size in enumerate(sizes):
    if size > seq_len:
      raise ValueError(f"{'group' if share else 'completion'} {i} needs {size} tokens, more than seq_len={seq_len}")
  rows = _first_fit(sizes, seq_len) if share else [[i] for i in range(len(units))]
  return _fill(units, rows, [len(c) for c in completions], seq_len, pad_id, rows_multiple)


def gather(per_token: jax.Array, layout: Layout) -> jax.Array:
  """per_token [R, T] (a value per cell, e.g. its target's log-prob) -> [N, L] in completion order, 0 past
  each completion's end. Jit-friendly: the layout's index arrays may be traced."""
  values = per_token[jnp.asarray(layout.row)[:, None], jnp.asarray(layout.cols)]
  return jnp.where(jnp.asarray(layout.mask) > 0, values, jnp.zeros((), values.dtype))


# A unit is what one row must hold whole: a list of segments (inputs, targets, first position, prefix
# index or -1, completion index or -1); the prefix index points at an earlier segment of the same unit.


def _unshared_units(prompts, completions):
  group_size = len(completions) // len(prompts)
  units = []
  for i, completion in enumerate(completions):
    seq = list(prompts[i // group_size]) + list(completion)
    units.append([(seq[:-1], seq[1:], 0, -1, i)])
  return units


def _shared_units(prompts, completions, group_size):
  units = []
  for g, prompt in enumerate(prompts):
    prompt = list(prompt)
    unit = [(prompt[:-1], prompt[1:], 0, -1, -1)]
    for i in range(g * group_size, (g + 1) * group_size):
      completion = list(completions[i])
      unit.append(([prompt[-1]] + completion[:-1], completion, len(prompt) - 1, 0, i))
    units.append(unit)
  return units


def _first_fit(sizes, seq_len):
  """Unit indices per row: each unit, in order, into the first row with room for it."""
  rows, free = [], []
  for i, size in enumerate(sizes):
    for r, room in enumerate(free):
      if size <= room:
        rows[r].append(i)
        free[r] -= size
        break
    else:
      rows.append([i])
      free.append(seq_len - size)
  return rows


def _fill(units, rows, lengths, seq_len, pad_id, rows_multiple):
  """The Layout of `units` placed in `rows` (unit indices per row); lengths: the completions' lengths."""
  shape = (-(-len(rows) // rows_multiple) * rows_multiple, seq_len)
  inputs, targets = np.full(shape, pad_id, np.int32), np.full(shape, pad_id, np.int32)
  positions, segment_ids, prefix_ids, loss_mask = (np.zeros(shape, np.int32) for _ in range(4))
  N, L = len(lengths), max(lengths)
  row, cols, mask = np.zeros(N, np.int32), np.zeros((N, L), np.int32), np.zeros((N, L), np.int32)
  for r, members in enumerate(rows):
    start, segment = 0, 0
    for u in members:
      first_segment = segment + 1
      for seg_inputs, seg_targets, first_position, prefix, completion in units[u]:
        segment += 1
        n = len(seg_inputs)
        cells = slice(start, start + n)
        inputs[r, cells], targets[r, cells] = seg_inputs, seg_targets
        positions[r, cells] = np.arange(first_position, first_position + n)
        segment_ids[r, cells] = segment
        if prefix >= 0:
          prefix_ids[r, cells] = first_segment + prefix
        if completion >= 0:
          # The completion's tokens are the segment's last targets (all of them when shared).
          k = lengths[completion]
          loss_mask[r, start + n - k:start + n] = 1
          row[completion], cols[completion, :k], mask[completion, :k] = r, np.arange(start + n - k, start + n), 1
        start += n
  return Layout(inputs, targets, positions, segment_ids, prefix_ids, loss_mask, row, cols, mask,
                int((segment_ids > 0).sum()))
