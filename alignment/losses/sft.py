"""Supervised fine-tuning: negative log-likelihood of the tokens that carry loss."""

import jax.numpy as jnp


def nll_sum(logprobs, loss_mask):
  """logprobs, loss_mask [...] -> (summed NLL over masked tokens, number of masked tokens), float32.

  Returned as sums so that gradient accumulation and data parallelism normalise by the total token
  count of the whole batch, not by each micro-batch's own count.
  """
  mask = loss_mask.astype(jnp.float32)
  return -jnp.sum(logprobs.astype(jnp.float32) * mask), jnp.sum(mask)
