"""Run in a subprocess with 8 fake CPU devices: vocab-parallel token_logprobs == single device.

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 python vocab_parallel_check.py IMPL[,IMPL]
Prints one JSON object: {"IMPL/tensor=T/N=n": max relative error over values and gradients}.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from alignment.kernels import token_logprobs

BLOCKS = {"xla": dict(block_vocab=128), "pallas_tpu": dict(block_rows=16, block_vocab=128),
          "pallas_gpu": dict(block_rows=16, block_vocab=32, block_d=16)}
NAMES = ("logprobs", "logsumexp", "entropy", "kl")


def inputs(n, d=16, v=256):
  ks = jax.random.split(jax.random.key(n), 8)
  h = jax.random.normal(ks[0], (n, d))
  w = jax.random.normal(ks[1], (d, v)) * 3 / np.sqrt(d)
  hr = h + 0.3 * jax.random.normal(ks[2], (n, d))
  wr = w + 0.3 * jax.random.normal(ks[3], (d, v))
  y = jax.random.randint(ks[4], (n,), 0, v)
  cts = {k: jax.random.normal(ks[5 + i % 3], (n,)) for i, k in enumerate(NAMES)}
  return h, w, y, hr, wr, cts


def step(impl):
  def loss(h, w, y, hr, wr, cts):
    out = token_logprobs(h, w, y, ref_hidden=hr, ref_unembed=wr, temperature=0.7, impl=impl,
                         block_sizes=BLOCKS[impl])
    return sum(jnp.sum(cts[k] * getattr(out, k)) for k in NAMES), out._asdict()
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def flat(result):
  (_, out), grads = result
  return [np.asarray(out[k]) for k in sorted(out) if out[k] is not None] + [np.asarray(g) for g in grads]


def main(impls):
  assert len(jax.devices()) == 8, jax.devices()
  errors = {}
  for impl in impls:
    # 37 rows do not divide the data axis and stay replicated: backend-independent, so xla only.
    for n in (48, 37) if impl == "xla" else (48,):
      args = inputs(n)
      single = flat(step(impl)(*args))
      for tp in (2, 4, 8):
        mesh = jax.make_mesh((8 // tp, 1, tp), ("data", "fsdp", "tensor"),
                             axis_types=(AxisType.Auto,) * 3)
        with jax.set_mesh(mesh):
          h, w, y, hr, wr, cts = args
          put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
          rows = P("data") if n % (8 // tp) == 0 else P()
          sharded = (put(h, rows), put(w, P(None, "tensor")), put(y, rows), put(hr, rows),
                     put(wr, P(None, "tensor")), {k: put(c, rows) for k, c in cts.items()})
          got = flat(step(impl)(*sharded))
        err = max(float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
                  for a, b in zip(got, single))
        errors[f"{impl}/tensor={tp}/N={n}"] = err
  print(json.dumps(errors))


if __name__ == "__main__":
  main(sys.argv[1].split(","))
