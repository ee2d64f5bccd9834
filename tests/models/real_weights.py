"""Real checkpoints for the `slow` tests, loaded at most once per pytest process (cached), with
transformers loading the very same GGUF as the reference. Skips when a weight package is missing."""

import functools

import pytest


def _skip_unless_installed(getter):
  try:
    return getter()
  except ImportError as e:
    pytest.skip(str(e))


@functools.lru_cache(maxsize=None)
def ours(name: str):
  """(model, tokenizer) from alignment.models.load(name)."""
  from alignment import models
  from alignment.models import registry
  _skip_unless_installed(registry.NAMED_GGUFS[name])
  return models.load(name)


def reference(name: str):
  """(transformers model, transformers tokenizer) from the same GGUF file, float32, eval mode."""
  return reference_model(name), reference_tokenizer(name)


@functools.lru_cache(maxsize=None)
def reference_model(name: str):
  """The transformers model of the same GGUF file, float32, eval mode (without its tokenizer, which takes
  transformers longer to build from a GGUF than the weights: 24 s for Gemma 3's 262k tokens)."""
  import torch
  from transformers import AutoModelForCausalLM
  from transformers.utils import logging

  from alignment.models import registry
  logging.set_verbosity_error()
  logging.disable_progress_bar()
  path = _skip_unless_installed(registry.NAMED_GGUFS[name])
  return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@functools.lru_cache(maxsize=None)
def reference_tokenizer(name: str):
  from transformers import AutoTokenizer
  from transformers.utils import logging

  from alignment.models import registry
  logging.set_verbosity_error()
  path = _skip_unless_installed(registry.NAMED_GGUFS[name])
  return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
