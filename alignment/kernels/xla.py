"""Blockwise XLA backend: a loop over vocabulary blocks that never holds more than [N, block] logits.

Each block is `dynamic_slice(W, start)`; when V is not a multiple of the block, the last block starts
at V - block (dynamic_slice would clamp it there anyway) and masks the columns an earlier block already
covered, so W is never padded or copied.
"""

import jax.numpy as jnp
from jax import lax

from alignment.kernels import stats


def _blocks(v, block_vocab):
  bv = min(block_vocab, v)
  return bv, -(-v // bv)


def _block(j, v, bv):
  """Start column of block j, its columns [1, bv], and the mask of those it adds (None: all)."""
  if v % bv == 0:
    start = j * bv
    return start, start + lax.broadcasted_iota(jnp.int32, (1, bv), 1), None
  start = jnp.minimum(j * bv, v - bv)
  cols = start + lax.broadcasted_iota(jnp.int32, (1, bv), 1)
  return start, cols, cols >= j * bv


def _dot(h, w_block):
  return jnp.dot(h, w_block, preferred_element_type=jnp.float32)


def _logits(h, w_block, inv_temp):
  z = _dot(h, w_block)
  return z if inv_temp == 1.0 else z * inv_temp


def _scaled(h, w_block, hr, wr_block, inv_temp):
  """(z, r, z - r) of one block; the difference taken before scaling (see stats.update)."""
  z = _dot(h, w_block)
  if hr is None:
    return (z if inv_temp == 1.0 else z * inv_temp), None, None
  r = _dot(hr, wr_block)
  if inv_temp == 1.0:
    return z, r, z - r
  return z * inv_temp, r * inv_temp, (z - r) * inv_temp


def forward_stats(h, w, y, hr=None, wr=None, *, inv_temp, block_vocab=1024, **_):
  """Statistics (see `stats`) of rows h [N, D] against columns w [D, V]; y [N] int32 (local ids)."""
  v = w.shape[1]
  bv, nb = _blocks(v, block_vocab)

  def body(j, st):
    start, cols, fresh = _block(j, v, bv)
    wr_block = None if hr is None else lax.dynamic_slice_in_dim(wr, start, bv, axis=1)
    z, r, diff = _scaled(h, lax.dynamic_slice_in_dim(w, start, bv, axis=1), hr, wr_block, inv_temp)
    return stats.update(st, z, r, fresh, cols == y[:, None], diff=diff)

  return lax.fori_loop(0, nb, body, stats.init(h.shape[0], hr is not None))


def backward(h, w, y, hr, wr, rows, *, inv_temp, use_b, use_ref, block_vocab=1024, **_):
  """(dh float32 [N, D], dW w.dtype [D, V]) of the loss whose d/dz is `stats.grad_logits`.

  rows: dict of float32 [N] (see `stats.grad_logits`)."""
  n, d = h.shape
  v = w.shape[1]
  bv, nb = _blocks(v, block_vocab)
  mm_dtype = jnp.result_type(h.dtype, w.dtype)
  col = {k: x[:, None] for k, x in rows.items()}
  overlap = v % bv != 0

  def body(j, carry):
    dh, dw = carry
    start, cols, fresh = _block(j, v, bv)
    w_block = lax.dynamic_slice_in_dim(w, start, bv, axis=1)
    z = _logits(h, w_block, inv_temp)
    r = None
    if use_ref:
      r = _logits(hr, lax.dynamic_slice_in_dim(wr, start, bv, axis=1), inv_temp)
    dz = stats.grad_logits(z, r, col, cols == y[:, None], fresh, use_b, use_ref)
    if inv_temp != 1.0:
      dz = dz * inv_temp
    dz = dz.astype(mm_dtype)
    dh = dh + lax.dot_general(dz, w_block, (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.float32)
    dw_block = lax.dot_general(h, dz, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    if overlap:  # the last block re-covers columns already written; their dz is 0: add, don't overwrite
      dw_block = dw_block + lax.dynamic_slice_in_dim(dw, start, bv, axis=1).astype(jnp.float32)
    dw = lax.dynamic_update_slice_in_dim(dw, dw_block.astype(dw.dtype), start, axis=1)
    return dh, dw

  init = (jnp.zeros((n, d), jnp.float32), jnp.zeros(w.shape, w.dtype))
  return lax.fori_loop(0, nb, body, init)
