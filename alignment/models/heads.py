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


class StandardizedHead(nnx.Module):
  """features [..., F] -> float32 [...]: a ScalarHead on (features - shift) * scale, where shift and scale are
  fixed statistics of the training features (set once, never trained: no gradient reaches them).

  Params: {'shift' [F], 'scale' [F] (0 and 1 until set), 'linear': the ScalarHead's}."""

  def __init__(self, features: int, *, rngs: nnx.Rngs, param_dtype="float32"):
    self.shift = nnx.Param(jnp.zeros((features,), param_dtype), out_sharding=(None,), eager_sharding=False)
    self.scale = nnx.Param(jnp.ones((features,), param_dtype), out_sharding=(None,), eager_sharding=False)
    self.linear = ScalarHead(features, rngs=rngs, param_dtype=param_dtype)

  def __call__(self, features: jax.Array) -> jax.Array:
    shift, scale = (jax.lax.stop_gradient(p[...].astype(jnp.float32)) for p in (self.shift, self.scale))
    return self.linear((features.astype(jnp.float32) - shift) * scale)


class PooledProbe(nnx.Module):
  """A frozen decoder read by a linear head on its hidden states averaged over each sequence, at several
  depths: packed rows -> float32 [R, K], one score per sequence slot (segment k + 1 of a row is slot k).

  The feature of a sequence at tap L is the mean over its tokens of the residual stream after L layers,
  each token's vector first scaled to unit RMS (no learned scale: the depths' scales differ by orders of
  magnitude); the taps' features are concatenated. Linear probes on middle layers, averaged over the
  tokens, separate what a request asks for better than the last token of the last layer (measured on
  SmolLM2 and the safety splits: alignment/safety/classifier.py). `cfg.frozen_layers` and
  `cfg.frozen_embeddings` freeze the backbone as in a Transformer (a probe proper freezes all of it).
  Params: {'backbone': the Transformer's params, 'head': a StandardizedHead over len(taps) * d_model features}.
  """

  def __init__(self, cfg, taps, *, rngs: nnx.Rngs):
    self.taps = tuple(int(t) for t in taps)
    if not self.taps or list(self.taps) != sorted(set(self.taps)) or not 1 <= self.taps[0] <= self.taps[-1] <= cfg.n_layers:
      raise ValueError(f"probe taps {taps}: expected increasing layer counts in 1..{cfg.n_layers}")
    self.backbone = Transformer(cfg, rngs=rngs)
    self.head = self.make_head(cfg, self.taps, rngs)

  @staticmethod
  def make_head(cfg, taps, rngs: nnx.Rngs) -> nnx.Module:
    return StandardizedHead(cfg.d_model * len(taps), rngs=rngs, param_dtype=cfg.param_dtype)

  def features(self, tokens, positions, segment_ids, slots: int) -> jax.Array:
    """float32 [R, slots, len(taps) * D] (zeros for an empty slot)."""
    from alignment.models import transformer as tfm
    backbone = self.backbone
    cfg = backbone.cfg
    table = jax.lax.stop_gradient(backbone.embed[...]) if cfg.frozen_embeddings else backbone.embed[...]
    x = tfm.embed(cfg, table, tokens)
    ctx = tfm.context(cfg, positions, segment_ids)
    n = cfg.frozen_layers
    weights = jax.tree.map(lambda a: jnp.concatenate([jax.lax.stop_gradient(a[:n]), a[n:]]) if n else a,
                           backbone._layer_weights())
    member = (segment_ids[..., None] == jnp.arange(1, slots + 1)).astype(jnp.float32)  # [R, T, K]
    count = jnp.maximum(member.sum(axis=1), 1.0)[..., None]
    out, start = [], 0
    for tap in self.taps:
      x, _ = tfm.apply_layers(cfg, x, jax.tree.map(lambda a: a[start:tap], weights), ctx,
                              cfg.layer_is_local[start:tap])
      start = tap
      h = x.astype(jnp.float32)
      h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + cfg.rms_eps)
      out.append(jnp.einsum("rtd,rtk->rkd", h, member) / count)
    return jnp.concatenate(out, axis=-1)

  def __call__(self, tokens, positions, segment_ids, slots: int) -> jax.Array:
    return self.head(self.features(tokens, positions, segment_ids, slots))
