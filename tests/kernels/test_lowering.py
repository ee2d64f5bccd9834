"""The TPU and GPU kernels lowered for their platforms without the hardware.

TPU: `jax.export` for platform 'tpu' runs the Pallas -> Mosaic lowering (block-shape and tiling
checks, every primitive's lowering rule) and emits tpu_custom_calls. Mosaic's own compilation (layout
passes, VMEM allocation) happens only on a TPU. GPU: lowering for 'cuda' runs the Pallas -> Triton IR
lowering; Triton's compilation to PTX happens only on a GPU (benchmarks/logprob.py --gpu does it).
"""

import jax
import jax.numpy as jnp
import pytest

from alignment.kernels import BLOCKS, token_logprobs

N, D, V = 1000, 576, 49152 + 100  # ragged rows and vocabulary at a real model's width


def fwd_bwd(impl):
  def f(h, w, y, hr, wr, c):
    def loss(h, w):
      # The block sizes the target platform would use, not this machine's.
      blocks = BLOCKS[impl]["tpu" if impl == "pallas_tpu" else "gpu"]
      out = token_logprobs(h, w, y, ref_hidden=hr, ref_unembed=wr, temperature=0.7, impl=impl,
                           interpret=False, block_sizes=blocks)
      return jnp.sum(c * (out.logprobs + out.logsumexp + out.entropy + out.kl))
    return jax.grad(loss, argnums=(0, 1))(h, w)
  return jax.jit(f)


def shapes(dtype):
  s = jax.ShapeDtypeStruct
  return (s((N, D), dtype), s((D, V), dtype), s((N,), jnp.int32), s((N, D), dtype), s((D, V), dtype),
          s((N,), jnp.float32))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_tpu_kernels_export_for_tpu(dtype):
  exported = jax.export.export(fwd_bwd("pallas_tpu"), platforms=["tpu"])(*shapes(dtype))
  assert exported.mlir_module().count("tpu_custom_call") == 3  # forward, dh, dW


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gpu_kernels_lower_for_cuda(dtype):
  lowered = fwd_bwd("pallas_gpu").trace(*shapes(dtype)).lower(lowering_platforms=("cuda",))
  assert lowered.as_text().count("xla.gpu.triton") == 3
