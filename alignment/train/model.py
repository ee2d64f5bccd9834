"""The policy model named in `config.model`: its spec, its (sharded) initial params, its tokenizer."""

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np
from flax import nnx

from alignment import models
from alignment.train import state as state_lib


class ModelSetup(NamedTuple):
  cfg: models.ModelConfig
  spec: state_lib.ModelSpec
  load_params: Callable[[Any], Any]  # shardings -> params
  tokenizer: Optional[Any]           # tokenizers.Tokenizer or None


def setup_model(model_config, seed: int, *, reward_head: bool = False) -> ModelSetup:
  """Random init for a preset shape (e.g. 'tiny-random'); otherwise weights from `models.load`.

  Compute dtype, remat and scan come from `config.model` either way. With `reward_head` the module
  is a `models.RewardModel` (params {'backbone', 'head'}); a loaded backbone gets a fresh head.
  """
  runtime = dict(dtype=model_config.dtype, param_dtype=model_config.param_dtype,
                 remat=model_config.remat, scan_layers=model_config.scan_layers)
  tokenizer = None
  if model_config.name in models.PRESETS:
    cfg = models.get_model_config(model_config.name, **runtime)
    if model_config.name in models.NAMED_LOADERS:  # the preset's own tokenizer, e.g. tiny-random's
      tokenizer = models.load(model_config.name)[1]
    make = _module(cfg, reward_head)
    load_params = lambda shardings: state_lib.init_params(make, seed, shardings)
  else:
    loaded, tokenizer = models.load(model_config.name, dtype=model_config.param_dtype)
    cfg = dataclasses.replace(loaded.cfg, **runtime)
    make = _module(cfg, reward_head)
    host_params = nnx.state(loaded, nnx.Param).to_pure_dict()
    if reward_head:
      head = models.ScalarHead(cfg.d_model, rngs=nnx.Rngs(seed), param_dtype=cfg.param_dtype)
      host_params = {"backbone": host_params, "head": nnx.state(head, nnx.Param).to_pure_dict()}
    # A fresh host copy per call: on CPU device_put may alias the numpy buffer, and the policy and a
    # frozen reference loaded from one host tree would then be one buffer, donated twice.
    load_params = lambda shardings: jax.device_put(jax.tree.map(np.array, host_params), shardings)
  return ModelSetup(cfg, state_lib.model_spec(make), load_params, tokenizer)


def _module(cfg, reward_head: bool):
  cls = models.RewardModel if reward_head else models.Transformer
  return lambda rngs: cls(cfg, rngs=rngs)
