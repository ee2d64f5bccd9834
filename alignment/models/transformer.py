"""Decoder-only transformer (Llama, SmolLM2, Qwen2, Gemma 3 text) as a Flax NNX module.

Every per-layer weight is stacked with a leading [L] ('layers') dimension; the forward applies one pure
function, `_layer`, to each layer's slice: with `lax.scan` when `cfg.scan_layers` (one compiled layer), a
Python loop otherwise, under `jax.checkpoint` when `cfg.remat` asks. Both paths use the same param tree.

Every parameter carries logical axis names (out_sharding metadata, never applied eagerly), so that
`nnx.get_partition_spec(nnx.state(model, nnx.Param))` gives e.g. P('layers', 'embed', 'heads', 'kv').
"""

import functools
import math
from typing import Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignment.models.config import ModelConfig

_F32 = jnp.float32
_MASKED = float(np.finfo(np.float32).min)
# Attention runs its queries in this many blocks (rows of at least 128 tokens that divide evenly): block i
# reads keys up to its own end only, skipping key blocks that causality masks anyway (3/8 of the scores
# at 4 blocks). On 4 rows of 256 tokens XLA:CPU ran SmolLM2's attention core ~30% faster, fwd and bwd.
_QUERY_BLOCKS = 4


class ParamSpec(NamedTuple):
  """One parameter: its shape, logical axis names, and init (normal(0, std) if std is set, else `fill`)."""
  shape: Tuple[int, ...]
  axes: Tuple[Optional[str], ...]
  std: Optional[float] = None
  fill: float = 0.0


def param_specs(cfg: ModelConfig) -> Dict[str, ParamSpec]:
  """The whole param tree, path -> ParamSpec. Per-layer weights are stacked: a leading [L] 'layers' dim.

  Norm scales are plain multipliers, initialised to 1. Projections draw from normal(0, fan_in ** -0.5).
  """
  L, D, H, KV, Dh, F = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
  specs = {
      "embed": ParamSpec((cfg.vocab_size, D), ("vocab", "embed"), std=cfg.init_std),
      "layers/attn_norm": ParamSpec((L, D), ("layers", "embed"), fill=1.0),
      "layers/attn/q": ParamSpec((L, D, H, Dh), ("layers", "embed", "heads", "kv"), std=D ** -0.5),
      "layers/attn/k": ParamSpec((L, D, KV, Dh), ("layers", "embed", "heads", "kv"), std=D ** -0.5),
      "layers/attn/v": ParamSpec((L, D, KV, Dh), ("layers", "embed", "heads", "kv"), std=D ** -0.5),
      "layers/attn/o": ParamSpec((L, H, Dh, D), ("layers", "heads", "kv", "embed"), std=(H * Dh) ** -0.5),
      "layers/mlp_norm": ParamSpec((L, D), ("layers", "embed"), fill=1.0),
      "layers/mlp/gate": ParamSpec((L, D, F), ("layers", "embed", "mlp"), std=D ** -0.5),
      "layers/mlp/up": ParamSpec((L, D, F), ("layers", "embed", "mlp"), std=D ** -0.5),
      "layers/mlp/down": ParamSpec((L, F, D), ("layers", "mlp", "embed"), std=F ** -0.5),
      "final_norm": ParamSpec((D,), ("embed",), fill=1.0),
  }
  if cfg.qkv_bias:
    specs["layers/attn/q_bias"] = ParamSpec((L, H, Dh), ("layers", "heads", "kv"))
    specs["layers/attn/k_bias"] = ParamSpec((L, KV, Dh), ("layers", "heads", "kv"))
    specs["layers/attn/v_bias"] = ParamSpec((L, KV, Dh), ("layers", "heads", "kv"))
  if cfg.qk_norm:
    specs["layers/attn/q_norm"] = ParamSpec((L, Dh), ("layers", "kv"), fill=1.0)
    specs["layers/attn/k_norm"] = ParamSpec((L, Dh), ("layers", "kv"), fill=1.0)
  if cfg.post_norms:
    specs["layers/post_attn_norm"] = ParamSpec((L, D), ("layers", "embed"), fill=1.0)
    specs["layers/post_mlp_norm"] = ParamSpec((L, D), ("layers", "embed"), fill=1.0)
  if not cfg.tie_embeddings:
    specs["unembed"] = ParamSpec((D, cfg.vocab_size), ("embed", "vocab"), std=D ** -0.5)
  return specs


@functools.partial(jax.jit, static_argnums=(1, 2))
def _init_values(key, inits, dtype):
  """All initial values from ONE normal draw: each RNG call site costs ~1 s of XLA compile on CPU, so a
  draw per param made a tiny model take 10+ s to build. inits: ((shape, std | None, fill), ...)."""
  n = sum(math.prod(shape) for shape, std, _ in inits if std is not None)
  flat = jax.random.normal(key, (max(n, 1),), _F32)
  values, offset = [], 0
  for shape, std, fill in inits:
    if std is None:
      values.append(jnp.full(shape, fill, dtype))
    else:
      size = math.prod(shape)
      values.append((std * flat[offset:offset + size].reshape(shape)).astype(dtype))
      offset += size
  return tuple(values)


class ParamGroup(nnx.Module):
  """An inner node of the param tree (e.g. `layers`, `layers/attn`)."""


class Transformer(nnx.Module):
  """tokens [B, T] -> final-norm hidden states [B, T, D] in the compute dtype.

  Param tree (see `param_specs`): embed [V, D]; layers/{attn_norm, attn/{q, k, v, o, q_bias.., q_norm..},
  post_attn_norm, mlp_norm, mlp/{gate, up, down}, post_mlp_norm}, each with a leading [L]; final_norm [D];
  unembed [D, V] when embeddings are untied.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    specs = param_specs(cfg)
    values = _init_values(rngs.params(), tuple((s.shape, s.std, s.fill) for s in specs.values()),
                          jnp.dtype(cfg.param_dtype))
    for (path, spec), value in zip(specs.items(), values):
      *groups, name = path.split("/")
      node = self
      for group in groups:
        if not hasattr(node, group):
          setattr(node, group, ParamGroup())
        node = getattr(node, group)
      # Sharding is applied by the caller (jit out_shardings from these logical names), not here.
      setattr(node, name, nnx.Param(value, out_sharding=spec.axes, eager_sharding=False))

  def __call__(self, tokens: jax.Array, positions: Optional[jax.Array] = None,
               segment_ids: Optional[jax.Array] = None) -> jax.Array:
    """tokens, positions, segment_ids: [B, T] int32. positions default to arange(T) per row; segment_ids
    to all ones. A token attends to earlier tokens of its own segment only; segment 0 is padding (its
    outputs are finite and meaningless, and no other token sees it). Returns the final hidden states
    [B, T, D] after the final norm."""
    return self.top(*self.trunk(tokens, positions, segment_ids))

  def trunk(self, tokens: jax.Array, positions: Optional[jax.Array] = None,
            segment_ids: Optional[jax.Array] = None):
    """The embedding and the first `cfg.frozen_layers` layers -> (x [B, T, D], attention context).

    Those layers run under stop_gradient (their weights get zero gradient and the backward pass ends
    above them), as does the embedding lookup when `cfg.frozen_embeddings`. Two models that share
    these weights (a policy and its frozen reference) can share one trunk pass."""
    cfg = self.cfg
    B, T = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids is None:
      segment_ids = jnp.ones((B, T), jnp.int32)
    dtype = jnp.dtype(cfg.dtype)
    embed = jax.lax.stop_gradient(self.embed[...]) if cfg.frozen_embeddings else self.embed[...]
    x = jnp.take(embed, tokens, axis=0).astype(dtype)
    if cfg.embed_scale:
      x = x * jnp.asarray(cfg.embed_multiplier, dtype)
    ctx = _context(cfg, positions, segment_ids)
    n = cfg.frozen_layers
    if n:
      lower = jax.tree.map(lambda a: jax.lax.stop_gradient(a[:n]), self._layer_weights())
      x = jax.lax.stop_gradient(_apply_layers(cfg, x, lower, ctx, cfg.layer_is_local[:n]))
    return x, ctx

  def top(self, x: jax.Array, ctx) -> jax.Array:
    """The layers above the trunk and the final norm: (x, ctx) from `trunk` -> hidden [B, T, D]."""
    cfg = self.cfg
    n = cfg.frozen_layers
    upper = jax.tree.map(lambda a: a[n:], self._layer_weights()) if n else self._layer_weights()
    x = _apply_layers(cfg, x, upper, ctx, cfg.layer_is_local[n:])
    return _rms_norm(x, self.final_norm[...], cfg.rms_eps)

  def _layer_weights(self) -> dict:
    return nnx.to_pure_dict(nnx.state(self.layers, nnx.Param))

  def unembed_matrix(self) -> jax.Array:
    """[D, V] in the param dtype: the tied embedding transposed, or the separate unembedding (a tied one
    under stop_gradient when `cfg.frozen_embeddings`)."""
    if self.cfg.tie_embeddings:
      return (jax.lax.stop_gradient(self.embed[...]) if self.cfg.frozen_embeddings else self.embed[...]).T
    return self.unembed[...]


# The forward, as pure functions of arrays.


def _rms_norm(x, scale, eps):
  """RMSNorm over the last dim, computed in float32, returned in x's dtype."""
  x32 = x.astype(_F32)
  y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (y * scale.astype(_F32)).astype(x.dtype)


def _rope_tables(positions, head_dim, theta):
  """positions [B, T] -> (cos, sin) [B, T, head_dim // 2] float32."""
  inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
  angles = positions.astype(_F32)[..., None] * jnp.asarray(inv_freq, _F32)
  return jnp.cos(angles), jnp.sin(angles)


def _rope(x, cos, sin):
  """HF rotate-half RoPE. x [B, T, N, Dh]; cos, sin [B, T, Dh // 2]; float32 inside."""
  x1, x2 = jnp.split(x.astype(_F32), 2, axis=-1)
  c, s = cos[:, :, None, :], sin[:, :, None, :]
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def _context(cfg: ModelConfig, positions, segment_ids):
  """Per-call tensors shared by all layers: RoPE tables and boolean masks [B, T, T] (query, key)."""
  T = positions.shape[1]
  idx = jnp.arange(T)
  causal = idx[None, :] <= idx[:, None]
  # Padding (segment 0) attends to earlier padding, so no row is empty and nothing is NaN.
  mask = causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
  local = set(cfg.layer_is_local)
  ctx = {"rope": _rope_tables(positions, cfg.head_dim, cfg.rope_theta), "mask": mask}
  if True in local:
    ctx["local_rope"] = (ctx["rope"] if cfg.local_theta == cfg.rope_theta
                         else _rope_tables(positions, cfg.head_dim, cfg.local_theta))
    # Windowed by token index, as HF does; within a segment that equals the position difference.
    ctx["local_mask"] = mask & ((idx[:, None] - idx[None, :]) < cfg.sliding_window)[None]
  return ctx


def _select(is_local, local, global_):
  """Picks the local or global variant; statically when is_local is a Python bool (no runtime cost)."""
  if isinstance(is_local, bool):
    return local if is_local else global_
  return jax.tree.map(lambda a, b: jnp.where(is_local, a, b), local, global_)


def _dense(x, w, contract: int = 1):
  """x [B, T, *in] @ w [*in, *out] -> [B, T, *out], `in` being the last `contract` axes of x, as one 2-D
  matmul: XLA:CPU runs the backward of the equivalent batched einsum ~25% slower (the weight gradient
  contracts over both B and T)."""
  lead, n_in = x.shape[:-contract], math.prod(x.shape[-contract:])
  out = w.shape[contract:]
  return (x.reshape(-1, n_in) @ w.reshape(n_in, -1)).reshape(*lead, *out)


def _attention(cfg: ModelConfig, x, w, rope, mask):
  """Grouped-query causal attention. x [B, T, D]; w: one layer's attention arrays; mask [B, T, T]."""
  dtype = x.dtype
  B, T, _ = x.shape
  q, k, v = (_dense(x, w[name].astype(dtype)) for name in ("q", "k", "v"))
  if cfg.qkv_bias:
    q, k, v = q + w["q_bias"].astype(dtype), k + w["k_bias"].astype(dtype), v + w["v_bias"].astype(dtype)
  if cfg.qk_norm:
    q, k = _rms_norm(q, w["q_norm"], cfg.rms_eps), _rms_norm(k, w["k_norm"], cfg.rms_eps)
  q, k = _rope(q, *rope), _rope(k, *rope)
  # Query head h = kv_head * G + g, as HF's repeat_kv; K and V are never repeated.
  KV, Dh = cfg.n_kv_heads, cfg.head_dim
  q = q.reshape(B, T, KV, cfg.n_heads // KV, Dh)
  blocks = _QUERY_BLOCKS if T % _QUERY_BLOCKS == 0 and T >= _QUERY_BLOCKS * 32 else 1
  size = T // blocks
  out = jnp.concatenate([_attend(cfg, q[:, i * size:(i + 1) * size], k[:, :(i + 1) * size], v[:, :(i + 1) * size],
                                 mask[:, i * size:(i + 1) * size, :(i + 1) * size]) for i in range(blocks)], axis=1)
  return _dense(out.reshape(B, T, cfg.n_heads, Dh), w["o"].astype(dtype), contract=2)


def _attend(cfg: ModelConfig, q, k, v, mask):
  """softmax(q k^T * scale) v over the keys `mask` allows. q [B, Tq, KV, G, Dh]; k, v [B, Tk, KV, Dh];
  mask [B, Tq, Tk] -> [B, Tq, KV, G, Dh]."""
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=_F32) * cfg.attn_scale
  scores = jnp.where(mask[:, None, None], scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  return jnp.einsum("bkgts,bskd->btkgd", probs, v)


def _mlp(cfg: ModelConfig, x, w):
  dtype = x.dtype
  act = jax.nn.silu if cfg.activation == "silu" else functools.partial(jax.nn.gelu, approximate=True)
  gate, up = _dense(x, w["gate"].astype(dtype)), _dense(x, w["up"].astype(dtype))
  return _dense(act(gate) * up, w["down"].astype(dtype))


def _layer(cfg: ModelConfig, x, w, ctx, is_local):
  """One pre-norm decoder layer. x [B, T, D]; w: this layer's arrays (no leading L); is_local: a Python
  bool, or a traced bool scalar when a scan runs over layers of both kinds."""
  rope = _select(is_local, ctx.get("local_rope"), ctx["rope"])
  mask = _select(is_local, ctx.get("local_mask"), ctx["mask"])
  h = _attention(cfg, _rms_norm(x, w["attn_norm"], cfg.rms_eps), w["attn"], rope, mask)
  if cfg.post_norms:
    h = _rms_norm(h, w["post_attn_norm"], cfg.rms_eps)
  x = x + h
  h = _mlp(cfg, _rms_norm(x, w["mlp_norm"], cfg.rms_eps), w["mlp"])
  if cfg.post_norms:
    h = _rms_norm(h, w["post_mlp_norm"], cfg.rms_eps)
  return x + h


# remat -> the jax.checkpoint policy (None: save nothing but the layer's input). 'all_dots' trades the
# elementwise intermediates autodiff would store (several [T, d_ff] arrays a layer) for recomputing them,
# which on CPU is faster than writing and reading them back: benchmarks/RESULTS.md, dpo_step.
_REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                   "all_dots": jax.checkpoint_policies.dots_saveable}


def _remat(cfg: ModelConfig, fn):
  if cfg.remat == "none":
    return fn
  return jax.checkpoint(fn, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


def _apply_layers(cfg: ModelConfig, x, weights, ctx, flags):
  """Runs stacked layers. x [B, T, D]; weights: nested dict of [L', ...] arrays; flags: their is-local flags."""
  if not cfg.scan_layers:
    for i, is_local in enumerate(flags):
      layer = _remat(cfg, functools.partial(_layer, cfg, is_local=is_local))
      x = layer(x, jax.tree.map(lambda a: a[i], weights), ctx)
    return x
  if len(set(flags)) == 1:  # all layers alike: the flag stays static
    layer = _remat(cfg, functools.partial(_layer, cfg, is_local=flags[0]))
    x, _ = jax.lax.scan(lambda carry, w: (layer(carry, w, ctx), None), x, weights)
    return x
  # Local and global layers mixed (Gemma 3): the per-layer flag is a scanned input.
  layer = _remat(cfg, functools.partial(_layer, cfg))
  x, _ = jax.lax.scan(lambda carry, xs: (layer(carry, xs[0], ctx, xs[1]), None), x,
                      (weights, jnp.asarray(flags)))
  return x
