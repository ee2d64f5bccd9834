"""Decoder-only transformer (Llama, SmolLM2, Qwen2, Gemma 3 text) as a Flax NNX module.

Every per-layer weight is stacked with a leading [L] ('layers') dimension; the forward applies one pure
function, `layer`, to each layer's slice: with `lax.scan` when `cfg.scan_layers` (one compiled layer), a
Python loop otherwise, under `jax.checkpoint` when `cfg.remat` asks. Both paths use the same param tree.
The same `layer` serves the KV-cache sampler (`alignment.models.sampler`): given a cache, attention writes
the new keys and values into it and attends over it, so sampler and trainer compute the same numbers.

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
               segment_ids: Optional[jax.Array] = None, *, prefix_ids: Optional[jax.Array] = None) -> jax.Array:
    """tokens, positions, segment_ids: [B, T] int32. positions default to arange(T) per row; segment_ids
    to all ones. A token attends to earlier tokens of its own segment only; segment 0 is padding (its
    outputs are finite and meaningless, and no other token sees it). prefix_ids [B, T] int32 (prefix
    sharing, see `context`): a token also attends to earlier tokens of the segment its prefix id names.
    Returns the final hidden states [B, T, D] after the final norm."""
    return self.top(*self.trunk(tokens, positions, segment_ids, prefix_ids=prefix_ids))

  def trunk(self, tokens: jax.Array, positions: Optional[jax.Array] = None,
            segment_ids: Optional[jax.Array] = None, *, prefix_ids: Optional[jax.Array] = None):
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
    table = jax.lax.stop_gradient(self.embed[...]) if cfg.frozen_embeddings else self.embed[...]
    x = embed(cfg, table, tokens)
    ctx = context(cfg, positions, segment_ids, prefix_ids)
    n = cfg.frozen_layers
    if n:
      lower = jax.tree.map(lambda a: jax.lax.stop_gradient(a[:n]), self._layer_weights())
      x = jax.lax.stop_gradient(apply_layers(cfg, x, lower, ctx, cfg.layer_is_local[:n])[0])
    return x, ctx

  def top(self, x: jax.Array, ctx) -> jax.Array:
    """The layers above the trunk and the final norm: (x, ctx) from `trunk` -> hidden [B, T, D]."""
    cfg = self.cfg
    n = cfg.frozen_layers
    upper = jax.tree.map(lambda a: a[n:], self._layer_weights()) if n else self._layer_weights()
    x, _ = apply_layers(cfg, x, upper, ctx, cfg.layer_is_local[n:])
    return final_norm(cfg, x, self.final_norm[...])

  def _layer_weights(self) -> dict:
    return nnx.to_pure_dict(nnx.state(self.layers, nnx.Param))

  def unembed_matrix(self) -> jax.Array:
    """[D, V] in the param dtype: the tied embedding transposed, or the separate unembedding (a tied one
    under stop_gradient when `cfg.frozen_embeddings`)."""
    if self.cfg.tie_embeddings:
      return (jax.lax.stop_gradient(self.embed[...]) if self.cfg.frozen_embeddings else self.embed[...]).T
    return self.unembed[...]


# The forward, as pure functions of arrays: the same code trains (no cache), prefills and decodes (a
# KV cache). `embed`, `context` / `cache_context`, `apply_layers` (or `layer`) and `final_norm` are what
# the KV-cache sampler calls; `init_cache` and `fuse_weights` give it the cache and the decode weights.


def embed(cfg: ModelConfig, table, tokens):
  """tokens [B, T] int32 -> x [B, T, D] in the compute dtype. table: the embedding [V, D]."""
  x = jnp.take(table, tokens, axis=0).astype(cfg.dtype)
  if cfg.embed_scale:
    x = x * jnp.asarray(cfg.embed_multiplier, cfg.dtype)
  return x


def final_norm(cfg: ModelConfig, x, scale):
  """x [..., D] -> the final-norm hidden states in x's dtype. scale: the `final_norm` param [D]."""
  return _rms_norm(x, scale, cfg.rms_eps)


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


def context(cfg: ModelConfig, positions, segment_ids, prefix_ids=None):
  """Per-call tensors shared by all layers, without a cache: RoPE tables and boolean masks [B, T, T]
  (query, key). positions, segment_ids [B, T] int32.

  prefix_ids [B, T] int32 (None: all 0) shares one prompt between several continuations in a row: a
  token's prefix id is the segment id of the prompt its segment continues (0: none), and the token also
  attends to that segment's earlier tokens. A continuation's positions carry on from its prompt's, so
  the local layers then window by position difference: each continuation sees what it would in a row
  of its own."""
  idx = jnp.arange(positions.shape[1])
  causal = idx[None, :] <= idx[:, None]
  # Padding (segment 0) attends to earlier padding, so no row is empty and nothing is NaN.
  mask = causal[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
  if prefix_ids is None:
    # Windowed by token index, as HF does; within a segment that equals the position difference.
    return _context(cfg, positions, mask, (idx[:, None] - idx[None, :])[None])
  prefix = (prefix_ids[:, :, None] != 0) & (segment_ids[:, None, :] == prefix_ids[:, :, None])
  return _context(cfg, positions, mask | (causal[None] & prefix), positions[:, :, None] - positions[:, None, :])


def cache_context(cfg: ModelConfig, positions, slot, key_valid):
  """Per-call tensors shared by all layers when tokens [B, T] go to cache slots slot..slot+T-1. slot: an
  int32 scalar, the same for every row (left-padded prompts), or int32 [B], a slot per row (rows at
  their own positions, T = 1: the server's continuous batching). positions [B, T]: their RoPE
  positions; key_valid [B, S]: the slots holding a real token, these included. A query sees the valid
  slots up to its own (masks [B, T, S])."""
  q_idx = jnp.reshape(slot, (-1, 1)) + jnp.arange(positions.shape[1])[None, :]  # [1 or B, T]
  k_idx = jnp.arange(key_valid.shape[1])[None, None, :]
  distance = q_idx[:, :, None] - k_idx
  ctx = _context(cfg, positions, key_valid[:, None, :] & (distance >= 0), distance)
  ctx["slot"] = slot
  return ctx


def _context(cfg: ModelConfig, positions, mask, distance):
  """RoPE tables and masks; the local layers' mask adds the sliding window over `distance` [B or 1, T, S]
  (query - key, in token index or position)."""
  ctx = {"rope": _rope_tables(positions, cfg.head_dim, cfg.rope_theta), "mask": mask}
  if True in cfg.layer_is_local:
    ctx["local_rope"] = (ctx["rope"] if cfg.local_theta == cfg.rope_theta
                         else _rope_tables(positions, cfg.head_dim, cfg.local_theta))
    ctx["local_mask"] = mask & (distance < cfg.sliding_window)
  return ctx


def init_cache(cfg: ModelConfig, batch: int, length: int) -> dict:
  """An empty KV cache for `length` slots, stacked over layers, in the compute dtype: k [L, B, KV, Dh, S]
  and v [L, B, KV, S, Dh], laid out for the attention matmuls to read them as they lie (no transpose
  of the whole cache at each decode step)."""
  L, KV, Dh = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim
  return {"k": jnp.zeros((L, batch, KV, Dh, length), cfg.dtype),
          "v": jnp.zeros((L, batch, KV, length, Dh), cfg.dtype)}


def fuse_weights(cfg: ModelConfig, w: dict) -> dict:
  """One layer's weights with q, k and v as one `qkv` [D, (H + 2 KV) * Dh] (their biases as one
  `qkv_bias`) and gate and up as one `gate_up` [D, 2F]. At a few rows per step (decoding) each matmul
  is short, so fewer, wider ones cost less. `layer` reads either form."""
  attn, mlp = dict(w["attn"]), dict(w["mlp"])
  attn["qkv"] = jnp.concatenate([attn.pop(n).reshape(cfg.d_model, -1) for n in ("q", "k", "v")], axis=-1)
  if cfg.qkv_bias:
    attn["qkv_bias"] = jnp.concatenate([attn.pop(n).reshape(-1) for n in ("q_bias", "k_bias", "v_bias")])
  mlp["gate_up"] = jnp.concatenate([mlp.pop("gate"), mlp.pop("up")], axis=-1)
  return {**w, "attn": attn, "mlp": mlp}


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


def query_blocks(tokens: int) -> int:
  """How many query blocks attention over `tokens` (no cache) runs in: _QUERY_BLOCKS, or 1 when they would
  not divide the tokens evenly into blocks of at least 32."""
  return _QUERY_BLOCKS if tokens % _QUERY_BLOCKS == 0 and tokens >= _QUERY_BLOCKS * 32 else 1


def _qkv(cfg: ModelConfig, x, w):
  """x [B, T, D] -> q [B, T, H, Dh], k and v [B, T, KV, Dh], from q, k, v or a fused `qkv`."""
  dtype = x.dtype
  if "qkv" not in w:
    q, k, v = (_dense(x, w[name].astype(dtype)) for name in ("q", "k", "v"))
    if cfg.qkv_bias:
      q, k, v = q + w["q_bias"].astype(dtype), k + w["k_bias"].astype(dtype), v + w["v_bias"].astype(dtype)
    return q, k, v
  B, T, _ = x.shape
  H, KV, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  qkv = _dense(x, w["qkv"].astype(dtype))
  if cfg.qkv_bias:
    qkv = qkv + w["qkv_bias"].astype(dtype)
  q, k, v = jnp.split(qkv, [H * Dh, (H + KV) * Dh], axis=-1)
  return q.reshape(B, T, H, Dh), k.reshape(B, T, KV, Dh), v.reshape(B, T, KV, Dh)


def _attention(cfg: ModelConfig, x, w, rope, mask, cache=None, slot=None):
  """Grouped-query causal attention. x [B, T, D]; w: one layer's attention arrays (q, k, v or qkv).

  Without a cache, mask is [B, T, T]. With one (see `init_cache`, one layer's slice), the new keys and
  values are written at cache slots slot..slot+T-1 (or at slot[b] in row b) and the queries attend over
  the whole cache under mask [B, T, S]. Returns (out [B, T, D], the updated cache or None)."""
  dtype = x.dtype
  B, T, _ = x.shape
  q, k, v = _qkv(cfg, x, w)
  if cfg.qk_norm:
    q, k = _rms_norm(q, w["q_norm"], cfg.rms_eps), _rms_norm(k, w["k_norm"], cfg.rms_eps)
  q, k = _rope(q, *rope), _rope(k, *rope)
  # Query head h = kv_head * G + g, as HF's repeat_kv; K and V are never repeated.
  KV, Dh = cfg.n_kv_heads, cfg.head_dim
  q = q.reshape(B, T, KV, cfg.n_heads // KV, Dh)
  if cache is not None:
    k, v = k.transpose(0, 2, 3, 1).astype(cache["k"].dtype), v.transpose(0, 2, 1, 3).astype(cache["v"].dtype)
    if jnp.ndim(slot) == 1:  # a slot per row, one token each
      rows = jnp.arange(B)
      cache = {"k": cache["k"].at[rows, :, :, slot].set(k[..., 0]), "v": cache["v"].at[rows, :, slot].set(v[:, :, 0])}
    else:
      cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k, (0, 0, 0, slot)),
               "v": jax.lax.dynamic_update_slice(cache["v"], v, (0, 0, slot, 0))}
    out = _attend(cfg, q, cache["k"].astype(dtype), cache["v"].astype(dtype), mask, cached=True)
  else:
    blocks = query_blocks(T)
    size = T // blocks
    out = jnp.concatenate([_attend(cfg, q[:, i * size:(i + 1) * size], k[:, :(i + 1) * size], v[:, :(i + 1) * size],
                                   mask[:, i * size:(i + 1) * size, :(i + 1) * size]) for i in range(blocks)], axis=1)
  return _dense(out.reshape(B, T, cfg.n_heads, Dh), w["o"].astype(dtype), contract=2), cache


def _attend(cfg: ModelConfig, q, k, v, mask, cached=False):
  """softmax(q k^T * scale) v over the keys `mask` allows. q [B, Tq, KV, G, Dh]; mask [B, Tq, Tk] ->
  [B, Tq, KV, G, Dh]. k, v [B, Tk, KV, Dh] as projected, or when `cached` as a cache holds them:
  k [B, KV, Dh, Tk], v [B, KV, Tk, Dh]."""
  if cached:
    # Scores and output in the matmuls' own order, [B, KV, Tq, G, ...]: at Tq = 1 (decode) XLA:CPU then
    # runs the layer with no transpose; the training order below costs it 4 small ones a layer there.
    scores = jnp.einsum("btkgd,bkds->bktgs", q, k, preferred_element_type=_F32) * cfg.attn_scale
    probs = _masked_softmax(scores, mask[:, None, :, None], q.dtype)
    return jnp.swapaxes(jnp.einsum("bktgs,bksd->bktgd", probs, v), 1, 2)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=_F32) * cfg.attn_scale
  probs = _masked_softmax(scores, mask[:, None, None], q.dtype)
  return jnp.einsum("bkgts,bskd->btkgd", probs, v)


def _masked_softmax(scores, mask, dtype):
  """softmax over the last axis of float32 scores where mask (broadcast) is True, in `dtype`."""
  return jax.nn.softmax(jnp.where(mask, scores, _MASKED), axis=-1).astype(dtype)


def _mlp(cfg: ModelConfig, x, w):
  """Gated MLP, from gate and up or a fused `gate_up`. x [B, T, D] -> [B, T, D]."""
  dtype = x.dtype
  act = jax.nn.silu if cfg.activation == "silu" else functools.partial(jax.nn.gelu, approximate=True)
  if "gate_up" in w:
    gate, up = jnp.split(_dense(x, w["gate_up"].astype(dtype)), 2, axis=-1)
  else:
    gate, up = _dense(x, w["gate"].astype(dtype)), _dense(x, w["up"].astype(dtype))
  return _dense(act(gate) * up, w["down"].astype(dtype))


def layer(cfg: ModelConfig, x, w, ctx, is_local, cache=None):
  """One pre-norm decoder layer. x [B, T, D]; w: this layer's arrays (no leading L; unfused, or fused by
  `fuse_weights`); ctx: from `context`, or from `cache_context` with a cache; is_local: a Python bool,
  or a traced bool scalar when a scan runs over layers of both kinds; cache: None, or this layer's
  {'k', 'v'} (`init_cache` without the L). Returns (x, the updated cache or None)."""
  rope = _select(is_local, ctx.get("local_rope"), ctx["rope"])
  mask = _select(is_local, ctx.get("local_mask"), ctx["mask"])
  h, cache = _attention(cfg, _rms_norm(x, w["attn_norm"], cfg.rms_eps), w["attn"], rope, mask, cache,
                        ctx.get("slot"))
  if cfg.post_norms:
    h = _rms_norm(h, w["post_attn_norm"], cfg.rms_eps)
  x = x + h
  h = _mlp(cfg, _rms_norm(x, w["mlp_norm"], cfg.rms_eps), w["mlp"])
  if cfg.post_norms:
    h = _rms_norm(h, w["post_mlp_norm"], cfg.rms_eps)
  return x + h, cache


# remat -> the jax.checkpoint policy (None: save nothing but the layer's input). 'all_dots' trades the
# elementwise intermediates autodiff would store (several [T, d_ff] arrays a layer) for recomputing them,
# which on CPU is faster than writing and reading them back: benchmarks/RESULTS.md, dpo_step.
_REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                   "all_dots": jax.checkpoint_policies.dots_saveable}


def _remat(cfg: ModelConfig, fn):
  if cfg.remat == "none":
    return fn
  return jax.checkpoint(fn, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


def apply_layers(cfg: ModelConfig, x, weights, ctx, flags, caches=None):
  """Runs layers over x [B, T, D]; flags: their is-local flags. Returns (x, the updated caches or None).

  Without caches (training), weights are stacked ([L', ...] arrays) and run under `cfg.remat`, scanned
  when `cfg.scan_layers`. With caches, either stacked weights and the stacked cache of `init_cache`
  (scanned; prefill), or lists of per-layer weights and caches (unrolled; decode, where slicing stacked
  weights inside a loop would copy them every step)."""
  if caches is not None:
    return _apply_cached(cfg, x, weights, ctx, flags, caches)
  if not len(flags):  # no layer (above a trunk that holds them all)
    return x, None
  if not cfg.scan_layers:
    for i, is_local in enumerate(flags):
      fn = _remat(cfg, functools.partial(layer, cfg, is_local=is_local))
      x, _ = fn(x, jax.tree.map(lambda a: a[i], weights), ctx)
    return x, None
  if len(set(flags)) == 1:  # all layers alike: the flag stays static
    fn = _remat(cfg, functools.partial(layer, cfg, is_local=flags[0]))
    x, _ = jax.lax.scan(lambda carry, w: (fn(carry, w, ctx)[0], None), x, weights)
    return x, None
  # Local and global layers mixed (Gemma 3): the per-layer flag is a scanned input.
  fn = _remat(cfg, functools.partial(layer, cfg))
  x, _ = jax.lax.scan(lambda carry, xs: (fn(carry, xs[0], ctx, xs[1])[0], None), x,
                      (weights, jnp.asarray(flags)))
  return x, None


def _apply_cached(cfg: ModelConfig, x, weights, ctx, flags, caches):
  """`apply_layers` with caches: per-layer lists unrolled, or stacked weights and cache scanned."""
  if isinstance(caches, (list, tuple)):
    new = []
    for w, cache, is_local in zip(weights, caches, flags):
      x, cache = layer(cfg, x, w, ctx, is_local, cache)
      new.append(cache)
    return x, new

  def body(carry, xs):
    x, caches = carry
    w, i, is_local = xs
    cache = jax.tree.map(lambda c: jax.lax.dynamic_index_in_dim(c, i, keepdims=False), caches)
    x, cache = layer(cfg, x, w, ctx, flags[0] if len(set(flags)) == 1 else is_local, cache)
    # Write back only this layer's slice: the loop carries one cache buffer, updated in place.
    caches = jax.tree.map(lambda c, n: jax.lax.dynamic_update_index_in_dim(c, n, i, 0), caches, cache)
    return (x, caches), None

  (x, caches), _ = jax.lax.scan(body, (x, caches), (weights, jnp.arange(len(flags)), jnp.asarray(flags)))
  return x, caches
