"""KV-cache sampler: batched prompts of different lengths, prefill and decode in one jitted function.

    prompts, lengths = pad_prompts(list_of_id_lists, pad_id)
    out = sample(model, prompts, lengths, SamplingConfig(max_new_tokens=64, eos_ids=(2,)), rng)
    out.tokens [B, N] int32, out.logprobs [B, N] float32, out.mask [B, N] (1 up to and including EOS)

Prompts are left-padded, so every row's next token goes to the same cache slot and one decode step
serves the whole batch. The cache (`transformer.init_cache`) holds S = P + max_new_tokens slots. The
forward is the model's own: `transformer.layer`, the very function training runs, with a cache (its
attention writes the new keys and values and attends over the cache). The prefill scans the stacked
layers; the decode loop (a `lax.while_loop` that stops when every row hit EOS) is unrolled over layers,
on weights fused once before it (`transformer.fuse_weights`). Params are the plain nested dict of
`nnx.to_pure_dict(nnx.state(model, nnx.Param))` (what the trainer holds), so rollouts use live params."""

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
  """A token per row: the argmax, or a draw by inverse CDF (`_draw`)."""
  if s.greedy:
    return jnp.argmax(logprobs, axis=-1).astype(jnp.int32)
  return _draw(logprobs, jax.random.uniform(rng, (logprobs.shape[0], 1), jnp.float32))


def _draw(logprobs: jax.Array, u: jax.Array) -> jax.Array:
  """A draw per row by inverse CDF from uniforms u [B, 1]: u against the running sum of the probabilities
  (a Gumbel draw, `jax.random.categorical`, needs a random number per vocabulary entry: ~5x the time on a
  CPU at V = 49152, 32 rows). Token j is drawn when cdf[j-1] <= u < cdf[j], so a token of probability 0
  never is."""
  probs = jnp.exp(logprobs)
  cdf = jnp.cumsum(probs, axis=-1)
  drawn = jnp.sum(cdf <= u * cdf[:, -1:], axis=-1)
  last = probs.shape[-1] - 1 - jnp.argmax(probs[:, ::-1] > 0, axis=-1)  # (u rounding up to the total)
  return jnp.minimum(drawn, last).astype(jnp.int32)


class RowSampling(NamedTuple):
  """Sampling settings per prompt, as arrays, so prompts that want different ones share one compiled
  sampler (the server's batches): greedy [B] bool, temperature [B] float32 (> 0 where not greedy),
  top_p [B] float32 in (0, 1], seed [B] uint32. A row's draws depend on its seed and position only,
  never on the other rows of its batch."""
  greedy: jax.Array
  temperature: jax.Array
  top_p: jax.Array
  seed: jax.Array


def _top_p_rows(logits: jax.Array, top_p: jax.Array) -> jax.Array:
  """`process_logits`'s nucleus filter with a top_p per row (1.0 keeps every token)."""
  sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  keep = (jnp.cumsum(probs, axis=-1) - probs < top_p[:, None]) | (top_p[:, None] >= 1.0)
  threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < threshold, -jnp.inf, logits)


def _pick_rows(logits: jax.Array, rows: RowSampling, t) -> tuple[jax.Array, jax.Array]:
  """(token [B], its log-probability under the row's sampling distribution) at decode position t (a
  scalar, or [B]: the index of each row's token in its completion)."""
  plain = jax.nn.log_softmax(logits, axis=-1)
  greedy_token = jnp.argmax(plain, axis=-1).astype(jnp.int32)

  def mixed(_):
    scaled = logits / jnp.where(rows.greedy, 1.0, rows.temperature)[:, None]
    scaled = jax.lax.cond(jnp.any(rows.top_p < 1.0), _top_p_rows, lambda x, _: x, scaled, rows.top_p)
    sampled = jax.nn.log_softmax(scaled, axis=-1)
    keys = jax.vmap(lambda seed, t: jax.random.fold_in(jax.random.key(seed), t))(
        rows.seed, jnp.broadcast_to(t, rows.seed.shape))
    u = jax.vmap(lambda k: jax.random.uniform(k, (1,), jnp.float32))(keys)
    token = jnp.where(rows.greedy, greedy_token, _draw(sampled, u))
    logprobs = jnp.where(rows.greedy[:, None], plain, sampled)
    return token, jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]

  def all_greedy(_):  # the common serving case skips the draw's sort and cumulative sums
    return greedy_token, jnp.take_along_axis(plain, greedy_token[:, None], axis=-1)[:, 0]

  return jax.lax.cond(jnp.all(rows.greedy), all_greedy, mixed, None)


# ----------------------------------------------------------------------------------------------
# Cached forward


def forward_cached(cfg: ModelConfig, params: dict, layers, tokens, positions, slot, key_valid, caches):
  """Runs tokens [B, T] (at cache slots slot..slot+T-1, RoPE positions [B, T]) through the model's own
  layers, filling the caches. key_valid [B, S]: slots holding a real token (False on left padding and
  on slots not yet written). layers and caches: the stacked `params['layers']` and the stacked cache of
  `transformer.init_cache` (prefill, scanned), or per-layer lists (`_decode_weights` and the cache's
  slices; decode, unrolled). Returns (last hidden [B, D] after the final norm, caches)."""
  x = tfm.embed(cfg, params["embed"], tokens)
  ctx = tfm.cache_context(cfg, positions, slot, key_valid)
  x, caches = tfm.apply_layers(cfg, x, layers, ctx, cfg.layer_is_local, caches)
  return tfm.final_norm(cfg, x[:, -1], params["final_norm"]), caches


def _decode_weights(cfg: ModelConfig, params: dict) -> list:
  """Per-layer decode weights (`transformer.fuse_weights`: q, k, v as one matrix, gate and up as one),
  split off the stacked params once, before the loop (a slice inside the loop would copy them every
  step)."""
  return [tfm.fuse_weights(cfg, jax.tree.map(lambda a: a[i], params["layers"])) for i in range(cfg.n_layers)]


def _unembed_rows(cfg: ModelConfig, params) -> jax.Array:
  """[V, D], a row per token: at a few rows per step, XLA:CPU's matmul reads the unembedding ~1.6x
  faster contracting its minor dim than its major one. An untied [D, V] is transposed once, here."""
  return params["embed"] if cfg.tie_embeddings else params["unembed"].T


# ----------------------------------------------------------------------------------------------
# The sampler


def _cache_sharding(mesh, batch: int, kv_heads: int):
  """k [L, B, KV, Dh, S], v [L, B, KV, S, Dh]: batch over ('data', 'fsdp'), KV heads over 'tensor',
  each only if it divides."""
  if mesh is None:
    return None
  size = lambda names: int(np.prod([mesh.shape[n] for n in names]))
  batch_axes = ("data", "fsdp") if batch % size(("data", "fsdp")) == 0 else None
  head_axis = "tensor" if kv_heads % size(("tensor",)) == 0 else None
  return NamedSharding(mesh, P(None, batch_axes, head_axis, None, None))


def _on_every_device(mesh, flag):
  """`flag` (a bool GSPMD holds replicated) if it is true on every device of `mesh`, else False.

  GSPMD may keep the per-row decode state replicated over 'fsdp' and reduce the stop test over 'data'
  only, so each 'fsdp' replica decides the loop's exit from its own copy. Copies that differ in one
  sampled token (measured on 8 CPU devices: about one GRPO job in 16) leave the replicas in different
  iterations, each waiting in a collective the other never reaches. Agreeing on one flag keeps every
  device's trip count the same."""
  if mesh is None or mesh.size == 1:
    return flag
  agree = lambda f: jax.lax.pmin(f.astype(jnp.int32), mesh.axis_names).astype(bool)
  return jax.shard_map(agree, mesh=mesh, in_specs=P(), out_specs=P())(flag)


def _generate(cfg: ModelConfig, s: SamplingConfig, mesh, group_size, params, tokens, lengths, rng,
              limits=None, rows: RowSampling | None = None) -> Samples:
  B, Pw = tokens.shape
  N = s.max_new_tokens
  S = Pw + N
  pad = Pw - lengths  # left padding per row
  positions = jnp.arange(Pw)[None, :] - pad[:, None]
  key_valid = jnp.concatenate([positions >= 0, jnp.zeros((B, N), bool)], axis=1)
  cache = tfm.init_cache(cfg, B, S)
  cache_sharding = _cache_sharding(mesh, B, cfg.n_kv_heads)
  if cache_sharding is not None:
    cache = jax.lax.with_sharding_constraint(cache, {"k": cache_sharding, "v": cache_sharding})
  unembed = _unembed_rows(cfg, params)

  def pick(h, rng, t):
    logits = jnp.einsum("bd,vd->bv", h.astype(_F32), unembed.astype(_F32))
    if rows is not None:
      return _pick_rows(logits, rows, t)
    logprobs = process_logits(logits, s)
    token = _choose(logprobs, s, rng)
    return token, jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]

  h, cache = forward_cached(cfg, params, params["layers"], tokens, jnp.maximum(positions, 0), 0, key_valid,
                            cache)
  if group_size > 1:  # each prompt was prefilled once; its G samples continue from copies of its cache
    B = B * group_size
    h, key_valid, lengths = (jnp.repeat(a, group_size, axis=0) for a in (h, key_valid, lengths))
    limits = None if limits is None else jnp.repeat(limits, group_size, axis=0)
    rows = None if rows is None else jax.tree.map(lambda a: jnp.repeat(a, group_size, axis=0), rows)
    cache = jax.tree.map(lambda c: jnp.repeat(c, group_size, axis=1), cache)
    cache_sharding = _cache_sharding(mesh, B, cfg.n_kv_heads)
    if cache_sharding is not None:
      cache = jax.lax.with_sharding_constraint(cache, {"k": cache_sharding, "v": cache_sharding})
  rng, step_rng = jax.random.split(rng)
  token, logprob = pick(h, step_rng, 0)
  eos = jnp.asarray(s.eos_ids or (-1,), jnp.int32)
  out = Samples(tokens=jnp.full((B, N), s.pad_id, jnp.int32).at[:, 0].set(token),
                logprobs=jnp.zeros((B, N), _F32).at[:, 0].set(logprob),
                mask=jnp.zeros((B, N), jnp.int32).at[:, 0].set(1), lengths=jnp.ones((B,), jnp.int32))
  done = jnp.isin(token, eos)
  if limits is not None:  # a row also stops once it has its own number of tokens
    done = done | (limits <= 1)

  # Decode unrolled over layers, on per-layer weights and caches split once here.
  layers = _decode_weights(cfg, params)
  caches = [jax.tree.map(lambda c: c[i], cache) for i in range(cfg.n_layers)]

  def cond(state):
    t, _, _, _, done, _, _ = state
    return (t < N) & ~_on_every_device(mesh, jnp.all(done))

  def step(state):
    t, token, caches, key_valid, done, out, rng = state
    slot = Pw + t - 1  # the cache slot of `token`, the last emitted one
    key_valid = jax.lax.dynamic_update_index_in_dim(key_valid, jnp.ones((B,), bool), slot, 1)
    h, caches = forward_cached(cfg, params, layers, token[:, None], (lengths + t - 1)[:, None], slot, key_valid,
                               caches)
    rng, step_rng = jax.random.split(rng)
    new, logprob = pick(h, step_rng, t)
    live = ~done
    new = jnp.where(live, new, s.pad_id)
    out = Samples(tokens=out.tokens.at[:, t].set(new),
                  logprobs=out.logprobs.at[:, t].set(jnp.where(live, logprob, 0.0)),
                  mask=out.mask.at[:, t].set(live.astype(jnp.int32)),
                  lengths=out.lengths + live.astype(jnp.int32))
    done = done | jnp.isin(new, eos)
    if limits is not None:
      done = done | (t + 1 >= limits)
    return t + 1, new, caches, key_valid, done, out, rng

  state = (jnp.int32(1), token, caches, key_valid, done, out, rng)
  return jax.lax.while_loop(cond, step, state)[5]


@functools.lru_cache(maxsize=32)
def make_sampler(cfg: ModelConfig, sampling: SamplingConfig, mesh=None, group_size: int = 1, out_sharding=None):
  """-> jitted fn(params, tokens [B, P] left-padded, lengths [B], rng[, limits]) -> Samples of B * group_size rows.

  `limits` (int32 [B], optional): per prompt, the most tokens its rows generate (at most
  max_new_tokens), so requests that want different lengths share one compiled sampler; `rows`
  (`RowSampling`, optional) replaces `sampling`'s greedy / temperature / top_p / top_k and `rng` with
  settings per prompt, for the same reason.

  With `group_size` G > 1 each prompt is prefilled once and its cache copied to its G samples, rows
  b * G .. b * G + G - 1 (the layout `alignment.losses.grpo.group_advantages` reads). With a mesh, the
  KV cache's batch axis shards over ('data', 'fsdp') and its KV heads over 'tensor' (where they
  divide); params and inputs keep whatever sharding they carry, and GSPMD propagates; `out_sharding`
  lays out the Samples (e.g. replicated, for the host to read them on every process).
  """
  fn = functools.partial(_generate, cfg, sampling, mesh, group_size)
  return jax.jit(fn, out_shardings=out_sharding)


# ----------------------------------------------------------------------------------------------
# Slots: rows that join and leave between decode chunks (the server's continuous batching)


class Slots(NamedTuple):
  """Rows decoding side by side, each at its own position. A row's cache holds its tokens at slots
  equal to their positions (no padding in front), so a row can be refilled without touching the
  others. token [B] int32: the row's last token, not yet in the cache (at first, the prompt's last
  token); pos [B] int32: that token's position (and cache slot); t [B] int32: tokens drawn so far;
  limit [B] int32: the most the row draws; done [B] bool (also true on empty rows)."""
  token: jax.Array
  pos: jax.Array
  t: jax.Array
  limit: jax.Array
  done: jax.Array


def layer_caches(cfg: ModelConfig, batch: int, length: int) -> list:
  """An empty KV cache as a list of per-layer {'k', 'v'} (`transformer.init_cache`'s layout without the
  L axis), what the unrolled layers of `make_slot_prefill` and `make_slot_decoder` take."""
  cache = tfm.init_cache(cfg, batch, length)
  return [jax.tree.map(lambda c: c[i], cache) for i in range(cfg.n_layers)]


@functools.lru_cache(maxsize=8)
def make_decode_params(cfg: ModelConfig):
  """-> jitted fn(params) -> what `make_slot_decoder` runs on: the embedding, final norm and
  unembedding, and per-layer fused weights (made once, not once a chunk)."""
  return jax.jit(lambda params: {"embed": params["embed"], "final_norm": params["final_norm"],
                                 "unembed": _unembed_rows(cfg, params), "layers": _decode_weights(cfg, params)})


@functools.lru_cache(maxsize=8)
def make_slot_prefill(cfg: ModelConfig):
  """-> jitted fn(decode_params, tokens [R, W]) -> the prompts' caches, a list per layer of {'k' [R, KV,
  Dh, W], 'v' [R, KV, W, Dh]}, each prompt's tokens at slots 0..W-1. Right padding after a prompt leaves
  garbage at the slots past it, which its row's decode overwrites before any query can see it. Runs the
  layers unrolled on the fused weights, as decoding does: at a few prompts a call, slicing stacked
  weights (a scan) would copy them."""

  def prefill(dp, tokens):
    rows, width = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32)[None, :], (rows, width))
    return forward_cached(cfg, dp, dp["layers"], tokens, positions, 0, jnp.ones((rows, width), bool),
                          layer_caches(cfg, rows, width))[1]

  return jax.jit(prefill)


@functools.lru_cache(maxsize=8)
def make_slot_decoder(cfg: ModelConfig, eos_ids: tuple, pad_id: int, steps: int):
  """-> jitted fn(decode_params, caches, slots, rows) -> (tokens [B, steps], logprobs [B, steps], mask
  [B, steps], caches, slots): up to `steps` decode steps of every row that is not done (fewer when all
  finish). caches: a list, per layer, of {'k' [B, KV, Dh, S], 'v' [B, KV, S, Dh]}, donated (updated in
  place). rows: `RowSampling`; a row's draw at its t-th token depends on its seed and t only, as in
  `make_sampler`."""
  eos = jnp.asarray(eos_ids or (-1,), jnp.int32)

  def decode(dp, caches, slots, rows):
    B, S = slots.token.shape[0], caches[0]["k"].shape[-1]
    everywhere = jnp.ones((B, S), bool)  # a row's slots past its own position are masked as the future

    def step(state):
      i, slots, caches, out = state
      h, caches = forward_cached(cfg, dp, dp["layers"], slots.token[:, None], slots.pos[:, None], slots.pos,
                                 everywhere, caches)
      logits = jnp.einsum("bd,vd->bv", h.astype(_F32), dp["unembed"].astype(_F32))
      new, logprob = _pick_rows(logits, rows, slots.t)
      live = ~slots.done
      new = jnp.where(live, new, pad_id)
      out = (out[0].at[:, i].set(new), out[1].at[:, i].set(jnp.where(live, logprob, 0.0)),
             out[2].at[:, i].set(live.astype(jnp.int32)))
      t = slots.t + live
      done = slots.done | jnp.isin(new, eos) | (t >= slots.limit)
      slots = Slots(jnp.where(live, new, slots.token), slots.pos + live, t, slots.limit, done)
      return i + 1, slots, caches, out

    out = (jnp.full((B, steps), pad_id, jnp.int32), jnp.zeros((B, steps), _F32), jnp.zeros((B, steps), jnp.int32))
    _, slots, caches, out = jax.lax.while_loop(lambda st: (st[0] < steps) & ~jnp.all(st[1].done), step,
                                               (jnp.int32(0), slots, caches, out))
    return (*out, caches, slots)

  return jax.jit(decode, donate_argnums=1)


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


def encode_chat(tokenizer, prompts: Sequence, *, system: str | None = None, raw: bool = False) -> list[list[int]]:
  """Prompts -> token id lists ending where the assistant's next turn begins. A prompt is a string (one
  user turn) or a conversation (a list of {role, content} messages ending before the assistant's turn);
  an optional system turn goes first. In the tokenizer's chat template with the generation prompt; a
  string prompt is the raw text when `raw` or the tokenizer has no template."""
  template = getattr(tokenizer, "chat_template", None)
  out = []
  for prompt in prompts:
    if isinstance(prompt, str) and (raw or template is None):
      out.append(tokenizer.encode(prompt).ids)
      continue
    if template is None:
      raise ValueError("a conversation prompt needs a chat template; this tokenizer has none")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    messages = ([{"role": "system", "content": system}] if system else []) + messages
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
