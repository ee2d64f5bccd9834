"""Mosaic TPU kernels (Pallas): forward statistics, dh and dW, each on a (rows x vocab) grid.

  forward  grid (row blocks, vocab blocks), vocab last ("arbitrary"): float32 VMEM scratch holds the
           running statistics of each row block; the last vocab step writes them, lane-packed, to one
           [N, 128] float32 array (lane k = statistic k), so no [N, 1] array is ever tiled in HBM.
  dh       grid (row blocks, vocab blocks), vocab last: recompute z (and r when the KL has a
           cotangent), dz, accumulate dz @ W^T in a float32 [bm, D] scratch.
  dW       grid (vocab blocks, row blocks), rows last: recompute, accumulate h^T @ dz in a float32
           [D, bv] scratch, write dW once per vocab block.
Blocks are multiples of (8, 128) (D is taken whole), shrunk until the estimated VMEM fits a budget.
Rows are padded with zeros to a multiple of the row block (zero rows give finite statistics and zero
gradients); a ragged last vocab block is masked in-kernel (W's out-of-range columns are zeroed before
they meet a matmul), so W is never padded or copied. Per-row inputs of the backward (target, max,
log-sum, cotangent coefficients) travel lane-packed in one [N, 128] float32 array too (targets as
exact floats).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from alignment.kernels import stats

LANES = 128
VMEM_BUDGET = 32 * 2**20     # what the estimate must fit
VMEM_LIMIT = 48 * 2**20      # what Mosaic is allowed (v7x has 64 MiB per core, v5e/v6e 128 MiB)

_FWD_LANES = stats.POLICY + stats.REFERENCE
_ROW_LANES = ("y", "m", "log_s", "g_lp", "a", "b", "c", "mr", "log_sr")

_CompilerParams = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
_PARALLEL = getattr(pltpu, "PARALLEL", "parallel")
_ARBITRARY = getattr(pltpu, "ARBITRARY", "arbitrary")


def _round_up(x, m):
  return -(-x // m) * m


def _vmem_bytes(bm, bv, d, dr, isz, has_ref):
  """A generous estimate of the largest of the three kernels' VMEM use."""
  ins = 2 * (bm * LANES * 4 + bm * d * isz + d * bv * isz)       # double-buffered inputs
  if has_ref:
    ins += 2 * (bm * dr * isz + dr * bv * isz)
  tmp = 8 * bm * bv * 4                                            # z, r, exp, dz, masks ...
  fwd = 2 * bm * LANES * 4 + len(_FWD_LANES) * bm * LANES * 4      # out + (bm, 1) scratch (padded)
  dh = 3 * bm * d * 4
  dw = d * bv * (4 + 2 * isz)
  return ins + tmp + max(fwd, dh, dw)


def fit_blocks(n, v, d, dr, isz, has_ref, block_rows, block_vocab):
  """Block sizes: multiples of (8, 128), no larger than needed, inside the VMEM budget."""
  bm = max(8, min(_round_up(block_rows, 8), _round_up(n, 8)))
  bv = max(LANES, min(_round_up(block_vocab, LANES), _round_up(v, LANES)))
  while _vmem_bytes(bm, bv, d, dr, isz, has_ref) > VMEM_BUDGET and (bv > LANES or bm > 8):
    if bv >= bm and bv > LANES:
      bv = max(LANES, _round_up(bv // 2, LANES))
    else:
      bm = max(8, _round_up(bm // 2, 8))
  return bm, bv


def _params(semantics):
  return _CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=VMEM_LIMIT)


def _lane(ref, k):
  """Lane k of a lane-packed (bm, 128) block, as a (bm, 1) column."""
  return ref[:, k:k + 1]


def _pack(cols, bm):
  lane = lax.broadcasted_iota(jnp.int32, (bm, LANES), 1)
  out = jnp.zeros((bm, LANES), jnp.float32)
  for k, c in enumerate(cols):
    out = jnp.where(lane == k, c, out)
  return out


def _logits(h, w, inv_temp):
  z = jnp.dot(h, w, preferred_element_type=jnp.float32)
  return z if inv_temp == 1.0 else z * inv_temp


def _columns(j, bm, bv, v):
  cols = j * bv + lax.broadcasted_iota(jnp.int32, (bm, bv), 1)
  return cols, (cols < v if v % bv else None)


def _fwd_kernel(rows_ref, h_ref, w_ref, *refs, has_ref, inv_temp, v, bv):
  if has_ref:
    hr_ref, wr_ref, out_ref, *scratch = refs
  else:
    out_ref, *scratch = refs
  names = stats.POLICY + (stats.REFERENCE if has_ref else ())
  acc = dict(zip(names, scratch))
  j = pl.program_id(1)
  bm = h_ref.shape[0]

  @pl.when(j == 0)
  def _init():
    for k, ref in acc.items():
      ref[...] = jnp.full(ref.shape, stats.NEG if k in ("m", "mr") else 0.0, jnp.float32)

  cols, fresh = _columns(j, bm, bv, v)
  hit = cols == _lane(rows_ref, 0).astype(jnp.int32)
  z = jnp.dot(h_ref[...], w_ref[...], preferred_element_type=jnp.float32)
  r = diff = None
  if has_ref:
    r = jnp.dot(hr_ref[...], wr_ref[...], preferred_element_type=jnp.float32)
    diff = z - r  # before scaling: exactly 0 when policy == reference (see stats.update)
  if inv_temp != 1.0:
    z = z * inv_temp
    if has_ref:
      r, diff = r * inv_temp, diff * inv_temp
  new = stats.update({k: ref[...] for k, ref in acc.items()}, z, r, fresh, hit, keepdims=True,
                     diff=diff)
  for k, ref in acc.items():
    ref[...] = new[k]

  @pl.when(j == pl.num_programs(1) - 1)
  def _write():
    out_ref[...] = _pack([acc[k][...] for k in names], bm)


def _grad_block(rows_ref, h, w, hr, wr, j, *, v, bv, inv_temp, use_b, use_ref, mm_dtype):
  """dz (mm_dtype [bm, bv], already scaled by 1/temperature) of one tile."""
  bm = h.shape[0]
  cols, fresh = _columns(j, bm, bv, v)
  z = _logits(h, w, inv_temp)
  r = _logits(hr, wr, inv_temp) if use_ref else None
  lane = {k: _lane(rows_ref, i) for i, k in enumerate(_ROW_LANES)}
  hit = cols == lane["y"].astype(jnp.int32)
  dz = stats.grad_logits(z, r, lane, hit, fresh, use_b, use_ref)
  if inv_temp != 1.0:
    dz = dz * inv_temp
  return dz.astype(mm_dtype)


def _zero_ragged(w, j, bv, v):
  """W block with its columns past V zeroed (their contents are undefined)."""
  if v % bv == 0:
    return w
  cols = j * bv + lax.broadcasted_iota(jnp.int32, w.shape, 1)
  return jnp.where(cols < v, w, jnp.zeros_like(w))


def _dh_kernel(rows_ref, h_ref, w_ref, *refs, use_ref, **kw):
  if use_ref:
    hr_ref, wr_ref, dh_ref, acc_ref = refs
  else:
    dh_ref, acc_ref = refs
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  w = _zero_ragged(w_ref[...], j, kw["bv"], kw["v"])
  hr, wr = (hr_ref[...], wr_ref[...]) if use_ref else (None, None)
  dz = _grad_block(rows_ref, h_ref[...], w, hr, wr, j, use_ref=use_ref, **kw)
  acc_ref[...] += lax.dot_general(dz, w, (((1,), (1,)), ((), ())),
                                  preferred_element_type=jnp.float32)

  @pl.when(j == pl.num_programs(1) - 1)
  def _write():
    dh_ref[...] = acc_ref[...]


def _dw_kernel(rows_ref, h_ref, w_ref, *refs, use_ref, **kw):
  if use_ref:
    hr_ref, wr_ref, dw_ref, acc_ref = refs
  else:
    dw_ref, acc_ref = refs
  j, i = pl.program_id(0), pl.program_id(1)

  @pl.when(i == 0)
  def _init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  h = h_ref[...]
  hr, wr = (hr_ref[...], wr_ref[...]) if use_ref else (None, None)
  dz = _grad_block(rows_ref, h, w_ref[...], hr, wr, j, use_ref=use_ref, **kw)
  acc_ref[...] += lax.dot_general(h, dz, (((0,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32)

  @pl.when(i == pl.num_programs(1) - 1)
  def _write():
    dw_ref[...] = acc_ref[...].astype(dw_ref.dtype)


def _prepare(h, w, hr, wr, block_rows, block_vocab):
  mm_dtype = jnp.result_type(h.dtype, w.dtype, *(() if hr is None else (hr.dtype, wr.dtype)))
  n, d = h.shape
  v = w.shape[1]
  dr = 0 if hr is None else hr.shape[1]
  bm, bv = fit_blocks(n, v, d, dr, jnp.dtype(mm_dtype).itemsize, hr is not None, block_rows,
                      block_vocab)
  n_pad = _round_up(n, bm)

  def rows(x):
    x = x.astype(mm_dtype)
    return x if n_pad == n else jnp.pad(x, ((0, n_pad - n), (0, 0)))

  h = rows(h)
  hr = None if hr is None else rows(hr)
  w = w.astype(mm_dtype)
  wr = None if wr is None else wr.astype(mm_dtype)
  return h, w, hr, wr, mm_dtype, bm, bv, n_pad


def _pack_rows(cols, n, n_pad):
  x = jnp.stack([c.astype(jnp.float32) for c in cols], axis=1)
  return jnp.pad(x, ((0, n_pad - n), (0, LANES - x.shape[1])))


def forward_stats(h, w, y, hr=None, wr=None, *, inv_temp, interpret=False, block_rows=256,
                  block_vocab=1024, **_):
  """Statistics (see `stats`), float32 [N] each, of rows h [N, D] against columns w [D, V]."""
  n = h.shape[0]
  v = w.shape[1]
  has_ref = hr is not None
  h, w, hr, wr, _, bm, bv, n_pad = _prepare(h, w, hr, wr, block_rows, block_vocab)
  d = h.shape[1]
  grid = (n_pad // bm, pl.cdiv(v, bv))
  row_spec = pl.BlockSpec((bm, LANES), lambda i, j: (i, 0))
  in_specs = [row_spec, pl.BlockSpec((bm, d), lambda i, j: (i, 0)),
              pl.BlockSpec((d, bv), lambda i, j: (0, j))]
  args = [_pack_rows([y], n, n_pad), h, w]
  if has_ref:
    dr = hr.shape[1]
    in_specs += [pl.BlockSpec((bm, dr), lambda i, j: (i, 0)),
                 pl.BlockSpec((dr, bv), lambda i, j: (0, j))]
    args += [hr, wr]
  names = stats.POLICY + (stats.REFERENCE if has_ref else ())
  out = pl.pallas_call(
      functools.partial(_fwd_kernel, has_ref=has_ref, inv_temp=inv_temp, v=v, bv=bv),
      out_shape=jax.ShapeDtypeStruct((n_pad, LANES), jnp.float32),
      grid=grid, in_specs=in_specs, out_specs=row_spec,
      scratch_shapes=[pltpu.VMEM((bm, 1), jnp.float32) for _ in names],
      compiler_params=_params((_PARALLEL, _ARBITRARY)),
      interpret=interpret, name="logprob_fwd_tpu")(*args)
  return {k: out[:n, i] for i, k in enumerate(names)}


def backward(h, w, y, hr, wr, rows, *, inv_temp, use_b, use_ref, interpret=False, block_rows=256,
             block_vocab=1024, **_):
  """(dh float32 [N, D], dW w.dtype [D, V]); rows: float32 [N] (stats.grad_logits)."""
  n, d = h.shape
  v = w.shape[1]
  w_dtype = w.dtype
  if not use_ref:
    hr = wr = None
  h, w, hr, wr, mm_dtype, bm, bv, n_pad = _prepare(h, w, hr, wr, block_rows, block_vocab)
  zero = jnp.zeros((n,), jnp.float32)
  packed = _pack_rows([y] + [rows.get(k, zero) for k in _ROW_LANES[1:]], n, n_pad)
  nm, nv = n_pad // bm, pl.cdiv(v, bv)
  kw = dict(v=v, bv=bv, inv_temp=inv_temp, use_b=use_b, use_ref=use_ref, mm_dtype=mm_dtype)
  args = [packed, h, w] + ([hr, wr] if use_ref else [])

  def specs(rowmap, colmap):
    s = [pl.BlockSpec((bm, LANES), rowmap), pl.BlockSpec((bm, d), rowmap),
         pl.BlockSpec((d, bv), colmap)]
    if use_ref:
      dr = hr.shape[1]
      s += [pl.BlockSpec((bm, dr), rowmap), pl.BlockSpec((dr, bv), colmap)]
    return s

  dh = pl.pallas_call(
      functools.partial(_dh_kernel, **kw),
      out_shape=jax.ShapeDtypeStruct((n_pad, d), jnp.float32),
      grid=(nm, nv), in_specs=specs(lambda i, j: (i, 0), lambda i, j: (0, j)),
      out_specs=pl.BlockSpec((bm, d), lambda i, j: (i, 0)),
      scratch_shapes=[pltpu.VMEM((bm, d), jnp.float32)],
      compiler_params=_params((_PARALLEL, _ARBITRARY)),
      interpret=interpret, name="logprob_dh_tpu")(*args)
  dw = pl.pallas_call(
      functools.partial(_dw_kernel, **kw),
      out_shape=jax.ShapeDtypeStruct((d, v), w_dtype),
      grid=(nv, nm), in_specs=specs(lambda j, i: (i, 0), lambda j, i: (0, j)),
      out_specs=pl.BlockSpec((d, bv), lambda j, i: (0, j)),
      scratch_shapes=[pltpu.VMEM((d, bv), jnp.float32)],
      compiler_params=_params((_PARALLEL, _ARBITRARY)),
      interpret=interpret, name="logprob_dw_tpu")(*args)
  return dh[:n], dw
