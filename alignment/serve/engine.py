"""Concurrent requests gathered into sampler batches, and tokens scored by teacher forcing.

    engine = Engine(policy, limits=Limits(context=2048, max_tokens=512, max_batch=16, queue=64))
    future = engine.submit(prompt_ids, n=2, max_tokens=64, sampling=RowSettings(greedy=True))
    future.result()      # [Completion(tokens, finish_reason)] * n
    engine.score(ids, start, top=5)   # per token from `start`: its log-probability and the top alternatives

One worker thread owns the model. It waits a few milliseconds after the first waiting request for
others, then runs up to `max_batch` rows (a request with `n` choices is n rows) through one sampler call.
Batches are padded to a bucketed shape (rows a power of two, prompt width a power-of-two multiple of 64
tokens) and every row carries its own temperature, top-p, seed and token limit (`sampler.RowSampling`),
so one compiled sampler per bucket serves every mix of requests and `warmup` compiles them all. A row's
tokens depend on its own prompt, settings and seed only: a greedy request answers the same alone or in
a batch (up to float rounding of the batch's shape).
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

MIN_WIDTH = 64


@dataclasses.dataclass(frozen=True)
class Limits:
  context: int = 2048       # prompt + completion tokens
  max_tokens: int = 512     # completion tokens a request may ask for
  max_batch: int = 16       # rows per sampler call
  queue: int = 64           # requests waiting; one more is refused (QueueFull)
  batch_window_s: float = 0.02  # after the first waiting request, how long to wait for others


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


def bucket(n: int, floor: int = 1) -> int:
  """The smallest power of two times `floor` that holds n."""
  size = floor
  while size < n:
    size *= 2
  return size


class Engine:

  def __init__(self, policy, limits: Limits = Limits()):
    self.policy = policy
    self.limits = limits
    self.eos_ids, self.pad_id = sampler.stop_and_pad_ids(policy.tokenizer)
    self._sampling = sampler.SamplingConfig(max_new_tokens=limits.max_tokens, eos_ids=self.eos_ids,
                                            pad_id=self.pad_id)
    self._fn = sampler.make_sampler(policy.cfg, self._sampling)
    self._pending: list[_Job] = []
    self._cv = threading.Condition()
    self._seeds = itertools.count(int(time.time() * 1000) & 0x7FFFFFFF)
    self.stats = {"batches": 0, "requests": 0, "rows": 0, "most_rows": 0}  # what the worker has run
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

  def _take(self) -> list[_Job]:
    """Waits for a request, then a batch window, and takes requests in arrival order while their rows fit."""
    with self._cv:
      while not self._pending:
        self._cv.wait()
    time.sleep(self.limits.batch_window_s)
    with self._cv:
      taken, rows = [], 0
      for job in list(self._pending):
        if rows + job.n > self.limits.max_batch:
          break
        taken.append(job)
        rows += job.n
        self._pending.remove(job)
      return taken

  def _loop(self):
    while True:
      jobs = [j for j in self._take() if j.future.set_running_or_notify_cancel()]
      if not jobs:
        continue
      try:
        results = self.generate([j.prompt_ids for j in jobs], [j.n for j in jobs], [j.max_tokens for j in jobs],
                                [j.settings for j in jobs])
      except Exception as e:  # the batch fails, the server stays up
        for j in jobs:
          j.future.set_exception(e)
        continue
      rows = sum(j.n for j in jobs)
      self.stats.update(batches=self.stats["batches"] + 1, requests=self.stats["requests"] + len(jobs),
                        rows=self.stats["rows"] + rows, most_rows=max(self.stats["most_rows"], rows))
      for j, completions in zip(jobs, results):
        j.future.set_result(completions)

  def _row_seed(self, settings: RowSettings, choice: int) -> int:
    base = next(self._seeds) if settings.seed is None else settings.seed
    return (int(base) * 1000003 + choice) & 0xFFFFFFFF

  def generate(self, prompts: Sequence[list], ns: Sequence[int], max_tokens: Sequence[int],
               settings: Sequence[RowSettings]) -> list[list[Completion]]:
    """One sampler call for these requests (what the worker runs; callable directly)."""
    rows = [(i, c) for i, n in enumerate(ns) for c in range(n)]
    size = bucket(len(rows))
    width = bucket(max(len(p) for p in prompts), MIN_WIDTH)
    tokens = np.full((size, width), self.pad_id, np.int32)
    lengths = np.ones((size,), np.int32)  # filler rows: one pad token, one generated token
    limits = np.ones((size,), np.int32)
    greedy = np.ones((size,), bool)
    temperature = np.ones((size,), np.float32)
    top_p = np.ones((size,), np.float32)
    seeds = np.zeros((size,), np.uint32)
    for r, (i, c) in enumerate(rows):
      p, s = prompts[i], settings[i]
      tokens[r, width - len(p):] = p
      lengths[r], limits[r] = len(p), max_tokens[i]
      greedy[r], temperature[r], top_p[r] = s.greedy, s.temperature, s.top_p
      seeds[r] = self._row_seed(s, c)
    row_sampling = sampler.RowSampling(jnp.asarray(greedy), jnp.asarray(temperature), jnp.asarray(top_p),
                                       jnp.asarray(seeds))
    out = jax.device_get(self._fn(self.policy.params, jnp.asarray(tokens), jnp.asarray(lengths),
                                  jax.random.key(0), jnp.asarray(limits), row_sampling))
    results = [[] for _ in prompts]
    for r, (i, _) in enumerate(rows):
      ids = out.tokens[r][out.mask[r] == 1].tolist()
      stopped = bool(ids) and ids[-1] in self.eos_ids
      results[i].append(Completion(ids[:-1], "stop", ids[-1]) if stopped else Completion(ids, "length"))
    return results

  def warmup(self, widths: Sequence[int] | None = None) -> int:
    """Compiles the sampler for every row bucket at each prompt width (default: every width bucket up to
    the context); returns how many shapes it compiled."""
    widths = widths or [w for w in (MIN_WIDTH * 2 ** k for k in range(16)) if w < self.limits.context]
    count = 0
    for width in widths:
      size = 1
      while size <= self.limits.max_batch:
        self.generate([[self.pad_id] * min(width, self.limits.context - 1)] * size, [1] * size, [1] * size,
                      [RowSettings()] * size)
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
