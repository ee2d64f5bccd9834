"""The serving engine's continuous batching against the batch sampler, one request at a time.

Rows join a running batch between decode chunks and leave it when they finish, each at its own
position in its own part of the cache; the reference is `sampler.make_sampler` (left-padded rows sharing
one cache slot, itself checked against full forwards in tests/models/test_sampler.py) run on each
request alone with the same per-row settings and seed. Greedy and seeded draws must be the same tokens."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignment import models
from alignment.models import sampler
from alignment.serve.engine import DECODE_CHUNK, Engine, Limits, RowSettings
from alignment.train.model import Policy
from tests.models.test_sampler import TINY_GEMMA

LLAMA = models.ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                           init_std=0.3)
EOS, PAD, MAX_TOKENS = 3, 0, 20


def _policy(cfg):
  model = models.init_model(cfg, seed=2)
  tokenizer = types.SimpleNamespace(eos_id=EOS, pad_id=PAD)
  return Policy(cfg, nnx.to_pure_dict(nnx.state(model, nnx.Param)), tokenizer, "tiny")


def _alone(policy, prompt, n, max_tokens, settings, seed_of):
  """The batch sampler's tokens (the stop token kept) for each of a request's n rows, run alone."""
  fn = sampler.make_sampler(policy.cfg, sampler.SamplingConfig(max_new_tokens=MAX_TOKENS, eos_ids=(EOS,), pad_id=PAD))
  tokens, lengths = sampler.pad_prompts([prompt], PAD)
  out = []
  for choice in range(n):
    rows = sampler.RowSampling(jnp.asarray([settings.greedy]), jnp.asarray([settings.temperature], jnp.float32),
                               jnp.asarray([settings.top_p], jnp.float32),
                               jnp.asarray([seed_of(settings, choice)], jnp.uint32))
    got = fn(policy.params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(0),
             jnp.asarray([max_tokens], jnp.int32), rows)
    out.append(np.asarray(got.tokens)[0][np.asarray(got.mask)[0] == 1].tolist())
  return out


@pytest.mark.parametrize("cfg", [LLAMA, TINY_GEMMA], ids=["llama", "gemma"])
def test_rows_joining_and_leaving_a_running_batch_draw_what_they_draw_alone(cfg):
  policy = _policy(cfg)
  engine = Engine(policy, Limits(context=256, max_tokens=MAX_TOKENS, max_batch=8, queue=64, batch_window_s=0.0))
  rng = np.random.default_rng(0)
  requests = []
  for i in range(24):  # prompts from one token to past a width bucket; greedy and seeded draws, some top-p
    prompt = rng.integers(4, cfg.vocab_size, size=int(rng.choice([1, 2, 7, 30, 64, 65, 100]))).tolist()
    settings = RowSettings(greedy=i % 3 == 0, temperature=float(rng.choice([0.6, 1.0, 1.4])),
                           top_p=float(rng.choice([1.0, 0.8])), seed=i)
    requests.append((prompt, 1 + (i % 4 == 1), int(rng.integers(1, MAX_TOKENS + 1)), settings))
  # Three waves, each submitted while the previous one decodes, so rows join a batch mid-answer.
  futures = []
  for wave in range(3):
    futures += [engine.submit(p, n=n, max_tokens=m, settings=s) for p, n, m, s in requests[wave * 8:wave * 8 + 8]]
    futures[wave * 8].result(timeout=300)
  answers = [f.result(timeout=300) for f in futures]
  assert engine.stats["most_rows"] > 1 and engine.stats["requests"] == len(requests)
  for (prompt, n, max_tokens, settings), completions in zip(requests, answers):
    want = _alone(policy, prompt, n, max_tokens, settings, engine._row_seed)
    got = [c.tokens + ([c.stop_token] if c.finish_reason == "stop" else []) for c in completions]
    assert got == want, (len(prompt), settings)
    for c, w in zip(completions, want):
      assert c.finish_reason == ("stop" if w[-1] == EOS else "length")
      assert len(w) <= max_tokens


def test_a_chunk_stops_every_row_at_its_limit_and_leaves_finished_rows_alone():
  """Decoding one chunk by hand: a row with limit 2 draws 2 tokens, a done row draws none and its
  cache and position stay as they were."""
  policy = _policy(LLAMA)
  decode = sampler.make_slot_decoder(LLAMA, (EOS,), PAD, DECODE_CHUNK)
  dp = sampler.make_decode_params(LLAMA)(policy.params)
  caches = [{"k": jnp.ones((2, 2, 8, 64)), "v": jnp.ones((2, 2, 64, 8))} for _ in range(LLAMA.n_layers)]
  before = [jax.tree.map(np.asarray, c) for c in caches]
  slots = sampler.Slots(jnp.asarray([5, 6], jnp.int32), jnp.asarray([0, 9], jnp.int32), jnp.zeros(2, jnp.int32),
                        jnp.asarray([2, 10], jnp.int32), jnp.asarray([False, True]))
  rows = sampler.RowSampling(jnp.ones(2, bool), jnp.ones(2, jnp.float32), jnp.ones(2, jnp.float32),
                             jnp.zeros(2, jnp.uint32))
  tokens, _, mask, caches, slots = decode(dp, caches, slots, rows)
  assert np.asarray(mask)[1].tolist() == [0] * DECODE_CHUNK
  assert np.asarray(mask)[0].sum() == np.asarray(slots.t)[0] <= 2
  assert np.asarray(slots.done).all() and np.asarray(slots.pos)[1] == 9
  for got, was in zip(caches, before):  # the done row rewrites its own current slot only
    changed = (np.asarray(got["k"])[1] != was["k"][1]).any(axis=(0, 1))
    assert set(np.flatnonzero(changed)) <= {9}
