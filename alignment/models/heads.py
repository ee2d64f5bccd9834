"""Heads on top of the transformer's final hidden states."""

import jax
import jax.numpy as jnp
from flax import nnx

from alignment.models.transformer import Transformer, _init_values


class ScalarHead(nnx.Module):
  """hidden [..., D] -> float32 [...]: one scalar per position (reward or value models).

  kernel [D, 1] ('embed', None), bias [1] (None,); computed in float32 whatever the hidden dtype.
  """

  def __init__(self, d_model: int, *, rngs: nnx.Rngs, param_dtype="float32"):
    # std 1/sqrt(D + 1), as HF/TRL initialise score heads: rewards start O(1) on unit-RMS hidden states.
    inits = (((d_model, 1), (d_model + 1) ** -0.5, 0.0), ((1,), None, 0.0))
    kernel, bias = _init_values(rngs.params(), inits, jnp.dtype(param_dtype))
    self.kernel = nnx.Param(kernel, out_sharding=("embed", None), eager_sharding=False)
    self.bias = nnx.Param(bias, out_sharding=(None,), eager_sharding=False)

  def __call__(self, hidden: jax.Array) -> jax.Array:
    out = jnp.einsum("...d,do->...o", hidden.astype(jnp.float32), self.kernel[...].astype(jnp.float32))
    return (out + self.bias[...].astype(jnp.float32))[..., 0]


class RewardModel(nnx.Module):
  """A decoder with a scalar head: tokens [B, T] -> float32 scores [B, T], one per position.

  A reward model reads the score at each sequence's last token; a value model reads every position.
  Params: {'backbone': the Transformer's params, 'head': the ScalarHead's}.
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    self.backbone = Transformer(cfg, rngs=rngs)
    self.head = ScalarHead(cfg.d_model, rngs=rngs, param_dtype=cfg.param_dtype)

  def __call__(self, tokens, positions=None, segment_ids=None, *, prefix_ids=None) -> jax.Array:
    return self.head(self.backbone(tokens, positions, segment_ids, prefix_ids=prefix_ids))
