"""Per-token log-probabilities, entropy and KL from final hidden states and an unembedding.

`token_logprobs` is the only way a loss obtains log-probabilities; the backend is chosen by `impl`:

  naive       the plain reference: materialises [N, V] logits (naive.py)
  xla         blockwise over the vocabulary with a custom_vjp, never [N, V] (xla.py)
  pallas      the Pallas kernel for the platform: pallas_tpu on TPU, pallas_gpu on GPU, and on CPU
              pallas_tpu in interpret mode (slow; for tests)
  pallas_tpu  Mosaic TPU kernels (pallas_tpu.py); interpret mode off a TPU
  pallas_gpu  Triton kernels through Pallas (pallas_gpu.py); interpret mode off a GPU
  auto        xla everywhere: on an H100 the blockwise XLA path, whose matmuls are cuBLAS's, ran
              fwd+bwd 1.25-1.9x faster than pallas_gpu at under 4% of naive's memory
              (benchmarks/RESULTS.md); the Mosaic TPU kernel lowers for TPU but has not run on one
              yet, so a TPU takes xla too until it has (impl='pallas' asks for it)

All fused backends share one custom_vjp (fused.py) and its vocabulary parallelism.
"""

from typing import Mapping, NamedTuple, Optional

import jax

from alignment.choices import KERNEL_IMPLS

from alignment.kernels.fused import make_plan, token_logprobs_fused
from alignment.kernels.naive import token_logprobs_naive

IMPLS = KERNEL_IMPLS

# Block sizes per (backend, platform); `block_sizes=` overrides single entries.
#   xla:        block_vocab  columns per loop step ([N, block_vocab] float32 logits live at once)
#   pallas_tpu: block_rows x block_vocab tiles (multiples of 8 x 128), shrunk to fit VMEM
#   pallas_gpu: block_rows x block_vocab tiles (powers of 2), block_d = the contraction chunk;
#               num_warps / num_stages for Triton; splits = vocab splits of the forward and dh
#               kernels (0 = auto); dh_* / dw_* the dh and dW kernels' own (0 = the forward's)
BLOCKS = {
    "xla": {"cpu": dict(block_vocab=1024), "gpu": dict(block_vocab=2048),
            "tpu": dict(block_vocab=2048)},
    "pallas_tpu": {"tpu": dict(block_rows=256, block_vocab=1024),
                   "cpu": dict(block_rows=128, block_vocab=512)},
    # Tuned on an H100 (bf16, N=8192, D=576, V=49152; benchmarks/RESULTS.md).
    "pallas_gpu": {"gpu": dict(block_rows=128, block_vocab=128, block_d=64, num_warps=8,
                               num_stages=4, splits=0, dh_rows=64, dh_vocab=128, dh_warps=8,
                               dh_stages=3, dw_rows=128, dw_vocab=64, dw_warps=8, dw_stages=4),
                   "cpu": dict(block_rows=16, block_vocab=128, block_d=16, num_warps=4,
                               num_stages=1, splits=0, dh_rows=0, dh_vocab=0, dh_warps=0,
                               dh_stages=0, dw_rows=0, dw_vocab=0, dw_warps=0, dw_stages=0)},
}


class LogprobStats(NamedTuple):
  """Per-token float32 [N] statistics of pi = softmax(hidden @ unembed / temperature)."""
  logprobs: jax.Array
  logsumexp: jax.Array
  entropy: jax.Array
  ref_logprobs: Optional[jax.Array] = None
  kl: Optional[jax.Array] = None  # KL(pi || pi_ref) over the full vocabulary


def platform():
  """'cpu', 'gpu' or 'tpu': the default backend's kind."""
  name = jax.default_backend()
  return "gpu" if name in ("gpu", "cuda", "rocm") else name


def resolve_impl(impl, plat=None):
  """The concrete backend ('naive', 'xla', 'pallas_tpu', 'pallas_gpu') that `impl` means here."""
  plat = plat or platform()
  if impl == "auto":
    impl = "xla"
  if impl == "pallas":
    impl = "pallas_gpu" if plat == "gpu" else "pallas_tpu"
  return impl


def block_table(backend, plat=None):
  """The default block sizes of `backend` on this platform (a fresh dict)."""
  plat = plat or platform()
  table = BLOCKS.get(backend, {})
  return dict(table.get(plat) or table.get("cpu") or {})


def token_logprobs(hidden, unembed, targets, *, ref_hidden=None, ref_unembed=None, temperature=1.0,
                   impl="auto", block_sizes: Optional[Mapping[str, int]] = None,
                   interpret: Optional[bool] = None, vocab_axis: Optional[str] = "tensor"
                   ) -> LogprobStats:
  """hidden [N, D], unembed [D, V], targets [N] int32 -> LogprobStats of float32 [N] arrays.

  Differentiable w.r.t. `hidden` and `unembed`; the reference (`ref_*`, [N, D_ref], [D_ref, V]) gets
  no gradient. `temperature` is a Python float (static). Targets outside [0, V) (padding ids such as
  -100) give logprobs = -logsumexp, finite; mask such rows in the loss.

  Fused backends only: `block_sizes` overrides entries of `BLOCKS`; `interpret` forces Pallas
  interpret mode (default: on when the platform does not match the kernel); under a mesh
  (`jax.set_mesh`) with a `vocab_axis` of size > 1 dividing V, the vocabulary is split over that axis
  (unembed's layout P(None, vocab_axis)) and rows over the other axes (None disables).
  """
  if hidden.ndim != 2 or unembed.ndim != 2 or targets.ndim != 1:
    raise ValueError(f"token_logprobs wants hidden [N, D], unembed [D, V], targets [N]; got "
                     f"{hidden.shape}, {unembed.shape}, {targets.shape}")
  if hidden.shape[1] != unembed.shape[0] or hidden.shape[0] != targets.shape[0]:
    raise ValueError(f"token_logprobs shapes disagree: hidden {hidden.shape}, unembed {unembed.shape}, "
                     f"targets {targets.shape}")
  if (ref_hidden is None) != (ref_unembed is None):
    raise ValueError("token_logprobs needs both ref_hidden and ref_unembed, or neither")
  if ref_hidden is not None and (
      ref_hidden.ndim != 2 or ref_unembed.ndim != 2 or ref_hidden.shape[0] != hidden.shape[0]
      or ref_hidden.shape[1] != ref_unembed.shape[0] or ref_unembed.shape[1] != unembed.shape[1]):
    raise ValueError(f"token_logprobs reference shapes disagree: ref_hidden {ref_hidden.shape}, "
                     f"ref_unembed {ref_unembed.shape}; want [N, D_ref], [D_ref, {unembed.shape[1]}]")
  if impl not in IMPLS:
    raise ValueError(f"token_logprobs impl={impl!r}; expected one of {IMPLS}")
  if not temperature > 0:
    raise ValueError(f"token_logprobs temperature={temperature!r}; expected a positive float")
  plat = platform()
  backend = resolve_impl(impl, plat)
  if backend == "naive":
    out = token_logprobs_naive(hidden, unembed, targets, ref_hidden, ref_unembed, temperature)
    return LogprobStats(**out)
  blocks = block_table(backend, plat)
  unknown = set(block_sizes or {}) - set(blocks)
  if unknown:
    raise ValueError(f"token_logprobs block_sizes {sorted(unknown)} unknown for {backend}; "
                     f"expected some of {sorted(blocks)}")
  blocks.update(block_sizes or {})
  if interpret is None:
    interpret = (backend == "pallas_tpu" and plat != "tpu") or (backend == "pallas_gpu" and plat != "gpu")
  plan = make_plan(backend, hidden, unembed, temperature=temperature, has_ref=ref_hidden is not None,
                   blocks=blocks, interpret=interpret, vocab_axis=vocab_axis)
  return LogprobStats(**token_logprobs_fused(plan, hidden, unembed, targets, ref_hidden, ref_unembed))
