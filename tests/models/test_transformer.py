"""The NNX transformer against an independent float64 NumPy forward, plus packing, scan/remat and sharding
metadata checks. Tiny shapes: the whole file runs in seconds on CPU."""

import dataclasses
import functools
import importlib.util
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignment import models
from alignment.models import ModelConfig, ScalarHead, Transformer, get_model_config
from alignment.models import transformer
from alignment.models.transformer import param_specs

LLAMA = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=40,
                    rope_theta=10000.0, rms_eps=1e-5)
QWEN2 = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=8, d_ff=40,
                    rope_theta=1e6, rms_eps=1e-6, qkv_bias=True, tie_embeddings=False)
GEMMA3 = ModelConfig(vocab_size=61, d_model=24, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=12, d_ff=40,
                     rope_theta=1e6, rope_local_theta=1e4, rms_eps=1e-6, activation="gelu_tanh", qk_norm=True,
                     post_norms=True, embed_scale=True, sliding_window=3, global_every=2,
                     query_pre_attn_scalar=10.0)
CONFIGS = {"llama": LLAMA, "qwen2": QWEN2, "gemma3": GEMMA3}
LOGICAL = {"vocab", "embed", "heads", "kv", "mlp", "layers", None}
_EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
  # GPUs may run float32 matmuls in TF32 by default; the references below need real float32.
  with jax.default_matmul_precision("highest"):
    yield


def random_model(cfg, seed=0):
  """A model with every param random (norm scales away from 1, biases away from 0), built without
  compiling anything: abstract init, then NumPy values (XLA compiles are slow on these CPUs)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
  rng = np.random.default_rng(seed)
  values = {}
  for path, spec in param_specs(cfg).items():
    noise = rng.standard_normal(spec.shape)
    value = spec.std * noise if spec.std is not None else spec.fill + 0.1 * noise
    node = values
    for key in path.split("/")[:-1]:
      node = node.setdefault(key, {})
    node[path.split("/")[-1]] = jnp.asarray(value, cfg.param_dtype)
  nnx.replace_by_pure_dict(state, values)
  return nnx.merge(graphdef, state)


def jitted(model):
  """model(tokens, positions, segment_ids) as a pure jitted function of the split params."""
  graphdef, params = nnx.split(model, nnx.Param)
  fn = jax.jit(lambda p, *args: nnx.merge(graphdef, p)(*args))
  return lambda *args: np.asarray(fn(params, *args))


def numpy_params(model):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(model, nnx.Param)))


# An independent float64 reference, written from the papers / HF modeling code, one token at a time.

def np_rms(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def np_rope(x, pos, theta):
  """HF rotate-half: x * cos + rotate_half(x) * sin, with freqs repeated over both halves. x [..., Dh]."""
  dh = x.shape[-1]
  inv_freq = 1.0 / theta ** (np.arange(0, dh, 2) / dh)
  emb = np.concatenate([pos * inv_freq, pos * inv_freq])
  rotated = np.concatenate([-x[..., dh // 2:], x[..., :dh // 2]], axis=-1)
  return x * np.cos(emb) + rotated * np.sin(emb)


def np_act(x, kind):
  if kind == "silu":
    return x / (1.0 + np.exp(-x))
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def np_forward(cfg, p, tokens, positions, segments):
  """[T] tokens of one row -> [T, D] final-norm hidden states, float64."""
  T = len(tokens)
  group = cfg.n_heads // cfg.n_kv_heads
  scale = 1.0 / math.sqrt(cfg.query_pre_attn_scalar or cfg.head_dim)
  x = p["embed"][tokens] * (math.sqrt(cfg.d_model) if cfg.embed_scale else 1.0)
  for l in range(cfg.n_layers):
    w = jax.tree.map(lambda a: a[l], p["layers"])
    a = w["attn"]
    is_global = cfg.sliding_window is None or (cfg.global_every is not None and l % cfg.global_every
                                               == cfg.global_every - 1)
    theta = cfg.rope_theta if is_global else (cfg.rope_local_theta or cfg.rope_theta)
    h = np_rms(x, w["attn_norm"], cfg.rms_eps)
    attn_out = np.zeros((T, cfg.d_model))
    for i in range(T):
      for head in range(cfg.n_heads):
        kvh = head // group
        q = h[i] @ a["q"][:, head, :] + (a["q_bias"][head] if cfg.qkv_bias else 0.0)
        if cfg.qk_norm:
          q = np_rms(q, a["q_norm"], cfg.rms_eps)
        q = np_rope(q, positions[i], theta)
        keys = [j for j in range(i + 1) if segments[j] == segments[i]
                and (is_global or i - j < cfg.sliding_window)]
        scores, values = [], []
        for j in keys:
          k = h[j] @ a["k"][:, kvh, :] + (a["k_bias"][kvh] if cfg.qkv_bias else 0.0)
          if cfg.qk_norm:
            k = np_rms(k, a["k_norm"], cfg.rms_eps)
          k = np_rope(k, positions[j], theta)
          scores.append(q @ k * scale)
          values.append(h[j] @ a["v"][:, kvh, :] + (a["v_bias"][kvh] if cfg.qkv_bias else 0.0))
        scores = np.array(scores)
        weights = np.exp(scores - scores.max())
        weights /= weights.sum()
        head_out = sum(wt * v for wt, v in zip(weights, values))
        attn_out[i] += head_out @ a["o"][head]
    if cfg.post_norms:
      attn_out = np_rms(attn_out, w["post_attn_norm"], cfg.rms_eps)
    x = x + attn_out
    h = np_rms(x, w["mlp_norm"], cfg.rms_eps)
    m = w["mlp"]
    mlp_out = (np_act(h @ m["gate"], cfg.activation) * (h @ m["up"])) @ m["down"]
    if cfg.post_norms:
      mlp_out = np_rms(mlp_out, w["post_mlp_norm"], cfg.rms_eps)
    x = x + mlp_out
  return np_rms(x, p["final_norm"], cfg.rms_eps)


# (a) forward against the float64 reference.

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_forward_matches_float64_numpy_reference(name):
  cfg = CONFIGS[name]
  model = random_model(cfg)
  rng = np.random.default_rng(0)
  T = 9  # longer than GEMMA3's sliding window of 3, so the window and the global layer both matter
  tokens = rng.integers(0, cfg.vocab_size, (2, T)).astype(np.int32)
  positions = np.stack([np.arange(T), np.arange(T) + 37]).astype(np.int32)  # row 1: RoPE away from 0
  got = jitted(model)(tokens, positions)
  p = numpy_params(model)
  ones = np.ones(T, int)
  for b in range(2):
    np.testing.assert_allclose(got[b], np_forward(cfg, p, tokens[b], positions[b], ones), atol=1e-4, rtol=0)
  if cfg.sliding_window is not None:  # guards the test: the window must change the reference's answer
    unwindowed = dataclasses.replace(cfg, sliding_window=None, global_every=None)
    assert np.abs(got[0] - np_forward(unwindowed, p, tokens[0], positions[0], ones)).max() > 1e-2
  if not cfg.tie_embeddings:  # logits = hidden @ unembed in float32 (the tied case: test_load_tiny_random)
    np.testing.assert_allclose(models.logits(model, jnp.asarray(tokens[:1])),
                               np_forward(cfg, p, tokens[0], np.arange(T), ones)[None] @ p["unembed"],
                               atol=1e-4, rtol=0)


# (b) packing and padding.

@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_packed_rows_match_separate_runs_and_padding_is_finite(name):
  cfg = CONFIGS[name]
  fwd = jitted(random_model(cfg))
  rng = np.random.default_rng(2)
  a, b = rng.integers(0, cfg.vocab_size, 4), rng.integers(0, cfg.vocab_size, 5)
  junk = rng.integers(0, cfg.vocab_size, 11)
  tokens = np.stack([np.concatenate([a, b, [7, 7]]),  # a and b packed, then 2 padding tokens
                     np.concatenate([a, junk[4:]]),  # a alone: causality hides what follows
                     np.concatenate([b, junk[5:]]),  # b alone
                     junk]).astype(np.int32)  # an all-padding row
  positions = np.array([[0, 1, 2, 3, 0, 1, 2, 3, 4, 0, 0]] + [list(range(11))] * 3, np.int32)
  segments = np.array([[1] * 4 + [2] * 5 + [0] * 2] + [[1] * 11] * 2 + [[0] * 11], np.int32)
  out = fwd(tokens, positions, segments)
  np.testing.assert_allclose(out[0, :4], out[1, :4], atol=1e-5, rtol=0)
  np.testing.assert_allclose(out[0, 4:9], out[2, :5], atol=1e-5, rtol=0)
  assert np.isfinite(out).all()  # includes the padding tokens of row 0 and the all-padding row 3
  # Real tokens never see padding: other pad token ids change nothing.
  tokens[0, 9:] = [3, 11]
  np.testing.assert_array_equal(fwd(tokens, positions, segments)[0, :9], out[0, :9])


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_rows_long_enough_for_query_blocks_match_the_reference(name):
  cfg = CONFIGS[name]
  T = 128  # attention runs in query blocks (transformer._QUERY_BLOCKS > 1): packed segments cross blocks
  assert transformer._QUERY_BLOCKS > 1 and T % transformer._QUERY_BLOCKS == 0
  model = random_model(cfg, seed=3)
  rng = np.random.default_rng(3)
  tokens = rng.integers(0, cfg.vocab_size, (1, T)).astype(np.int32)
  lengths = (45, 70)  # then 13 cells of padding
  segments = np.zeros((1, T), np.int32)
  positions = np.zeros((1, T), np.int32)
  start = 0
  for seg, n in enumerate(lengths, start=1):
    segments[0, start:start + n], positions[0, start:start + n] = seg, np.arange(n)
    start += n
  got = jitted(model)(tokens, positions, segments)
  p = numpy_params(model)
  start = 0
  for n in lengths:
    want = np_forward(cfg, p, tokens[0, start:start + n], np.arange(n), np.ones(n, int))
    np.testing.assert_allclose(got[0, start:start + n], want, atol=1e-4, rtol=0)
    start += n
  assert np.isfinite(got).all()


# (c) scan vs loop, remat modes: same outputs and gradients.

@pytest.mark.parametrize("name,variants", [
    ("gemma3", [(True, "dots"), (True, "all_dots")]),  # local + global layers: the flag is a scanned input
    ("llama", [(True, "full"), (True, "all_dots"), (False, "all_dots")]),  # all layers alike: a static flag
])
def test_scan_and_remat_give_same_outputs_and_gradients(name, variants):
  base = dataclasses.replace(CONFIGS[name], scan_layers=False, remat="none")
  graphdef, params = nnx.split(random_model(base), nnx.Param)
  params = nnx.to_pure_dict(params)
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, 61, (2, 7)), jnp.int32)
  probe = jnp.asarray(np.random.default_rng(4).standard_normal((2, 7, base.d_model)), jnp.float32)

  def run(cfg):
    def loss(p):
      model = nnx.merge(graphdef, p)
      model.cfg = cfg  # same params, different execution strategy
      hidden = model(tokens)
      return jnp.sum(hidden * probe), hidden
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params), jax.make_jaxpr(loss)(params)

  ((_, want_hidden), want_grads), _ = run(base)
  for scan_layers, remat in variants:
    ((_, hidden), grads), jaxpr = run(dataclasses.replace(base, scan_layers=scan_layers, remat=remat))
    np.testing.assert_allclose(hidden, want_hidden, atol=1e-5, rtol=0, err_msg=f"{scan_layers} {remat}")
    # Summation order differs between the variants: compare at float32 noise relative to each leaf's scale.
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5 * np.abs(w).max(), rtol=0,
                                                         err_msg=f"{scan_layers} {remat}"), grads, want_grads)
    text = str(jaxpr)
    assert ("scan" in text) == scan_layers
    assert (("checkpoint" in text) or ("remat" in text)) == (remat != "none")


@pytest.mark.parametrize("scan_layers", [True, False])
def test_remat_policies_keep_the_residuals_they_name(scan_layers):
  """What the backward stores: the arrays the vjp function holds (its pytree leaves), counted by size.
  Per layer, 'all_dots' keeps two [B, T, d_ff] arrays (the gate and up matmuls' outputs; no remat also
  keeps the activation's intermediates) and the attention scores; 'dots' keeps the weight matmuls but not
  the scores; 'full' keeps neither; each keeps less than the one before it."""
  cfg = dataclasses.replace(LLAMA, scan_layers=scan_layers)
  graphdef, params = nnx.split(random_model(cfg), nnx.Param)
  B, T, L = 2, 7, cfg.n_layers
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, 61, (B, T)), jnp.int32)

  def residuals(remat):
    def loss(p):
      model = nnx.merge(graphdef, p)
      model.cfg = dataclasses.replace(cfg, remat=remat)
      return jnp.sum(model(tokens) ** 2)
    sizes = [math.prod(a.shape) for a in jax.tree.leaves(jax.vjp(loss, nnx.to_pure_dict(params))[1])]
    # How many arrays of `size` elements each layer keeps (a scan stacks each one over the L layers).
    per_layer = lambda size: sum(n for n in sizes if n in (size, L * size)) / (L * size)
    return per_layer(B * T * cfg.d_ff), per_layer(B * cfg.n_heads * T * T), sum(sizes)

  none, all_dots, dots, full = (residuals(r) for r in ("none", "all_dots", "dots", "full"))
  assert all_dots[:2] == (2, 1) and dots[:2] == (2, 0) and full[:2] == (0, 0), (all_dots, dots, full)
  assert none[0] > 2 and none[1] >= 1 and full[2] < dots[2] < all_dots[2] < none[2], (none, all_dots, dots, full)


@pytest.mark.parametrize("name,frozen", [("llama", 1), ("gemma3", 2)])
def test_frozen_layers_zero_lower_gradients_and_keep_the_rest(name, frozen):
  """frozen_layers=n: the same outputs; layers below n and the embedding lookup get zero gradient; every
  other gradient (upper layers, final norm, the unembedding) equals the unfrozen model's, since stopping
  the gradient at layer n changes nothing above it."""
  base = dataclasses.replace(CONFIGS[name], tie_embeddings=False, n_layers=4)  # gemma3: local and global layers
  graphdef, params = nnx.split(random_model(base), nnx.Param)
  params = nnx.to_pure_dict(params)
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, 61, (2, 9)), jnp.int32)
  probe = jnp.asarray(np.random.default_rng(6).standard_normal((2, 9, base.d_model)), jnp.float32)

  def grads(cfg):
    def loss(p):
      model = nnx.merge(graphdef, p)
      model.cfg = cfg
      return jnp.sum(model(tokens) * probe)
    return jax.jit(jax.value_and_grad(loss))(params)

  want_loss, want = grads(base)
  got_loss, got = grads(dataclasses.replace(base, frozen_layers=frozen))
  assert float(got_loss) == pytest.approx(float(want_loss), rel=1e-5)  # two scans: another summation order
  # Zero where the gradient is stopped, exactly.
  assert not np.any(got["embed"])
  for path, g in jax.tree_util.tree_leaves_with_path(got["layers"]):
    assert not np.any(g[:frozen]), jax.tree_util.keystr(path)
  # Equal elsewhere, up to float32 reordering noise: each gradient element is a sum over all tokens, the
  # frozen model's summed in another order (two scans), so an element differs by a few hundred float32
  # epsilons of the leaf's largest |gradient| in absolute terms, whatever its own size (a small element
  # is the small difference of large terms).
  close = lambda g, w, path: np.testing.assert_allclose(g, w, atol=256 * _EPS32 * np.abs(w).max(), rtol=0,
                                                        err_msg=path)
  for path, g in jax.tree_util.tree_leaves_with_path(got["layers"]):
    w = functools.reduce(lambda d, k: d[k.key], path, want["layers"])
    close(g[frozen:], w[frozen:], jax.tree_util.keystr(path))
  for name in ("final_norm", "unembed"):
    close(got[name], want[name], name)
  with pytest.raises(ValueError, match="frozen_layers"):
    dataclasses.replace(base, frozen_layers=base.n_layers + 1)


# (d) logical axis names on every param.

EXPECTED_AXES = {
    "embed": ("vocab", "embed"),
    "unembed": ("embed", "vocab"),
    "final_norm": ("embed",),
    "layers/attn_norm": ("layers", "embed"),
    "layers/mlp_norm": ("layers", "embed"),
    "layers/post_attn_norm": ("layers", "embed"),
    "layers/post_mlp_norm": ("layers", "embed"),
    "layers/attn/q": ("layers", "embed", "heads", "kv"),
    "layers/attn/k": ("layers", "embed", "heads", "kv"),
    "layers/attn/v": ("layers", "embed", "heads", "kv"),
    "layers/attn/o": ("layers", "heads", "kv", "embed"),
    "layers/attn/q_bias": ("layers", "heads", "kv"),
    "layers/attn/k_bias": ("layers", "heads", "kv"),
    "layers/attn/v_bias": ("layers", "heads", "kv"),
    "layers/attn/q_norm": ("layers", "kv"),
    "layers/attn/k_norm": ("layers", "kv"),
    "layers/mlp/gate": ("layers", "embed", "mlp"),
    "layers/mlp/up": ("layers", "embed", "mlp"),
    "layers/mlp/down": ("layers", "mlp", "embed"),
    "kernel": ("embed", None),
    "bias": (None,),
}


def flat_specs(module):
  state = nnx.state(module, nnx.Param)
  specs = nnx.get_partition_spec(state)
  shapes = {"/".join(map(str, k)): v.shape for k, v in nnx.to_flat_state(state)}
  return {"/".join(map(str, k)): tuple(v.get_value()) for k, v in nnx.to_flat_state(specs)}, shapes


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_param_has_logical_axes_of_its_rank(name):
  specs, shapes = flat_specs(nnx.eval_shape(lambda: Transformer(CONFIGS[name], rngs=nnx.Rngs(0))))
  for path, spec in specs.items():
    assert len(spec) == len(shapes[path]), path
    assert set(spec) <= LOGICAL, path
    assert spec == EXPECTED_AXES[path], path
  cfg = CONFIGS[name]
  assert ("unembed" in specs) == (not cfg.tie_embeddings)
  assert ("layers/attn/q_bias" in specs) == cfg.qkv_bias
  assert ("layers/attn/q_norm" in specs) == cfg.qk_norm
  assert ("layers/post_mlp_norm" in specs) == cfg.post_norms


def test_scalar_head():
  head = ScalarHead(16, rngs=nnx.Rngs(0), param_dtype="bfloat16")
  specs, shapes = flat_specs(head)
  assert specs == {"kernel": ("embed", None), "bias": (None,)} and shapes["kernel"] == (16, 1)
  hidden = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5, 16)), jnp.bfloat16)
  out = nnx.jit(lambda h, x: h(x))(head, hidden)
  assert out.shape == (3, 5) and out.dtype == jnp.float32
  want = np.asarray(hidden, np.float64) @ np.asarray(head.kernel[...], np.float64)[:, 0]
  np.testing.assert_allclose(out, want, atol=1e-4)


# Configs, presets, load.

def test_presets_have_the_published_parameter_counts():
  def count(cfg):
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert count(get_model_config("smollm2-135m")) == 134_515_008
  assert count(get_model_config("gemma3-270m")) == 268_098_176
  assert get_model_config("gemma3-270m").layer_is_local == ((True,) * 5 + (False,)) * 3


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="n_heads=4 is not divisible by n_kv_heads=3"):
    dataclasses.replace(LLAMA, n_kv_heads=3)
  with pytest.raises(ValueError, match="activation='relu'"):
    get_model_config("tiny-random", activation="relu")
  with pytest.raises(ValueError, match="remat='some'"):
    get_model_config("tiny-random", remat="some")
  with pytest.raises(ValueError, match="unknown model config 'llama-9000'.*gemma3-270m.*tiny-random"):
    get_model_config("llama-9000")
  with pytest.raises(ValueError, match=r"unknown ModelConfig field\(s\) \['d_modle'\]"):
    get_model_config("tiny-random", d_modle=3)


def test_load_tiny_random_and_bfloat16():
  model, tokenizer = models.load("tiny-random")
  if models.TINY_TOKENIZER.exists():
    assert tokenizer is not None and tokenizer.get_vocab_size() <= model.cfg.vocab_size
  tokens = jnp.asarray(np.random.default_rng(5).integers(0, 512, (2, 6)), jnp.int32)
  lg = models.logits(model, tokens)
  assert lg.shape == (2, 6, 512) and lg.dtype == jnp.float32
  p = numpy_params(model)
  want = np_forward(model.cfg, p, np.asarray(tokens[1]), np.arange(6), np.ones(6, int)) @ p["embed"].T  # tied
  np.testing.assert_allclose(lg[1], want, atol=1e-4, rtol=0)
  bf16, _ = models.load("tiny-random", dtype="bfloat16")
  assert bf16.embed[...].dtype == jnp.bfloat16 and jax.eval_shape(bf16, tokens).dtype == jnp.bfloat16
  np.testing.assert_allclose(models.logits(bf16, tokens), lg, atol=0.05 * np.abs(lg).max())
  if importlib.util.find_spec("gguf") is not None:  # unknown names consult the GGUF/HF registry first
    with pytest.raises(ValueError, match=r"load\('no-such-model'\): expected one of .*'tiny-random'"):
      models.load("no-such-model")
