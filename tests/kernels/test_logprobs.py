"""Values and gradients of every token_logprobs backend against the float64 NumPy reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import logprob_reference as ref
from alignment.kernels import resolve_impl, token_logprobs

# Small blocks so every case has several row and vocab blocks, a ragged last vocab block (V = 300)
# and padded rows (N = 37): the interpret-mode kernels are slow, the shapes stay tiny.
BLOCKS = {
    "xla": dict(block_vocab=128),
    "pallas_tpu": dict(block_rows=16, block_vocab=128),
    "pallas_gpu": dict(block_rows=16, block_vocab=64, block_d=16),
}
FUSED = tuple(BLOCKS)
OUTPUTS = ("logprobs", "logsumexp", "entropy", "kl")
F32_RTOL = 1e-5
# bfloat16 inputs: logits are exact products of bf16 values summed in float32, so the forward stays
# near float32 accuracy; the backward rounds dz to bfloat16 before the two matmuls (as the naive path
# and every bf16 trainer does), so gradients carry bf16 rounding.
BF16_RTOL = dict(values=1e-5, grads=1e-2)


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def make(seed, n=37, d=24, v=300, scale=3.0, dtype=jnp.float32, with_ref=True, same=False):
  """Inputs whose logits have standard deviation about `scale`, plus masked rows (target -100)."""
  ks = jax.random.split(jax.random.key(seed), 8)
  h = jax.random.normal(ks[0], (n, d))
  w = jax.random.normal(ks[1], (d, v)) * scale / np.sqrt(d)
  y = jax.random.randint(ks[2], (n,), 0, v)
  y = jnp.where(jnp.arange(n) % 7 == 3, -100, y)  # masked rows
  x = dict(h=h.astype(dtype), w=w.astype(dtype), y=y)
  if with_ref:
    hr = h if same else h + 0.3 * jax.random.normal(ks[3], (n, d))
    wr = w if same else w + 0.3 * jax.random.normal(ks[4], (d, v)) * scale / np.sqrt(d)
    x.update(hr=hr.astype(dtype), wr=wr.astype(dtype))
  mask = (y >= 0).astype(jnp.float32)
  cts = {k: jax.random.normal(ks[5 + i % 3], (n,)) * mask for i, k in enumerate(OUTPUTS)}
  if not with_ref:
    cts.pop("kl")
  return x, cts


@functools.lru_cache(maxsize=None)
def _fn(impl, temperature, with_ref, names):
  """jit(value_and_grad) of sum_k cts[k] . out_k for the outputs `names`."""
  def loss(h, w, y, hr, wr, cts):
    out = token_logprobs(h, w, y, ref_hidden=hr, ref_unembed=wr, temperature=temperature, impl=impl,
                         block_sizes=BLOCKS.get(impl))
    total = sum(jnp.sum(cts[k] * getattr(out, k)) for k in names)
    return total, out._asdict()
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def run(impl, x, cts, temperature):
  names = tuple(sorted(cts))
  (_, out), (dh, dw) = _fn(impl, temperature, "hr" in x, names)(
      x["h"], x["w"], x["y"], x.get("hr"), x.get("wr"), {k: cts[k] for k in names})
  return out, dh, dw


def check(impl, x, cts, temperature, rtol_values, rtol_grads):
  out, dh, dw = run(impl, x, cts, temperature)
  np_in = {k: np.asarray(v.astype(jnp.float32)) if k != "y" else np.asarray(v) for k, v in x.items()}
  want = ref.values(np_in["h"], np_in["w"], np_in["y"], np_in.get("hr"), np_in.get("wr"), temperature)
  for k, v in want.items():
    got = np.asarray(out[k])
    assert got.dtype == np.float32 and np.all(np.isfinite(got)), (impl, k)
    if np.any(v != 0):  # the KL of policy == reference is exactly 0: checked by its own test
      assert rel(got, v) <= rtol_values, (impl, k, rel(got, v))
  if "kl" in want:
    assert np.all(np.asarray(out["kl"]) >= 0), impl
  want_dh, want_dw = ref.grads(np_in["h"], np_in["w"], np_in["y"], np_in.get("hr"), np_in.get("wr"),
                               temperature, {k: np.asarray(c) for k, c in cts.items()})
  assert dh.dtype == x["h"].dtype and dw.dtype == x["w"].dtype
  assert rel(dh.astype(jnp.float32), want_dh) <= rtol_grads, (impl, "dh", rel(dh.astype(jnp.float32), want_dh))
  assert rel(dw.astype(jnp.float32), want_dw) <= rtol_grads, (impl, "dW", rel(dw.astype(jnp.float32), want_dw))
  return out, dh, dw


def test_reference_gradients_match_finite_differences():
  x, cts = make(0, n=3, d=4, v=7)
  x = {k: np.asarray(v, np.float64) for k, v in x.items()}
  x["y"] = np.array([1, -100, 6])
  cts = {k: np.asarray(v, np.float64) for k, v in cts.items()}
  args = (x["h"], x["w"], x["y"], x["hr"], x["wr"], 0.7)
  fd = ref.finite_difference(*args, cts)
  exact = ref.grads(*args, cts)
  for a, b in zip(exact, fd):
    assert rel(a, b) < 1e-7


@pytest.mark.parametrize("impl", ("naive",) + FUSED)
def test_float32_with_reference_temperature_masked_rows(impl):
  x, cts = make(1)
  check(impl, x, cts, 0.7, F32_RTOL, F32_RTOL)


@pytest.mark.parametrize("impl", FUSED)
def test_logit_scale_100_no_reference(impl):
  # Logits of +-100: the online max and the centred entropy accumulator keep float32 accuracy.
  x, cts = make(2, scale=100.0, with_ref=False)
  out, _, _ = check(impl, x, cts, 1.0, F32_RTOL, F32_RTOL)
  assert "kl" not in out or out["kl"] is None


@pytest.mark.parametrize("impl", FUSED)
def test_policy_equals_reference_gives_zero_kl(impl):
  x, cts = make(3, scale=30.0, same=True)
  out, _, _ = check(impl, x, cts, 0.7, F32_RTOL, F32_RTOL)
  kl = np.asarray(out["kl"])
  assert np.all(kl >= 0) and np.max(kl) <= 1e-6, np.max(kl)
  np.testing.assert_array_equal(out["ref_logprobs"], out["logprobs"])


@pytest.mark.parametrize("impl", FUSED)
def test_bfloat16_inputs(impl):
  x, cts = make(4, dtype=jnp.bfloat16)
  check(impl, x, cts, 0.7, BF16_RTOL["values"], BF16_RTOL["grads"])


@pytest.mark.parametrize("impl", FUSED)
@pytest.mark.parametrize("names", [("logprobs",), ("entropy", "kl")])
def test_some_outputs_unused(impl, names):
  # Unused outputs reach the backward as symbolic zeros and switch parts of it off.
  x, cts = make(5)
  check(impl, x, {k: cts[k] for k in names}, 0.7, F32_RTOL, F32_RTOL)


def test_auto_is_xla_everywhere_and_pallas_stays_available():
  assert resolve_impl("auto", "cpu") == "xla"
  assert resolve_impl("auto", "tpu") == "xla"  # until the Mosaic kernel has run on a TPU
  assert resolve_impl("auto", "gpu") == "xla"  # faster than pallas_gpu on an H100 (RESULTS.md)
  assert resolve_impl("pallas", "tpu") == "pallas_tpu" and resolve_impl("pallas", "gpu") == "pallas_gpu"
  assert resolve_impl("pallas", "gpu") == "pallas_gpu"
  assert resolve_impl("pallas", "cpu") == "pallas_tpu"


def test_bad_arguments_name_the_problem():
  x, _ = make(6, with_ref=False)
  with pytest.raises(ValueError, match="impl="):
    token_logprobs(x["h"], x["w"], x["y"], impl="fast")
  with pytest.raises(ValueError, match="block_sizes"):
    token_logprobs(x["h"], x["w"], x["y"], impl="xla", block_sizes=dict(block_rows=8))
  with pytest.raises(ValueError, match="both ref_hidden and ref_unembed"):
    token_logprobs(x["h"], x["w"], x["y"], ref_hidden=x["h"])
