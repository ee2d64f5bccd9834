"""The plain reference: materialises the [N, V] logits. Correct, simple, memory-hungry."""

import jax
import jax.numpy as jnp


def _stats(hidden, unembed, targets, temperature):
  logits = jnp.dot(hidden, unembed, preferred_element_type=jnp.float32) / temperature
  logz = jax.nn.logsumexp(logits, axis=-1)
  logp_all = logits - logz[:, None]
  # Targets outside [0, V) (padding ids) read a logit of 0, as in the fused backends.
  inside = (targets >= 0) & (targets < logits.shape[-1])
  target_logit = jnp.take_along_axis(logits, jnp.where(inside, targets, 0)[:, None], axis=-1)[:, 0]
  target_logit = jnp.where(inside, target_logit, 0.0)
  return logp_all, target_logit - logz, logz


def token_logprobs_naive(hidden, unembed, targets, ref_hidden=None, ref_unembed=None, temperature=1.0):
  """Returns a dict of float32 [N] arrays; see `alignment.kernels.token_logprobs`."""
  logp_all, logprobs, logz = _stats(hidden, unembed, targets, temperature)
  probs = jnp.exp(logp_all)
  out = dict(logprobs=logprobs, logsumexp=logz, entropy=-jnp.sum(probs * logp_all, axis=-1))
  if ref_hidden is not None:
    ref_logp_all, ref_logprobs, _ = _stats(ref_hidden, ref_unembed, targets, temperature)
    ref_logp_all = jax.lax.stop_gradient(ref_logp_all)
    out["ref_logprobs"] = jax.lax.stop_gradient(ref_logprobs)
    out["kl"] = jnp.sum(probs * (logp_all - ref_logp_all), axis=-1)
  return out
