"""Concurrent requests decoded side by side (continuous batching), and tokens scored by teacher forcing.

    engine = Engine(policy, limits=Limits(context=2048, max_tokens=512, max_batch=16, queue=64))
    future = engine.submit(prompt_ids, n=2, max_tokens=64, settings=RowSettings(greedy=True))
    future.result()      # [Completion(tokens, finish_reason)] * n
    engine.score(ids, start, top=5)   # per token from `start`: its log-probability and the top alternatives

One worker thread owns the model and a batch of rows (a request with `n` choices is n rows), each row
at its own position in its own part of the KV cache (`sampler.Slots`). It decodes every row
`DECODE_CHUNK` steps at a time; between chunks, rows that finished answer their requests and waiting
requests take their places (their prompts prefilled one at a time), so a short answer never waits for a
long one and a new request never waits for a whole batch. When idle, the worker waits a few
milliseconds after the first request for others. The batch and the cache are padded to bucketed shapes
(rows a power of two up to `max_batch`, cache slots a power-of-two multiple of 64), and every row
carries its own temperature, top-p, seed and token limit (`sampler.RowSampling`), so one compiled
decoder per bucket serves every mix of requests and `warmup` compiles them all. A row's tokens depend on
its own prompt, settings and seed only: a greedy request answers the same alone or beside others (up to
float rounding of the batch's shape), and a seeded one draws what the batch sampler draws.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import itertools
import threading
import time
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alignment.models import sampler

MIN_WIDTH = 64      # cache slots: a power-of-two multiple of this
DECODE_CHUNK = 2    # decode steps between admissions: a finished row waits at most this long for a successor
PREFILL_ROWS = 4    # prompts prefilled in one call (most of batching's gain on a CPU; fewer shapes to compile)


@dataclasses.dataclass(frozen=True)
class Limits:
  context: int = 2048       # prompt + completion tokens
  max_tokens: int = 512     # completion tokens a request may ask for
  max_batch: int = 16       # rows decoded side by side
  queue: int = 64           # requests waiting; one more is refused (QueueFull)
  batch_window_s: float = 0.02  # when idle: after the first request, how long to wait for others


@dataclasses.dataclass(frozen=True)
class RowSettings:
  greedy: bool = True
  temperature: float = 1.0
  top_p: float = 1.0
  seed: int | None = None   # None: drawn by the engine


class Completion(NamedTuple):
  tokens: list              # generated ids, the stop token left out
  finish_reason: str        # 'stop' (an end-of-turn token) or 'length'
  stop_token: int | None = None  # the end-of-turn token that ended it


class QueueFull(Exception):
  pass


@dataclasses.dataclass
class _Job:
  prompt_ids: list
  n: int
  max_tokens: int
  settings: RowSettings
  future: concurrent.futures.Future
  completions: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Row:
  job: _Job
  choice: int
  tokens: list = dataclasses.field(default_factory=list)

  @property
  def slots_needed(self) -> int:
    return len(self.job.prompt_ids) + self.job.max_tokens


def bucket(n: int, floor: int = 1) -> int:
  """The smallest power of two times `floor` that holds n."""
  size = floor
  while size < n:
    size *= 2
  return size


def prompt_width(n: int) -> int:
  """The prefill width bucket of n tokens: a multiple of 16 up to 64 (short prompts are most requests,
  and at one prompt a call the cost grows with the width), then a power-of-two multiple of 64."""
  return -(-n // 16) * 16 if n <= MIN_WIDTH else bucket(n, MIN_WIDTH)


def prompt_widths(up_to: int) -> list[int]:
  """Every prefill width bucket up to `up_to` tokens."""
  return sorted({prompt_width(n) for n in range(1, up_to + 1)})


_STATE = {"token": np.int32, "pos": np.int32, "t": np.int32, "limit": np.int32, "done": bool,
          "greedy": bool, "temperature": np.float32, "top_p": np.float32, "seed": np.uint32}


class Engine:

  def __init__(self, policy, limits: Limits = Limits()):
    self.policy = policy
    self.limits = limits
    self.eos_ids, self.pad_id = sampler.stop_and_pad_ids(policy.tokenizer)
    cfg = policy.cfg
    self._decode_params = sampler.make_decode_params(cfg)(policy.params)
    self._prefill = sampler.make_slot_prefill(cfg)
    self._decode = sampler.make_slot_decoder(cfg, self.eos_ids, self.pad_id, DECODE_CHUNK)
    self._rows: list[_Row | None] = []   # the batch's rows; None where empty
    self._caches = None                  # per layer {'k' [B, KV, Dh, S], 'v' [B, KV, S, Dh]}
    self._state = {}                     # per row, numpy arrays of _STATE
    self._pending: list[_Job] = []
    self._cv = threading.Condition()
    self._seeds = itertools.count(int(time.time() * 1000) & 0x7FFFFFFF)
    self.stats = {"requests": 0, "rows": 0, "chunks": 0, "most_rows": 0}  # what the worker has run
    self._worker = threading.Thread(target=self._loop, name="alignment-serve-engine", daemon=True)
    self._worker.start()

  # -- requests -----------------------------------------------------------------------------------

  def submit(self, prompt_ids: Sequence[int], *, n: int = 1, max_tokens: int, settings: RowSettings
             ) -> concurrent.futures.Future:
    """A future of n Completions. Raises QueueFull when `limits.queue` requests already wait, and
    ValueError for a request the limits do not allow."""
    if not 1 <= n <= self.limits.max_batch:
      raise ValueError(f"n={n}: expected 1 to {self.limits.max_batch}")
    if not 1 <= max_tokens <= self.limits.max_tokens:
      raise ValueError(f"max_tokens={max_tokens}: expected 1 to {self.limits.max_tokens}")
    if not prompt_ids or len(prompt_ids) + max_tokens > self.limits.context:
      raise ValueError(f"the prompt's {len(prompt_ids)} tokens and max_tokens={max_tokens} exceed the context of "
                       f"{self.limits.context} tokens")
    job = _Job(list(prompt_ids), n, max_tokens, settings, concurrent.futures.Future())
    with self._cv:
      if len(self._pending) >= self.limits.queue:
        raise QueueFull(f"{len(self._pending)} requests are waiting (the queue's limit); retry later")
      self._pending.append(job)
      self._cv.notify()
    return job.future

  # -- the worker ---------------------------------------------------------------------------------

  def _loop(self):
    while True:
      idle = not any(self._rows)
      jobs = self._take(wait=idle)
      try:
        self._admit(jobs)
        if any(self._rows):
          self._decode_chunk()
      except Exception as e:  # the rows in flight fail, the server stays up
        for job in {id(r.job): r.job for r in self._rows if r}.values():
          if not job.future.done():
            job.future.set_exception(e)
        self._rows, self._caches, self._state = [], None, {}

  def _take(self, wait: bool) -> list[_Job]:
    """Requests in arrival order while their rows fit beside the batch's; when `wait`, first waits for
    one and then the batch window."""
    if wait:
      with self._cv:
        while not self._pending:
          self._cv.wait()
      time.sleep(self.limits.batch_window_s)
    free = self.limits.max_batch - sum(r is not None for r in self._rows)
    taken = []
    with self._cv:
      for job in list(self._pending):
        if job.n > free:
          break
        self._pending.remove(job)
        if job.future.set_running_or_notify_cancel():
          taken.append(job)
          free -= job.n
    return taken

  def _admit(self, jobs: list[_Job]):
    """Gives each new request's rows a place (resizing the batch and the cache to their buckets, which
    also happens as rows leave) and prefills its prompt there."""
    new = [_Row(job, c) for job in jobs for c in range(job.n)]
    rows = [r for r in self._rows if r] + new
    size = bucket(len(rows)) if rows else 0
    slots = bucket(max(r.slots_needed for r in rows), MIN_WIDTH) if rows else 0
    if self._caches is None or size != len(self._rows) or slots != self._caches[0]["k"].shape[-1]:
      self._relayout(size, slots)
    free = (i for i, r in enumerate(self._rows) if r is None)
    places = {id(job): [next(free) for _ in range(job.n)] for job in jobs}
    for row in new:
      i = places[id(row.job)][row.choice]
      self._rows[i] = row
      p, s = row.job.prompt_ids, row.job.settings
      for name, value in (("token", p[-1]), ("pos", len(p) - 1), ("t", 0), ("limit", row.job.max_tokens),
                          ("done", False), ("greedy", s.greedy), ("temperature", s.temperature),
                          ("top_p", s.top_p), ("seed", self._row_seed(s, row.choice))):
        self._state[name][i] = value
    self._prefill_prompts(jobs, places)
    self.stats.update(requests=self.stats["requests"] + len(jobs), rows=self.stats["rows"] + len(new))

  def _relayout(self, size: int, slots: int):
    """Moves the live rows to the front of a batch of `size` rows and `slots` cache slots (every live
    row's tokens fit: `slots` holds its prompt and completion)."""
    live = [i for i, r in enumerate(self._rows) if r]
    if not size:
      self._rows, self._caches, self._state = [], None, {}
      return
    order = np.array(live + [0] * (size - len(live)), np.int32)
    if self._caches is None or not live:
      self._caches = sampler.layer_caches(self.policy.cfg, size, slots)
    else:
      self._caches = _resize(self._caches, jnp.asarray(order), slots)
    self._state = {name: (self._state[name][order] if live else np.zeros(size, dtype)) for name, dtype in _STATE.items()}
    self._state["done"][len(live):] = True
    self._rows = [self._rows[i] for i in live] + [None] * (size - len(live))

  def _prefill_prompts(self, jobs: list[_Job], places: dict):
    """Writes each prompt but its last token (which the row's first decode step runs) into the cache of
    its rows: prompts of one width bucket together, up to PREFILL_ROWS a call."""
    by_width = {}
    for job in jobs:
      if len(job.prompt_ids) > 1:
        by_width.setdefault(prompt_width(len(job.prompt_ids) - 1), []).append(job)
    for width, group in by_width.items():
      for start in range(0, len(group), PREFILL_ROWS):
        part = group[start:start + PREFILL_ROWS]
        tokens = np.full((bucket(len(part)), width), self.pad_id, np.int32)
        for r, job in enumerate(part):
          tokens[r, :len(job.prompt_ids) - 1] = job.prompt_ids[:-1]
        piece = self._prefill(self._decode_params, jnp.asarray(tokens))
        for r, job in enumerate(part):
          for i in places[id(job)]:
            self._caches = _insert(self._caches, piece, i, r)

  def _decode_chunk(self):
    st = self._state
    slots = sampler.Slots(*(jnp.asarray(st[k]) for k in ("token", "pos", "t", "limit", "done")))
    rows = sampler.RowSampling(*(jnp.asarray(st[k]) for k in ("greedy", "temperature", "top_p", "seed")))
    tokens, _, mask, self._caches, slots = self._decode(self._decode_params, self._caches, slots, rows)
    tokens, mask, slots = jax.device_get((tokens, mask, slots))
    for k, v in zip(("token", "pos", "t", "limit", "done"), slots):
      st[k] = np.array(v)
    live = sum(r is not None for r in self._rows)
    self.stats.update(chunks=self.stats["chunks"] + 1, most_rows=max(self.stats["most_rows"], live))
    for i, row in enumerate(self._rows):
      if row is None:
        continue
      row.tokens += tokens[i][mask[i] == 1].tolist()
      if st["done"][i]:
        self._rows[i] = None
        self._finish(row)

  def _finish(self, row: _Row):
    ids = row.tokens
    stopped = bool(ids) and ids[-1] in self.eos_ids
    job = row.job
    job.completions.append((row.choice, Completion(ids[:-1], "stop", ids[-1]) if stopped else Completion(ids, "length")))
    if len(job.completions) == job.n:
      job.future.set_result([c for _, c in sorted(job.completions, key=lambda x: x[0])])

  def _row_seed(self, settings: RowSettings, choice: int) -> int:
    base = next(self._seeds) if settings.seed is None else settings.seed
    return (int(base) * 1000003 + choice) & 0xFFFFFFFF

  def warmup(self, widths: Sequence[int] | None = None) -> int:
    """Compiles the prefill for prompts up to each of `widths` tokens (default: up to the context) and
    the decoder for every row bucket at every cache size those prompts and `max_tokens` can need;
    returns how many shapes it compiled."""
    longest = min(max(widths or [self.limits.context]), self.limits.context - 1)
    count = 0
    for width in prompt_widths(longest):
      for rows in (r for r in (1, 2, 4, 8, 16) if r <= PREFILL_ROWS):
        self._prefill(self._decode_params, jnp.zeros((rows, width), jnp.int32))
        count += 1
    most = bucket(min(longest + self.limits.max_tokens, self.limits.context), MIN_WIDTH)
    cfg = self.policy.cfg
    for slots in (s for s in (MIN_WIDTH * 2 ** k for k in range(16)) if s <= most):
      size = 1
      while size <= bucket(self.limits.max_batch):
        z = lambda dtype: jnp.zeros((size,), dtype)
        self._decode(self._decode_params, sampler.layer_caches(cfg, size, slots),
                     sampler.Slots(z(jnp.int32), z(jnp.int32), z(jnp.int32), z(jnp.int32) + 1, z(bool)),
                     sampler.RowSampling(z(bool), z(jnp.float32) + 1, z(jnp.float32) + 1, z(jnp.uint32)))
        count += 1
        size *= 2
    return count

  # -- scoring ------------------------------------------------------------------------------------

  def score(self, ids: Sequence[int], start: int, top: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Teacher-forced: for t = start .. len(ids) - 1, log p(ids[t] | ids[:t]) (float32 [T]), and the `top`
    most likely tokens there with their log-probabilities (int32 [T, top], float32 [T, top]). The
    token's log-probability is the trainer's (`kernels.token_logprobs`)."""
    width = bucket(len(ids), MIN_WIDTH)
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :len(ids)] = ids
    logprobs, top_ids, top_lps = _score_fn(self.policy.cfg, max(top, 1))(self.policy.params, jnp.asarray(tokens))
    sl = slice(start - 1, len(ids) - 1)  # position t - 1 predicts token t
    return (np.asarray(logprobs[0, sl]), np.asarray(top_ids[0, sl])[:, :top], np.asarray(top_lps[0, sl])[:, :top])


@functools.lru_cache(maxsize=8)
def _score_fn(cfg, top: int):
  from flax import nnx
  from alignment.evals.harness import transformer_graphdef
  from alignment.kernels import token_logprobs
  graphdef = transformer_graphdef(cfg)

  def fn(params, tokens):
    model = nnx.merge(graphdef, params)
    hidden = model(tokens)
    unembed = model.unembed_matrix()
    flat = hidden.reshape(-1, hidden.shape[-1])
    stats = token_logprobs(flat, unembed, jnp.roll(tokens, -1, axis=1).reshape(-1))
    logits = jnp.einsum("nd,dv->nv", flat.astype(jnp.float32), unembed.astype(jnp.float32))
    top_lps, top_ids = jax.lax.top_k(jax.nn.log_softmax(logits, axis=-1), top)
    shape = tokens.shape
    return (stats.logprobs.reshape(shape), top_ids.reshape(*shape, top).astype(jnp.int32),
            top_lps.reshape(*shape, top))

  return jax.jit(fn)


@functools.partial(jax.jit, donate_argnums=0)
def _insert(caches, piece, row, src):
  """Writes row `src` of prompts' caches (`make_slot_prefill`'s, W slots) into batch row `row`, slots
  0..W-1."""
  take = lambda a: jax.lax.dynamic_slice_in_dim(a, src, 1, axis=0)
  return [{"k": jax.lax.dynamic_update_slice(c["k"], take(p["k"]), (row, 0, 0, 0)),
           "v": jax.lax.dynamic_update_slice(c["v"], take(p["v"]), (row, 0, 0, 0))} for c, p in zip(caches, piece)]


@functools.partial(jax.jit, static_argnums=2)
def _resize(caches, order, slots):
  """The caches' rows `order` (gathered), with `slots` cache slots (cut or zero-padded at the end)."""
  def fit(a, axis):
    a = jnp.take(a, order, axis=0)
    if a.shape[axis] >= slots:
      return jax.lax.slice_in_dim(a, 0, slots, axis=axis)
    return jnp.pad(a, [(0, slots - a.shape[axis]) if d == axis else (0, 0) for d in range(a.ndim)])
  return [{"k": fit(c["k"], 3), "v": fit(c["v"], 2)} for c in caches]
