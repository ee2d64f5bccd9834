"""SFT batch iterators on grain: the job's global batches, with a JSON-serialisable position.

    sources = sft.prepare_sft(train_path, eval_path, data_dir=cache_dir)
    it = make_sft_iterator(sources["train"], tokenizer=tok, template=tpl, seq_len=512,
                           batch_size=8, seed=0)
    batch = next(it)              # {inputs, targets, loss_mask, positions, segment_ids}: int32 [8, 512]
    state = it.get_state()        # JSON-serialisable dict; save it with the checkpoint
    it.set_state(state)           # a restored iterator yields exactly the batches that would follow

The pipeline: the records -> shuffle (a new permutation each epoch, from `seed`) -> repeat -> tokenize
with the chat template and an assistant-only loss mask -> shift, truncate, drop (see `packing`) ->
pack first-fit (or one example per row) -> batches of `batch_size` rows. A final partial batch
(finite epochs) is filled with padding rows (segment 0, loss 0), so every batch has the same shape.

Every host of a multi-host job runs the same pipeline and gets the same global batch (it then places
only the rows its devices hold: `alignment.parallel.shard_batch`). So the batches, and the position,
depend on nothing but the data and the config: a run stopped on 2 hosts resumes on 1, or on another
mesh, with the same batches. The price is that each host tokenizes and packs the whole batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grain
import numpy as np
import tokenizers

from alignment.data import packing
from alignment.data.chat import prompt_completion_to_messages, tokenize_conversation
from alignment.data.sft import record_to_messages

STATE_FORMAT = "alignment.data.pipeline/1"


def to_messages(record) -> list[dict[str, str]]:
  """A record of any supported kind -> conversation: a stored TFDS record (bytes fields), a
    `{"messages": [...]}` or `{"prompt", "completion"}` dict, or a bare list of messages."""
  if isinstance(record, Mapping):
    if "messages" in record:
      messages = record["messages"]
      if isinstance(messages, Mapping):  # TFDS Sequence-of-dict: {"role": [...], "content": [...]}
        return record_to_messages(record)
      return [dict(m) for m in messages]
    if "prompt" in record:
      return prompt_completion_to_messages(record["prompt"], record["completion"])
  if isinstance(record, Sequence):
    return [dict(m) for m in record]
  raise TypeError(f"cannot read a conversation from a record of type {type(record).__name__}")


class BatchIterator:
  """Yields the batches of a grain dataset (SFT: `{feature: int32 [batch_size, seq_len]}`);
    checkpointable with get/set_state."""

  def __init__(self, dataset: grain.IterDataset, meta: dict):
    self._it = iter(dataset)
    self._meta = meta
    self._emitted = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    self._emitted += 1
    return batch

  def get_state(self) -> dict:
    """The position, as a JSON-serialisable dict: `{"format", "meta", "emitted", "grain"}`."""
    return {
        "format": STATE_FORMAT,
        "meta": dict(self._meta),
        "emitted": self._emitted,
        "grain": self._it.get_state()
    }

  def set_state(self, state: Mapping) -> None:
    """Restores a position from `get_state()` of an iterator built with the same arguments."""
    if state.get("format") != STATE_FORMAT:
      raise ValueError(f"not a data iterator state of format {STATE_FORMAT!r}: {state.get('format')!r}")
    for key, value in self._meta.items():
      if state["meta"].get(key) != value:
        raise ValueError(f"data iterator state was saved with {key}={state['meta'].get(key)!r} but this "
                         f"iterator has {key}={value!r}; restore onto an iterator built the same way")
    self._it.set_state(state["grain"])
    self._emitted = int(state["emitted"])

  @property
  def stats(self) -> dict[str, int]:
    """The pipeline's counters so far on this host. SFT: `{"examples", "truncated", "dropped"}`:
        examples read, how many were longer than seq_len + 1 (truncated) and how many had no loss
        token left (dropped)."""
    return packing.example_counts(self._it)


def _tokenize_fn(tokenizer, template, template_kwargs):

  def tokenize(record):
    ids, loss_mask = tokenize_conversation(to_messages(record), tokenizer, template, **template_kwargs)
    return {"ids": ids, "loss_mask": loss_mask}

  return tokenize


def records(source, *, seed: int, num_epochs: int | None, shuffle: bool,
            with_index: bool = False) -> grain.MapDataset:
  """The records of `source`, shuffled with a new permutation each epoch (from `seed`) when `shuffle`,
    repeated `num_epochs` times (None: forever). `with_index=True` yields `(i, source[i])` pairs."""
  ds = grain.MapDataset.source(source)
  if len(ds) == 0:
    raise ValueError("the data source has no records")
  if with_index:
    # After `repeat`, grain hands later epochs' indices (k * len + i) down to this map unreduced.
    num_records = len(source)
    ds = ds.map_with_index(lambda i, record: (i % num_records, record))
  if shuffle:
    ds = ds.shuffle(seed=seed)  # A different permutation each epoch (seed + epoch).
  return ds.repeat(num_epochs)


def _build(source, *, tokenizer, template, seq_len, batch_size, seed, pack, num_epochs, shuffle, packing_bins,
           read_threads, template_kwargs):
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
  ds = records(source, seed=seed, num_epochs=num_epochs, shuffle=shuffle)
  meta = {
      "num_records": len(source),
      "seq_len": seq_len,
      "batch_size": batch_size,
      "seed": seed,
      "pack": pack,
      "num_epochs": num_epochs,
      "shuffle": shuffle
  }
  ds = ds.map(_tokenize_fn(tokenizer, template, dict(template_kwargs or {})))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * batch_size))
  ds = packing.rows_dataset(ds, seq_len, pack=pack, num_bins=packing_bins or batch_size)
  ds = ds.batch(batch_size, batch_fn=lambda rows: packing.stack_and_pad(rows, batch_size))
  return ds, meta


def make_sft_iterator(source,
                      *,
                      tokenizer: tokenizers.Tokenizer,
                      template: str,
                      seq_len: int,
                      batch_size: int,
                      seed: int = 0,
                      pack: bool = True,
                      num_epochs: int | None = None,
                      shuffle: bool = True,
                      packing_bins: int | None = None,
                      read_threads: int = 2,
                      template_kwargs: Mapping | None = None) -> BatchIterator:
  """The training iterator: global batches of `batch_size` rows of `seq_len` tokens.

    `source` is any random-access sequence of records (a TFDS data source from `sft.prepare_sft`, or
    a list of conversations). `num_epochs=None` repeats forever; a finite run ends after the last
    (padded) batch. `packing_bins` open rows are packed at once (default `batch_size`).
    `template_kwargs` go to the chat template (e.g. `bos_token`).
    """
  ds, meta = _build(source,
                    tokenizer=tokenizer,
                    template=template,
                    seq_len=seq_len,
                    batch_size=batch_size,
                    seed=seed,
                    pack=pack,
                    num_epochs=num_epochs,
                    shuffle=shuffle,
                    packing_bins=packing_bins,
                    read_threads=read_threads,
                    template_kwargs=template_kwargs)
  return BatchIterator(ds, meta)


def make_eval_iterator(source,
                       *,
                       tokenizer: tokenizers.Tokenizer,
                       template: str,
                       seq_len: int,
                       batch_size: int,
                       pack: bool = True,
                       packing_bins: int | None = None,
                       read_threads: int = 2,
                       template_kwargs: Mapping | None = None) -> BatchIterator:
  """One deterministic pass over the records, in order, no shuffle; the last batch padded."""
  ds, meta = _build(source,
                    tokenizer=tokenizer,
                    template=template,
                    seq_len=seq_len,
                    batch_size=batch_size,
                    seed=0,
                    pack=pack,
                    num_epochs=1,
                    shuffle=False,
                    packing_bins=packing_bins,
                    read_threads=read_threads,
                    template_kwargs=template_kwargs)
  return BatchIterator(ds, meta)
