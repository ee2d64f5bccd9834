"""KV-cache sampler: exactness against full forwards and transformers, and sampling statistics."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignment import models
from alignment.models import sampler
from alignment.models.config import ModelConfig
from tests.models import real_weights

TINY = ModelConfig(vocab_size=12, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32,
                   init_std=0.3)
# Gemma-like: q/k norms, post norms, GELU, scaled embeddings, local window 3 with every 2nd layer global.
TINY_GEMMA = ModelConfig(vocab_size=40, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                         activation="gelu_tanh", qk_norm=True, post_norms=True, embed_scale=True,
                         sliding_window=3, global_every=2, rope_local_theta=100.0, rope_theta=1e4,
                         query_pre_attn_scalar=16.0, tie_embeddings=False, qkv_bias=True)


@pytest.fixture(autouse=True)
def _exact_matmuls():
  # GPUs default to TF32 float32 matmuls; these comparisons are at float32 precision.
  with jax.default_matmul_precision("highest"):
    yield


def _teacher_forced_batch(model, prompts, completions, temperature=1.0):
  """[(log-probs of each completion token, argmax at each step)] from one full, cache-free forward
  over the right-padded batch (causal, so the right padding changes nothing before it)."""
  seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
  width = max(map(len, seqs))
  batch = jnp.asarray([s + [0] * (width - len(s)) for s in seqs], jnp.int32)
  logits = np.asarray(models.logits(model, batch)) / temperature
  logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))
  out = []
  for i, (p, c) in enumerate(zip(prompts, completions)):
    rows = np.arange(len(p) - 1, len(p) + len(c) - 1)
    out.append((logp[i, rows, list(c)], logits[i, rows].argmax(-1)))
  return out


@pytest.mark.parametrize("cfg", [TINY, TINY_GEMMA], ids=["llama", "gemma"])
def test_greedy_cache_equals_full_forward_on_padded_batch(cfg):
  """Greedy tokens are the argmax of a full (cache-free) forward, and logprobs its log-softmax, for
  prompts of different lengths in one left-padded batch; with TINY_GEMMA the sequences run past the
  sliding window of 3, so the cache's local masks are exercised."""
  model = models.init_model(cfg, seed=1)
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(0, cfg.vocab_size, n)) for n in (1, 5, 9, 3)]
  tokens, lengths = sampler.pad_prompts(prompts, pad_id=0, multiple=4)
  out = sampler.sample(model, tokens, lengths, sampler.SamplingConfig(max_new_tokens=8, greedy=True))
  completions = [list(np.asarray(t)) for t in out.tokens]
  for i, (logp, argmax) in enumerate(_teacher_forced_batch(model, prompts, completions)):
    got = completions[i]
    np.testing.assert_array_equal(got, argmax)
    np.testing.assert_allclose(np.asarray(out.logprobs[i]), logp, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(out.mask), 1)


def test_eos_stops_each_row_and_pads():
  model = models.init_model(TINY, seed=1)
  prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11]]
  tokens, lengths = sampler.pad_prompts(prompts, pad_id=0, multiple=8)
  base = sampler.SamplingConfig(max_new_tokens=10, greedy=True, pad_id=0)
  free = np.asarray(sampler.sample(model, tokens, lengths, base).tokens)
  eos = int(free[0, 2])
  out = sampler.sample(model, tokens, lengths, dataclasses.replace(base, eos_ids=(eos,)))
  toks, mask, lens = np.asarray(out.tokens), np.asarray(out.mask), np.asarray(out.lengths)
  for i in range(len(prompts)):
    hits = np.flatnonzero(free[i] == eos)
    n = hits[0] + 1 if hits.size else 10
    assert lens[i] == n == mask[i].sum()
    np.testing.assert_array_equal(mask[i], np.arange(10) < n)
    np.testing.assert_array_equal(toks[i, :n], free[i, :n])  # same tokens up to and including EOS
    assert (toks[i, n:] == 0).all() and (np.asarray(out.logprobs)[i, n:] == 0).all()


def _expected(logits, temperature, top_k, top_p):
  """The sampling distribution, computed independently in numpy (HF warper semantics)."""
  z = logits / temperature
  if top_k:
    z = np.where(z < np.sort(z)[-top_k], -np.inf, z)
  p = np.exp(z - z.max())
  p /= p.sum()
  if top_p < 1:
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    drop = order[before >= top_p]
    p[drop] = 0
    p /= p.sum()
  return p


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 4, 1.0),
                                                     (1.0, 0, 0.8), (1.5, 6, 0.9)])
def test_sampling_frequencies_match_distribution(temperature, top_k, top_p):
  model = models.init_model(TINY, seed=3)
  prompt = [3, 1, 4, 1, 5]
  logits = np.asarray(models.logits(model, jnp.asarray([prompt])))[0, -1].astype(np.float64)
  p = _expected(logits, temperature, top_k, top_p)
  assert p.max() < 0.7 and (p > 0).sum() >= 3, p  # a distribution worth testing
  n = 20000
  tokens, lengths = sampler.pad_prompts([prompt] * n, multiple=8)
  s = sampler.SamplingConfig(max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p)
  out = sampler.sample(model, tokens, lengths, s, jax.random.key(42))
  drawn = np.asarray(out.tokens[:, 0])
  counts = np.bincount(drawn, minlength=TINY.vocab_size)
  assert counts[p == 0].sum() == 0, "a token outside the top-k / top-p set was drawn"
  support = p > 0
  chi2 = (((counts - n * p) ** 2)[support] / (n * p[support])).sum()
  assert chi2 < 35.0, (chi2, counts / n, p)  # 99.9% quantile of chi2 with <= 11 dof is 31.3
  np.testing.assert_allclose(np.asarray(out.logprobs[:, 0]), np.log(p[drawn]), atol=1e-5)


def _rows(greedy, temperature, top_p, seed):
  return sampler.RowSampling(jnp.asarray(greedy, bool), jnp.asarray(temperature, jnp.float32),
                             jnp.asarray(top_p, jnp.float32), jnp.asarray(seed, jnp.uint32))


def test_per_row_settings_draw_from_each_rows_own_distribution():
  """One batch, three settings (rows of each with their own seeds): each setting's draws follow its
  distribution, and the logprobs are its log-probabilities."""
  model = models.init_model(TINY, seed=3)
  prompt = [3, 1, 4, 1, 5]
  logits = np.asarray(models.logits(model, jnp.asarray([prompt])))[0, -1].astype(np.float64)
  settings = [(1.0, 1.0), (0.7, 1.0), (1.5, 0.8)]
  n = 6000
  tokens, lengths = sampler.pad_prompts([prompt] * (n * len(settings)), multiple=8)
  rows = _rows([False] * (n * 3), np.repeat([t for t, _ in settings], n), np.repeat([p for _, p in settings], n),
               np.arange(n * 3))
  fn = sampler.make_sampler(TINY, sampler.SamplingConfig(max_new_tokens=1))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  out = fn(params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(0), None, rows)
  drawn = np.asarray(out.tokens[:, 0])
  for k, (temperature, top_p) in enumerate(settings):
    p = _expected(logits, temperature, 0, top_p)
    mine = drawn[k * n:(k + 1) * n]
    counts = np.bincount(mine, minlength=TINY.vocab_size)
    assert counts[p == 0].sum() == 0
    chi2 = (((counts - n * p) ** 2)[p > 0] / (n * p[p > 0])).sum()
    assert chi2 < 35.0, (temperature, top_p, chi2)  # 99.9% quantile with <= 11 dof is 31.3
    np.testing.assert_allclose(np.asarray(out.logprobs[k * n:(k + 1) * n, 0]), np.log(p[mine]), atol=1e-5)


def test_a_rows_tokens_depend_on_its_own_settings_and_limit_only():
  model = models.init_model(TINY, seed=1)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11]]
  fn = sampler.make_sampler(TINY, sampler.SamplingConfig(max_new_tokens=10, pad_id=0))
  tokens, lengths = sampler.pad_prompts(prompts, pad_id=0, multiple=8)
  rows = _rows([True, False, False, True], [1.0, 0.8, 1.2, 1.0], [1.0, 0.9, 1.0, 1.0], [0, 11, 12, 0])
  limits = jnp.asarray([10, 4, 7, 1], jnp.int32)
  out = fn(params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(0), limits, rows)
  greedy = sampler.sample(model, tokens, lengths, sampler.SamplingConfig(max_new_tokens=10, greedy=True))
  np.testing.assert_array_equal(np.asarray(out.tokens[0]), np.asarray(greedy.tokens[0]))
  np.testing.assert_array_equal(np.asarray(out.lengths), [10, 4, 7, 1])
  for i in range(4):  # alone, at another width, with the same settings and seed
    alone_tokens, alone_lengths = sampler.pad_prompts([prompts[i]], pad_id=0, multiple=16)
    alone = fn(params, jnp.asarray(alone_tokens), jnp.asarray(alone_lengths), jax.random.key(5), limits[i:i + 1],
               jax.tree.map(lambda a: a[i:i + 1], rows))
    np.testing.assert_array_equal(np.asarray(alone.tokens[0]), np.asarray(out.tokens[i]))
    np.testing.assert_allclose(np.asarray(alone.logprobs[0]), np.asarray(out.logprobs[i]), atol=1e-5)


def test_sharded_over_a_mesh_matches_unsharded():
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  if len(jax.devices()) < 4:
    pytest.skip("needs 4 devices (tests/conftest.py asks for 8 fake CPU devices)")
  mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  model = models.init_model(TINY_GEMMA, seed=1)
  prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11]]
  tokens, lengths = sampler.pad_prompts(prompts, multiple=8)
  s = sampler.SamplingConfig(max_new_tokens=6, greedy=True)
  ref = sampler.sample(model, tokens, lengths, s)
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  with jax.set_mesh(mesh):
    out = sampler.sample(model, jax.device_put(tokens, NamedSharding(mesh, P(("data", "fsdp"), None))),
                         jax.device_put(lengths, batch), s, mesh=mesh)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
  np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5)


QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "hi",
             "List three prime numbers and explain briefly why each of them is prime, please.",
             "Tell me one fun fact about octopuses, please."]


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers_generate_and_logprobs_teacher_forced():
  import torch
  model, tok = real_weights.ours("smollm2-135m-instruct")
  ref_model = real_weights.reference_model("smollm2-135m-instruct")
  prompts = [tok.ids(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True),
                     add_special_tokens=False) for q in QUESTIONS]
  assert len({len(p) for p in prompts}) == len(prompts)
  N = 20
  tokens, lengths = sampler.pad_prompts(prompts, pad_id=2)
  out = sampler.sample(model, tokens, lengths,
                       sampler.SamplingConfig(max_new_tokens=N, greedy=True, eos_ids=(2,), pad_id=2))
  # transformers: the same left-padded batch.
  width = max(map(len, prompts))
  ids = torch.tensor([[2] * (width - len(p)) + p for p in prompts])
  attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
  with torch.no_grad():
    ref = ref_model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=N, do_sample=False,
                             eos_token_id=2, pad_token_id=2)[:, width:].numpy()
  toks, mask = np.asarray(out.tokens), np.asarray(out.mask)
  completions = []
  for i, p in enumerate(prompts):
    n = int(mask[i].sum())
    theirs = list(ref[i])
    theirs = theirs[:theirs.index(2) + 1] if 2 in theirs else theirs
    assert list(toks[i, :n]) == theirs, (QUESTIONS[i], tok.decode(toks[i, :n]), tok.decode(theirs))
    completions.append(list(toks[i, :n]))
  worst = max(np.abs(np.asarray(out.logprobs[i, :len(c)]) - logp).max()
              for i, (c, (logp, _)) in enumerate(zip(completions, _teacher_forced_batch(model, prompts, completions))))
  print(f"greedy == transformers on {len(prompts)} rows; max |logprob - teacher-forced| = {worst:.2e}")
  assert worst < 1e-4, worst
  # Temperature sampling: logprobs are those of softmax(logits / T), teacher-forced.
  out = sampler.sample(model, tokens, lengths, sampler.SamplingConfig(
      max_new_tokens=12, temperature=0.8, eos_ids=(2,), pad_id=2), jax.random.key(7))
  completions = [list(np.asarray(out.tokens[i, :int(out.lengths[i])])) for i in range(len(prompts))]
  for i, (logp, _) in enumerate(_teacher_forced_batch(model, prompts, completions, temperature=0.8)):
    np.testing.assert_allclose(np.asarray(out.logprobs[i, :len(completions[i])]), logp, atol=1e-4)


def _sampler_and_trainer_logprobs(model, prompts, new_tokens):
  """Greedy continuations of `prompts` (no EOS stop), and for every generated token its log-probability
  twice: as the sampler reports it (prefill, then one cached decode step per token) and as training
  computes it (`Transformer.__call__` on prompt + continuation, right-padded, then
  `kernels.token_logprobs`). Returns (sampler, trainer, logsumexp), each float32 [B, new_tokens]."""
  from flax import nnx

  from alignment.kernels import token_logprobs
  tokens, lengths = sampler.pad_prompts(prompts, pad_id=2)
  out = sampler.sample(model, tokens, lengths, sampler.SamplingConfig(max_new_tokens=new_tokens, greedy=True,
                                                                      pad_id=2))
  assert np.asarray(out.mask).all()
  generated = np.asarray(out.tokens)
  # The trainer's batch: each row starts at position 0, padding is segment 0, long enough (>= 128, a
  # multiple of 4) for training attention's causal query blocks.
  width = -(-(max(map(len, prompts)) + new_tokens) // 32) * 32
  seqs = np.full((len(prompts), width), 2, np.int32)
  segments = np.zeros((len(prompts), width), np.int32)
  for i, p in enumerate(prompts):
    n = len(p) + new_tokens
    seqs[i, :n], segments[i, :n] = list(p) + list(generated[i]), 1
  graphdef, params = nnx.split(model, nnx.Param)

  @jax.jit
  def trainer(params, seqs, segments):
    model = nnx.merge(graphdef, params)
    hidden = model(seqs, None, segments)
    stats = token_logprobs(hidden.reshape(-1, hidden.shape[-1]), model.unembed_matrix(),
                           jnp.roll(seqs, -1, axis=1).reshape(-1), impl="naive")
    return stats.logprobs.reshape(seqs.shape), stats.logsumexp.reshape(seqs.shape)

  logprobs, logsumexp = (np.asarray(a) for a in trainer(params, seqs, segments))
  rows = np.arange(len(prompts))[:, None]
  cols = np.asarray([len(p) - 1 for p in prompts])[:, None] + np.arange(new_tokens)[None]
  return np.asarray(out.logprobs), logprobs[rows, cols], logsumexp[rows, cols]


@pytest.mark.slow
def test_smollm2_sampler_logprobs_equal_the_trainers():
  """Online RL's importance ratios compare the sampler's log-probabilities with the trainer's: the two
  must agree on the same params and tokens. Prompts of different lengths (left padding in the sampler,
  right padding in the trainer), ~100 greedy tokens each, float32 and bfloat16."""
  _, tok = real_weights.ours("smollm2-135m-instruct")
  prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True),
                        add_special_tokens=False).ids for q in QUESTIONS]
  assert len({len(p) for p in prompts}) == len(prompts)
  N = 96
  for dtype in ("float32", "bfloat16"):
    model, _ = models.load("smollm2-135m-instruct", dtype=dtype)
    ours, theirs, logsumexp = _sampler_and_trainer_logprobs(model, prompts, N)
    assert np.isfinite(ours).all() and np.isfinite(theirs).all()
    diff = np.abs(ours - theirs)
    # A log-probability is logit - logsumexp, so its rounding error scales with the logits' size, not with
    # its own (a log-probability near 0 is the difference of two numbers near |logsumexp|).
    scale = np.abs(logsumexp).max()
    eps = float(jnp.finfo(dtype).eps)
    print(f"{dtype}: max |sampler - trainer| log-prob = {diff.max():.3g} over {diff.size} tokens "
          f"(median {np.median(diff):.3g}; max |logsumexp| {scale:.3g}, eps {eps:.3g})")
    if dtype == "float32":
      # The same math summed in other orders (one token per step vs the whole sequence, other matmul
      # shapes, blockwise attention) through 30 layers. The trainer disagrees with itself by up to ~5
      # epsilons of the logits' scale (~2e-5 here) when only its padding width changes; decode positions
      # off by one move log-probabilities by up to 0.2 (median 5e-3).
      assert diff.max() <= 16 * eps * scale and np.median(diff) <= eps * scale, (diff.max(), scale)
    else:
      # bfloat16 keeps 8 bits: every layer's activations are rounded, at other places on the two paths, so
      # a logit can move by a few epsilons of its size (the trainer moves by ~0.4 eps * scale against
      # itself when only its padding width changes). The typical token must stay far below that: the
      # two paths compute the same function.
      assert diff.max() <= 2 * eps * scale and np.median(diff) <= eps * scale / 8, (diff.max(), scale)
