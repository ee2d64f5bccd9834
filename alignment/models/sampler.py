"""KV-cache sampler: batched prompts of different lengths, prefill and decode in one jitted function.

    prompts, lengths = pad_prompts(list_of_id_lists, pad_id)
    out = sample(model, prompts, lengths, SamplingConfig(max_new_tokens=64, eos_ids=(2,)), rng)
    out.tokens [B, N] int32, out.logprobs [B, N] float32, out.mask [B, N] (1 up to and including EOS)

Prompts are left-padded, so every row's next token goes to the same cache slot and one decode step
serves the whole batch. The cache holds [L, B, S, KV, Dh] keys and values, S = P + max_new_tokens.
The forward is the model's own: we run its pure layer pieces (`transformer._rms_norm`, `_rope`, `_mlp`)
on its own params, only attention reads and writes the cache. The prefill scans the stacked layers;
the decode loop (a `lax.while_loop` that stops when every row hit EOS) is unrolled over layers. Params are the plain nested dict of
`nnx.to_pure_dict(nnx.state(model, nnx.Param))` (what the trainer holds), so rollouts use live params.

`logprobs` are under the distribution the token was drawn from: softmax(logits / T) restricted to
the top-k / top-p set and renormalised; for greedy decoding, softmax(logits) (T = 1, untruncated), the
teacher-forced log-probabilities.
"""

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from alignment.models import transformer as tfm
from alignment.models.config import ModelConfig

_F32 = jnp.float32
_MASKED = float(np.finfo(np.float32).min)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How to draw tokens. top_k=0 and top_p=1.0 switch those filters off; greedy ignores all three."""
  max_new_tokens: int = 64
  greedy: bool = False
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  eos_ids: tuple = ()  # a row stops after emitting any of these (the EOS itself is kept, mask 1)
  pad_id: int = 0  # what fills a row after it stopped

  def __post_init__(self):
    if self.max_new_tokens <= 0:
      raise ValueError(f"SamplingConfig.max_new_tokens={self.max_new_tokens}; expected > 0")
    if not self.greedy and not self.temperature > 0:
      raise ValueError(f"SamplingConfig.temperature={self.temperature}; expected > 0 (or greedy=True)")
    if self.top_k < 0 or not 0 < self.top_p <= 1:
      raise ValueError(f"SamplingConfig top_k={self.top_k} (>= 0), top_p={self.top_p} (in (0, 1])")
    object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))


class Samples(NamedTuple):
  tokens: jax.Array  # [B, N] int32, pad_id after a row stopped
  logprobs: jax.Array  # [B, N] float32, log-probability of each token under its sampling distribution
  mask: jax.Array  # [B, N] int32, 1 on generated tokens up to and including EOS
  lengths: jax.Array  # [B] int32, number of generated tokens (sum of mask)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 32):
  """Left-pads id lists into int32 [B, P] (P rounded up to `multiple`, to reuse compilations) and
  returns (tokens, lengths [B])."""
  lengths = np.array([len(p) for p in prompts], np.int32)
  if (lengths <= 0).any():
    raise ValueError("pad_prompts: every prompt needs at least one token")
  width = int(-(-lengths.max() // multiple) * multiple)
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, width - len(p):] = p
  return tokens, lengths


# ----------------------------------------------------------------------------------------------
# Token selection


def process_logits(logits: jax.Array, s: SamplingConfig) -> jax.Array:
  """[B, V] float32 logits -> log-probabilities of the sampling distribution (-inf outside it)."""
  if s.greedy:
    return jax.nn.log_softmax(logits, axis=-1)
  logits = logits / s.temperature
  V = logits.shape[-1]
  if 0 < s.top_k < V:
    kth = jax.lax.top_k(logits, s.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if s.top_p < 1.0:
    # Keep the smallest prefix of tokens, by descending probability, whose mass reaches top_p (the
    # first token always; ties at the threshold are kept, as HF's TopPLogitsWarper keeps them).
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each sorted token
    keep = before < s.top_p
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return jax.nn.log_softmax(logits, axis=-1)


def _choose(logprobs: jax.Array, s: SamplingConfig, rng) -> jax.Array:
  if s.greedy:
    return jnp.argmax(logprobs, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, logprobs, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------------------------
# Cached forward


def _cached_attention(cfg: ModelConfig, x, w, cache_k, cache_v, start, rope, mask):
  """x [B, T, D] at cache slots [start, start + T). Writes this layer's new keys/values into
  cache_k/v [B, S, KV, Dh], then attends over the whole cache under mask [B, T, S]."""
  dtype = x.dtype
  B, T, _ = x.shape
  q = jnp.einsum("btd,dhk->bthk", x, w["q"].astype(dtype))
  k = jnp.einsum("btd,dhk->bthk", x, w["k"].astype(dtype))
  v = jnp.einsum("btd,dhk->bthk", x, w["v"].astype(dtype))
  if cfg.qkv_bias:
    q, k, v = q + w["q_bias"].astype(dtype), k + w["k_bias"].astype(dtype), v + w["v_bias"].astype(dtype)
  if cfg.qk_norm:
    q, k = tfm._rms_norm(q, w["q_norm"], cfg.rms_eps), tfm._rms_norm(k, w["k_norm"], cfg.rms_eps)
  q, k = tfm._rope(q, *rope), tfm._rope(k, *rope)
  cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, start, 0, 0))
  cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, start, 0, 0))
  KV, Dh = cfg.n_kv_heads, cfg.head_dim
  q = q.reshape(B, T, KV, cfg.n_heads // KV, Dh)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, cache_k.astype(dtype), preferred_element_type=_F32)
  scores = jnp.where(mask[:, None, None], scores * cfg.attn_scale, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, cache_v.astype(dtype)).reshape(B, T, cfg.n_heads, Dh)
  return jnp.einsum("bthk,hkd->btd", out, w["o"].astype(dtype)), cache_k, cache_v


def _cached_layer(cfg, x, w, cache_k, cache_v, start, ctx, is_local):
  """`transformer._layer` with cached attention."""
  rope = tfm._select(is_local, ctx.get("local_rope"), ctx["rope"])
  mask = tfm._select(is_local, ctx.get("local_mask"), ctx["mask"])
  h, cache_k, cache_v = _cached_attention(cfg, tfm._rms_norm(x, w["attn_norm"], cfg.rms_eps), w["attn"],
                                          cache_k, cache_v, start, rope, mask)
  if cfg.post_norms:
    h = tfm._rms_norm(h, w["post_attn_norm"], cfg.rms_eps)
  x = x + h
  h = tfm._mlp(cfg, tfm._rms_norm(x, w["mlp_norm"], cfg.rms_eps), w["mlp"])
  if cfg.post_norms:
    h = tfm._rms_norm(h, w["post_mlp_norm"], cfg.rms_eps)
  return x + h, cache_k, cache_v


def forward_cached(cfg: ModelConfig, params: dict, tokens, positions, start, key_valid, cache):
  """Runs tokens [B, T] (at cache slots start..start+T-1, RoPE positions [B, T]) through the model,
  filling the cache. key_valid [B, S]: slots holding a real token (False on left padding and on
  slots not yet written). Returns (last hidden [B, D] after the final norm, cache)."""
  dtype = jnp.dtype(cfg.dtype)
  B, T = tokens.shape
  S = key_valid.shape[1]
  x = jnp.take(params["embed"], tokens, axis=0).astype(dtype)
  if cfg.embed_scale:
    x = x * jnp.asarray(cfg.embed_multiplier, dtype)
  q_idx = start + jnp.arange(T)[:, None]
  k_idx = jnp.arange(S)[None, :]
  mask = key_valid[:, None, :] & (k_idx <= q_idx)[None]  # [B, T, S]
  ctx = {"rope": tfm._rope_tables(positions, cfg.head_dim, cfg.rope_theta), "mask": mask}
  flags = cfg.layer_is_local
  if True in flags:
    ctx["local_rope"] = tfm._rope_tables(positions, cfg.head_dim, cfg.local_theta)
    ctx["local_mask"] = mask & ((q_idx - k_idx) < cfg.sliding_window)[None]

  def body(carry, xs):
    x, ck, cv = carry
    w, l, is_local = xs
    k_l, v_l = jax.lax.dynamic_index_in_dim(ck, l, keepdims=False), jax.lax.dynamic_index_in_dim(cv, l, keepdims=False)
    static = flags[0] if len(set(flags)) == 1 else is_local
    x, k_l, v_l = _cached_layer(cfg, x, w, k_l, v_l, start, ctx, static)
    # Write back only this layer's slice: the loop carries one cache buffer, updated in place.
    ck = jax.lax.dynamic_update_index_in_dim(ck, k_l, l, 0)
    cv = jax.lax.dynamic_update_index_in_dim(cv, v_l, l, 0)
    return (x, ck, cv), None

  (x, ck, cv), _ = jax.lax.scan(
      body, (x, cache["k"], cache["v"]),
      (params["layers"], jnp.arange(cfg.n_layers), jnp.asarray(flags)))
  h = tfm._rms_norm(x[:, -1], params["final_norm"], cfg.rms_eps)
  return h, {"k": ck, "v": cv}


def _decode_weights(cfg: ModelConfig, params: dict) -> list:
  """Per-layer decode weights, split off the stacked params once, before the loop (a slice inside the
  loop would copy them every step). q, k and v become one [D, (H + 2 KV) * Dh] matrix and gate and up
  one [D, 2F]: at a few rows per step each matmul is short, so fewer, wider ones cost less."""
  D = cfg.d_model
  out = []
  for i in range(cfg.n_layers):
    w = jax.tree.map(lambda a: a[i], params["layers"])
    attn, mlp = w.pop("attn"), w.pop("mlp")
    w["qkv"] = jnp.concatenate([attn[n].reshape(D, -1) for n in ("q", "k", "v")], axis=-1)
    if cfg.qkv_bias:
      w["qkv_bias"] = jnp.concatenate([attn[n].reshape(-1) for n in ("q_bias", "k_bias", "v_bias")])
    if cfg.qk_norm:
      w["q_norm"], w["k_norm"] = attn["q_norm"], attn["k_norm"]
    w["o"] = attn["o"].reshape(-1, D)
    w["gate_up"] = jnp.concatenate([mlp["gate"], mlp["up"]], axis=-1)
    w["down"] = mlp["down"]
    out.append(w)
  return out


def _decode_layer(cfg: ModelConfig, x, w, k_cache, v_cache, slot, rope, mask):
  """`transformer._layer` for one token per row, x [B, D], at cache `slot`. The caches are laid out
  for the attention matmuls to read them as they lie, with no per-step transpose of the whole cache:
  k_cache [B, KV, Dh, S], v_cache [B, KV, S, Dh]. mask [B, S]."""
  dtype = x.dtype
  B = x.shape[0]
  H, KV, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  qkv = tfm._rms_norm(x, w["attn_norm"], cfg.rms_eps) @ w["qkv"].astype(dtype)
  if cfg.qkv_bias:
    qkv = qkv + w["qkv_bias"].astype(dtype)
  q, k, v = jnp.split(qkv, [H * Dh, (H + KV) * Dh], axis=-1)
  q, k = q.reshape(B, 1, H, Dh), k.reshape(B, 1, KV, Dh)
  if cfg.qk_norm:
    q, k = tfm._rms_norm(q, w["q_norm"], cfg.rms_eps), tfm._rms_norm(k, w["k_norm"], cfg.rms_eps)
  q, k = tfm._rope(q, *rope), tfm._rope(k, *rope)
  k_cache = jax.lax.dynamic_update_slice(k_cache, k.reshape(B, KV, Dh, 1).astype(k_cache.dtype),
                                         (0, 0, 0, slot))
  v_cache = jax.lax.dynamic_update_slice(v_cache, v.reshape(B, KV, 1, Dh).astype(v_cache.dtype),
                                         (0, 0, slot, 0))
  q = q.reshape(B, KV, H // KV, Dh)
  scores = jnp.einsum("bkgd,bkds->bkgs", q, k_cache.astype(dtype), preferred_element_type=_F32)
  scores = jnp.where(mask[:, None, None], scores * cfg.attn_scale, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
  h = jnp.einsum("bkgs,bksd->bkgd", probs, v_cache.astype(dtype)).reshape(B, H * Dh) @ w["o"].astype(dtype)
  if cfg.post_norms:
    h = tfm._rms_norm(h, w["post_attn_norm"], cfg.rms_eps)
  x = x + h
  gate, up = jnp.split(tfm._rms_norm(x, w["mlp_norm"], cfg.rms_eps) @ w["gate_up"].astype(dtype), 2, axis=-1)
  act = jax.nn.silu if cfg.activation == "silu" else functools.partial(jax.nn.gelu, approximate=True)
  h = (act(gate) * up) @ w["down"].astype(dtype)
  if cfg.post_norms:
    h = tfm._rms_norm(h, w["post_mlp_norm"], cfg.rms_eps)
  return x + h, k_cache, v_cache


def decode_step(cfg: ModelConfig, params: dict, layers: list, token, position, slot, key_valid, caches):
  """One token per row through the model. token, position [B]; slot: the cache slot it goes to;
  layers: `_decode_weights`; caches: per-layer (k [B, KV, Dh, S], v [B, KV, S, Dh]). Unrolled over
  layers: a decode step is memory-bound, and slicing stacked weights inside the loop would copy them."""
  dtype = jnp.dtype(cfg.dtype)
  x = jnp.take(params["embed"], token, axis=0).astype(dtype)
  if cfg.embed_scale:
    x = x * jnp.asarray(cfg.embed_multiplier, dtype)
  idx = jnp.arange(key_valid.shape[1])
  mask = key_valid & (idx <= slot)[None]
  ctx = {False: (tfm._rope_tables(position[:, None], cfg.head_dim, cfg.rope_theta), mask)}
  if True in cfg.layer_is_local:
    ctx[True] = (tfm._rope_tables(position[:, None], cfg.head_dim, cfg.local_theta),
                 mask & ((slot - idx) < cfg.sliding_window)[None])
  new = []
  for w, (k, v), is_local in zip(layers, caches, cfg.layer_is_local):
    x, k, v = _decode_layer(cfg, x, w, k, v, slot, *ctx[is_local])
    new.append((k, v))
  return tfm._rms_norm(x, params["final_norm"], cfg.rms_eps), new


def _unembed_rows(cfg: ModelConfig, params) -> jax.Array:
  """[V, D], a row per token: at a few rows per step, XLA:CPU's matmul reads the unembedding ~1.6x
  faster contracting its minor dim than its major one. An untied [D, V] is transposed once, here."""
  return params["embed"] if cfg.tie_embeddings else params["unembed"].T


# ----------------------------------------------------------------------------------------------
# The sampler


def _cache_sharding(mesh, batch: int, kv_heads: int):
  """[L, B, S, KV, Dh]: batch over ('data', 'fsdp'), KV heads over 'tensor', each only if it divides."""
  if mesh is None:
    return None
  size = lambda names: int(np.prod([mesh.shape[n] for n in names]))
  batch_axes = ("data", "fsdp") if batch % size(("data", "fsdp")) == 0 else None
  head_axis = "tensor" if kv_heads % size(("tensor",)) == 0 else None
  return NamedSharding(mesh, P(None, batch_axes, None, head_axis, None))


def _generate(cfg: ModelConfig, s: SamplingConfig, mesh, params, tokens, lengths, rng) -> Samples:
  B, Pw = tokens.shape
  N = s.max_new_tokens
  S = Pw + N
  dtype = jnp.dtype(cfg.dtype)
  pad = Pw - lengths  # left padding per row
  positions = jnp.arange(Pw)[None, :] - pad[:, None]
  key_valid = jnp.concatenate([positions >= 0, jnp.zeros((B, N), bool)], axis=1)
  shape = (cfg.n_layers, B, S, cfg.n_kv_heads, cfg.head_dim)
  cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  cache_sharding = _cache_sharding(mesh, B, cfg.n_kv_heads)
  if cache_sharding is not None:
    cache = jax.lax.with_sharding_constraint(cache, {"k": cache_sharding, "v": cache_sharding})
  unembed = _unembed_rows(cfg, params)

  def pick(h, rng):
    logits = jnp.einsum("bd,vd->bv", h.astype(_F32), unembed.astype(_F32))
    logprobs = process_logits(logits, s)
    token = _choose(logprobs, s, rng)
    return token, jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]

  h, cache = forward_cached(cfg, params, tokens, jnp.maximum(positions, 0), 0, key_valid, cache)
  rng, step_rng = jax.random.split(rng)
  token, logprob = pick(h, step_rng)
  eos = jnp.asarray(s.eos_ids or (-1,), jnp.int32)
  out = Samples(tokens=jnp.full((B, N), s.pad_id, jnp.int32).at[:, 0].set(token),
                logprobs=jnp.zeros((B, N), _F32).at[:, 0].set(logprob),
                mask=jnp.zeros((B, N), jnp.int32).at[:, 0].set(1), lengths=jnp.ones((B,), jnp.int32))
  done = jnp.isin(token, eos)

  # Decode unrolled over layers, on per-layer weights and caches split once here.
  layers = _decode_weights(cfg, params)
  caches = [(cache["k"][i].transpose(0, 2, 3, 1), cache["v"][i].transpose(0, 2, 1, 3))
            for i in range(cfg.n_layers)]

  def cond(state):
    t, _, _, _, done, _, _ = state
    return (t < N) & ~jnp.all(done)

  def step(state):
    t, token, caches, key_valid, done, out, rng = state
    slot = Pw + t - 1  # the cache slot of `token`, the last emitted one
    key_valid = jax.lax.dynamic_update_index_in_dim(key_valid, jnp.ones((B,), bool), slot, 1)
    h, caches = decode_step(cfg, params, layers, token, lengths + t - 1, slot, key_valid, caches)
    rng, step_rng = jax.random.split(rng)
    new, logprob = pick(h, step_rng)
    live = ~done
    new = jnp.where(live, new, s.pad_id)
    out = Samples(tokens=out.tokens.at[:, t].set(new),
                  logprobs=out.logprobs.at[:, t].set(jnp.where(live, logprob, 0.0)),
                  mask=out.mask.at[:, t].set(live.astype(jnp.int32)),
                  lengths=out.lengths + live.astype(jnp.int32))
    done = done | jnp.isin(new, eos)
    return t + 1, new, caches, key_valid, done, out, rng

  state = (jnp.int32(1), token, caches, key_valid, done, out, rng)
  return jax.lax.while_loop(cond, step, state)[5]


@functools.lru_cache(maxsize=32)
def make_sampler(cfg: ModelConfig, sampling: SamplingConfig, mesh=None):
  """-> jitted fn(params, tokens [B, P] left-padded, lengths [B], rng) -> Samples.

  With a mesh, the KV cache's batch axis shards over ('data', 'fsdp') and its KV heads over 'tensor'
  (where they divide); params and inputs keep whatever sharding they carry, and GSPMD propagates.
  """
  fn = functools.partial(_generate, cfg, sampling, mesh)
  return jax.jit(fn)


def sample(model, tokens, lengths, sampling: SamplingConfig, rng=None, *, mesh=None) -> Samples:
  """Samples continuations of left-padded prompts with `model` (a Transformer) — see module doc."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  rng = jax.random.key(0) if rng is None else rng
  return make_sampler(model.cfg, sampling, mesh)(params, jnp.asarray(tokens, jnp.int32),
                                                 jnp.asarray(lengths, jnp.int32), rng)


def stop_and_pad_ids(tokenizer) -> tuple[tuple[int, ...], int]:
  """(eos_ids, pad_id) for a SamplingConfig from a tokenizer: its EOS (if any) stops a row, and rows
  are padded with its pad id, else its EOS, else 0."""
  eos, pad = getattr(tokenizer, "eos_id", None), getattr(tokenizer, "pad_id", None)
  return (() if eos is None else (eos,)), (pad if pad is not None else (eos if eos is not None else 0))


def encode_chat(tokenizer, prompts: Sequence[str], *, system: str | None = None, raw: bool = False) -> list[list[int]]:
  """Prompt strings -> token id lists: one user turn (after an optional system turn) in the tokenizer's
  chat template with the generation prompt, or the raw text when `raw` or the tokenizer has no template."""
  template = getattr(tokenizer, "chat_template", None)
  out = []
  for prompt in prompts:
    if raw or template is None:
      out.append(tokenizer.encode(prompt).ids)
    else:
      messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
      text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
      out.append(tokenizer.encode(text, add_special_tokens=False).ids)
  return out


def generate_text(model, tokenizer, prompts: Sequence[str], sampling: SamplingConfig, *, seed: int = 0,
                  system: str | None = None, raw: bool = False) -> tuple[list[str], Samples]:
  """Completions of `prompts` as strings (special tokens dropped), and the Samples they decode."""
  tokens, lengths = pad_prompts(encode_chat(tokenizer, prompts, system=system, raw=raw), pad_id=sampling.pad_id)
  out = sample(model, tokens, lengths, sampling, jax.random.key(seed))
  toks, mask = np.asarray(out.tokens), np.asarray(out.mask)
  return [tokenizer.decode(t[m == 1]) for t, m in zip(toks, mask)], out
