"""Per-token values -> per-sequence sums for rows that pack several sequences (segment ids 1..S)."""

import jax
import jax.numpy as jnp


def segment_sums(values, segment_ids, num_segments: int):
  """values [R, T], segment_ids [R, T] int (0 = padding) -> float32 [R, num_segments]; column s-1 sums
  segment s. A one-hot contraction rather than a scatter, so it shards over rows and differentiates."""
  one_hot = jax.nn.one_hot(segment_ids - 1, num_segments, dtype=jnp.float32)  # segment 0 -> all zeros
  return jnp.einsum("rt,rts->rs", values.astype(jnp.float32), one_hot)


def pair_sums(values, segment_ids, pairs_per_row: int):
  """Sums of a packed preference batch's values: (chosen [R, P], rejected [R, P]); pair p of a row
  is segment 2p+1 (chosen) and 2p+2 (rejected)."""
  sums = segment_sums(values, segment_ids, 2 * pairs_per_row)
  return sums[:, 0::2], sums[:, 1::2]
