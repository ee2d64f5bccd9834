"""Small builders shared by the trainer tests: a tiny model setup and hand-made packed batches."""

import numpy as np

from alignment import models
from alignment.train import state as state_lib
from alignment.train.model import setup_model
from configs import sft as sft_config
from configs.common import SHARDING_RULES


def tiny_config(**train):
  config = sft_config.get_config("tiny")
  for key, value in train.items():
    config.train[key] = value
  return config


def tiny_model():
  return setup_model(tiny_config().model, seed=0)


def policy_state(setup, mesh, optimizer):
  """A train state whose one part, 'policy', is `setup`'s model trained by `optimizer`."""
  parts = {"policy": setup.part(optimizer)}
  return state_lib.create_train_state(parts, state_lib.state_shardings(parts, mesh, SHARDING_RULES), 0)


def packed_row(examples, seq_len):
  """Packs [(tokens, loss_mask_over_tokens)] into one row by the contract, written out plainly."""
  row = {k: np.zeros(seq_len, np.int32) for k in ("inputs", "targets", "positions", "segment_ids")}
  row["loss_mask"] = np.zeros(seq_len, np.float32)
  t = 0
  for seg, (tokens, mask) in enumerate(examples, start=1):
    n = len(tokens) - 1  # an example of L tokens yields L-1 (input, target) pairs
    row["inputs"][t:t + n] = tokens[:-1]
    row["targets"][t:t + n] = tokens[1:]
    row["loss_mask"][t:t + n] = mask[1:]
    row["positions"][t:t + n] = np.arange(n)
    row["segment_ids"][t:t + n] = seg
    t += n
  assert t <= seq_len
  return row


def random_examples(rng, count, vocab, min_len=4, max_len=20):
  """Examples of uneven lengths whose loss covers a random-length suffix (the 'completion')."""
  out = []
  for _ in range(count):
    n = int(rng.integers(min_len, max_len + 1))
    tokens = rng.integers(3, vocab, size=n).astype(np.int32)
    mask = np.zeros(n, np.float32)
    mask[int(rng.integers(1, n - 1)):] = 1.0
    out.append((tokens, mask))
  return out


def stack(rows):
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def vocab_size():
  return models.get_model_config("tiny-random").vocab_size


__all__ = ["tiny_config", "tiny_model", "policy_state", "packed_row", "random_examples", "stack", "vocab_size", "state_lib"]
