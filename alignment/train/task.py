"""What an algorithm hands the shared loop: the model, its loss, and its data."""

import dataclasses
import os
from typing import Any, Callable, Dict, Iterable, Optional, Protocol

import jax
import numpy as np

from alignment.train.state import Part


class ResumableIterator(Protocol):
  """Yields global numpy batches (the same on every host); its position round-trips through a
  JSON-serialisable dict."""
  def __next__(self) -> dict: ...
  def get_state(self) -> dict: ...
  def set_state(self, state: dict) -> None: ...


@dataclasses.dataclass
class Task:
  """An algorithm's side of the supervised loop (`alignment.train.loop.train`)."""
  parts: Dict[str, Part]              # the state's models by name: what trains (with an optimizer) and what not
  loss_fn: Callable                   # (parts, batch, rng) -> (loss_sum, (count, aux sums))
  train_data: ResumableIterator
  eval_data: Optional[Callable[[], Iterable[dict]]] = None  # a fresh, finite pass over the eval split
  info: dict = dataclasses.field(default_factory=dict)     # printed once at start (dataset stats, ...)
  count_name: str = "num_tokens"                          # what the loss is normalised by, in metrics
  summarize: Optional[Callable[[dict], dict]] = None      # (parts) -> figures saved at the end
  model_cfg: Any = None        # the ModelConfig of a generating policy (gym evals during training), if any
  tokenizer: Any = None        # its tokenizer
  reward_metric: Optional[str] = None  # the step metric the reward-hacking monitors read as the reward


def prepare_once_per_job(prepare):
  """Process 0 prepares the TFDS data first; the other hosts then open what it wrote (or prepare their
  own copy when their data_dir is host-local)."""
  if jax.process_count() == 1:
    return prepare()
  from jax.experimental import multihost_utils
  sources = prepare() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("tfds prepared")
  return sources if sources is not None else prepare()


def data_dir(data_config) -> str:
  """Where TFDS prepares a task's data: `config.data.data_dir`, else a per-user cache (not the workdir)."""
  return data_config.data_dir or os.path.join(os.path.expanduser("~"), ".cache", "alignment", "tfds")


def data_filters(data_config):
  """The `alignment.data.filters.Options` of `config.data.filters` (none applied when the key is absent)."""
  from alignment.data import filters
  return filters.options_from_config(data_config.filters) if "filters" in data_config else filters.DEFAULTS


def filter_info(sources) -> dict:
  """{'filtered/<filter>': rows removed over all splits} from a prepared dataset's metadata."""
  counts = sources["train"].dataset_info.metadata.get("filter_counts", {})
  return {f"filtered/{name}": sum(by_split.values()) for name, by_split in counts.items()}


def tokenizer_and_template(data_config, model_tokenizer, model_name: str):
  """(tokenizer, chat template, template kwargs) for a task: `config.data.tokenizer` /
  `config.data.chat_template` when given, else the model's own (a GGUF or HF model carries both)."""
  from alignment.data import chat
  tokenizer = chat.load_tokenizer(data_config.tokenizer) if data_config.tokenizer else model_tokenizer
  if tokenizer is None:
    raise ValueError(f"config.data.tokenizer: model {model_name!r} ships no tokenizer; give a tokenizer.json")
  if data_config.chat_template:
    template = chat.load_template(data_config.chat_template)
  else:
    template = getattr(tokenizer, "chat_template", None) or chat.load_template()
  bos = getattr(tokenizer, "bos_token", None)
  return tokenizer, template, ({"bos_token": bos} if bos else {})


def cached_table(path: str, shape: tuple, compute: Callable[[], np.ndarray]) -> np.ndarray:
  """The float32 array of `shape` saved at `path`, else `compute()` saved there first (through a file of this
  process renamed into place: never half-written, and hosts sharing a filesystem may write the same one)."""
  if os.path.exists(path):
    cached = np.load(path)
    if cached.shape == tuple(shape):
      return cached
  table = np.asarray(compute(), np.float32)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}.npy"
  np.save(tmp, table)
  os.replace(tmp, path)
  return table


class WithColumns:
  """A resumable iterator whose batches get more features: `add(batch) -> {name: array}` (looked up on the
  host, e.g. from a cached table by record index); its position is the wrapped iterator's."""

  def __init__(self, iterator, add: Callable[[dict], dict]):
    self.iterator, self.add = iterator, add

  def __iter__(self):
    return self

  def __next__(self):
    batch = dict(next(self.iterator))
    batch.update(self.add(batch))
    return batch

  def get_state(self):
    return self.iterator.get_state()

  def set_state(self, state):
    self.iterator.set_state(state)
