"""Decoder LMs: config, NNX transformer, scalar head, and `load` (random, GGUF, HF weights).

Functional use: `graphdef, params = nnx.split(model, nnx.Param)`, then inside a jitted function
`nnx.merge(graphdef, params)(tokens, positions, segment_ids)`.
"""

from pathlib import Path
from typing import Callable, Dict, List, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from alignment.models.config import PRESETS, ModelConfig, get_model_config
from alignment.models.heads import PooledProbe, RewardModel, ScalarHead
from alignment.models.transformer import Transformer

__all__ = ["ModelConfig", "get_model_config", "PRESETS", "Transformer", "ScalarHead", "RewardModel", "PooledProbe", "init_model", "logits",
           "load", "NAMED_LOADERS", "PATH_LOADERS"]

TINY_TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "assets" / "tiny_tokenizer.json"


def init_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
  """A randomly initialised Transformer (params in cfg.param_dtype)."""
  return Transformer(cfg, rngs=nnx.Rngs(seed))


@nnx.jit
def logits(model: Transformer, tokens: jax.Array) -> jax.Array:
  """tokens [B, T] int32 -> float32 logits [B, T, V]. Materialises [B, T, V]: for tests and small
  inputs; losses use alignment.kernels.token_logprobs on the hidden states instead. Jitted (eager
  dispatch of every op is slow on CPU)."""
  hidden = model(tokens).astype(jnp.float32)
  return jnp.einsum("btd,dv->btv", hidden, model.unembed_matrix().astype(jnp.float32))


def _load_tiny_random(dtype: str):
  cfg = get_model_config("tiny-random", param_dtype=dtype, dtype=dtype)
  model = init_model(cfg, seed=0)
  tokenizer = None
  if TINY_TOKENIZER.exists():
    import tokenizers  # only needed here; keeps `import alignment.models` light
    tokenizer = tokenizers.Tokenizer.from_file(str(TINY_TOKENIZER))
    if tokenizer.get_vocab_size() > cfg.vocab_size:
      raise ValueError(f"{TINY_TOKENIZER} has {tokenizer.get_vocab_size()} tokens, more than the "
                       f"tiny-random vocab_size={cfg.vocab_size}")
  return model, tokenizer


# name -> loader(dtype=...) -> (model, tokenizer). GGUF / HF loaders register their names here.
NAMED_LOADERS: Dict[str, Callable] = {"tiny-random": _load_tiny_random}
# (accepts(path) -> bool, loader(path, dtype=...) -> (model, tokenizer)), tried in order for non-names.
PATH_LOADERS: List[Tuple[Callable[[str], bool], Callable]] = []


def load(name_or_path: str, *, dtype: str = "float32"):
  """-> (model, tokenizer). `dtype` ('float32' | 'bfloat16') is both the param and the compute dtype.

  tokenizer is a `tokenizers.Tokenizer`, or None when the model ships without one.
  """
  if name_or_path not in NAMED_LOADERS:
    # GGUF / HF / named real models; imported late (heavier), and only when needed, so that
    # 'tiny-random' works where `gguf` is not installed (the GPU machines).
    from alignment.models import registry
    registry.register(NAMED_LOADERS, PATH_LOADERS)
  if name_or_path in NAMED_LOADERS:
    return NAMED_LOADERS[name_or_path](dtype=dtype)
  for accepts, loader in PATH_LOADERS:
    if accepts(str(name_or_path)):
      return loader(str(name_or_path), dtype=dtype)
  raise ValueError(f"load({name_or_path!r}): expected one of {sorted(NAMED_LOADERS)}"
                   + (" or a path a loader accepts" if PATH_LOADERS else ""))
