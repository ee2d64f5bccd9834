"""GPU kernels (Pallas, Triton backend): forward statistics, dh and dW.

Triton has no sequential grid axis with scratch, so each program loops itself:
  forward  grid (row blocks, vocab splits); a program sweeps its split's vocab blocks with the online
           statistics in registers and writes them per split; splits are merged in XLA (tiny:
           [splits, N]). Splits give the GPU enough programs when N is small.
  dh       grid (row blocks, vocab splits); sweep vocab blocks: recompute z (and r when the KL has a
           cotangent), dz, dh += dz @ W^T with float32 accumulators; per-split partial dh are summed.
  dW       grid (vocab blocks,); sweep row blocks: recompute, dW += h^T @ dz; one write per block.
The contraction dim D is cut into equal power-of-two chunks (Triton tensors are powers of two), so
D = 576 is 9 x 64, not a padded 1024: the logits loop over them (the innermost loop, which Triton
pipelines), the dh / dW accumulators are one float32 tile per chunk (unrolled). Rows are
zero-padded to the row block; a ragged last vocab block is a masked load (W's missing columns read
as 0) and a masked store.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from alignment.kernels import stats

TARGET_PROGRAMS = 264  # about two per multiprocessor on an H100 (132)


def _round_up(x, m):
  return -(-x // m) * m


def _pow2_floor(x):
  return 1 << (x.bit_length() - 1)


def chunks(d, block_d):
  """(offset, size) pieces of [0, d), all of one size: the largest power of two <= block_d that
  divides d (d % 16 == 0, so at least 16)."""
  size = _pow2_floor(block_d)
  while d % size:
    size //= 2
  return tuple((off, size) for off in range(0, d, size))


def _params(num_warps, num_stages):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _load_cols(ref, row0, nrows, col0, ncols, fresh):
  """ref[row0:row0+nrows, col0:col0+ncols], columns outside `fresh` read as 0 (None: all inside)."""
  idx = (pl.ds(row0, nrows), pl.ds(col0, ncols))
  if fresh is None:
    return ref[idx]
  return plgpu.load(ref.at[idx], mask=jnp.broadcast_to(fresh[None, :], (nrows, ncols)), other=0)


def _dot(h_ref, w_ref, row0, bm, col0, bv, fresh, pieces):
  """h[rows] @ W[:, cols] as a loop over the contraction chunks: Triton software-pipelines this
  innermost loop (num_stages), one [bm, chunk] and one [chunk, bv] tile per stage."""
  size = pieces[0][1]

  def body(k, z):
    off = pl.multiple_of(k * size, size)
    hk = h_ref[pl.ds(row0, bm), pl.ds(off, size)]
    wk = _load_cols(w_ref, off, size, col0, bv, fresh)
    return z + jnp.dot(hk, wk, preferred_element_type=jnp.float32)

  return lax.fori_loop(0, len(pieces), body, jnp.zeros((bm, bv), jnp.float32))


def _logits(h_ref, w_ref, row0, bm, col0, bv, fresh, pieces, inv_temp):
  z = _dot(h_ref, w_ref, row0, bm, col0, bv, fresh, pieces)
  return z if inv_temp == 1.0 else z * inv_temp


def _columns(j, bv, v):
  cols = j * bv + jnp.arange(bv, dtype=jnp.int32)
  return cols, (cols < v if v % bv else None)


def _fwd_kernel(y_ref, h_ref, w_ref, *refs, has_ref, inv_temp, v, bm, bv, per, nv, pieces,
                ref_pieces):
  if has_ref:
    hr_ref, wr_ref, out_ref = refs
  else:
    (out_ref,) = refs
  i, s = pl.program_id(0), pl.program_id(1)
  row0 = i * bm
  y = y_ref[pl.ds(row0, bm)]

  def body(j, st):
    cols, fresh = _columns(j, bv, v)
    z = _dot(h_ref, w_ref, row0, bm, j * bv, bv, fresh, pieces)
    r = diff = None
    if has_ref:
      r = _dot(hr_ref, wr_ref, row0, bm, j * bv, bv, fresh, ref_pieces)
      diff = z - r  # before scaling: exactly 0 when policy == reference (see stats.update)
    if inv_temp != 1.0:
      z = z * inv_temp
      r, diff = (None, None) if r is None else (r * inv_temp, diff * inv_temp)
    return stats.update(st, z, r, None if fresh is None else fresh[None, :],
                        cols[None, :] == y[:, None], diff=diff)

  lo = s * per
  st = lax.fori_loop(lo, jnp.minimum(lo + per, nv), body, stats.init(bm, has_ref))
  names = stats.POLICY + (stats.REFERENCE if has_ref else ())
  for k, name in enumerate(names):
    out_ref[k, s, pl.ds(row0, bm)] = st[name]


def _dz(j, row0, bm, bv, v, y, row, h_ref, w_ref, hr_ref, wr_ref, *, inv_temp, use_b, use_ref,
        pieces, ref_pieces, mm_dtype):
  cols, fresh = _columns(j, bv, v)
  z = _logits(h_ref, w_ref, row0, bm, j * bv, bv, fresh, pieces, inv_temp)
  r = _logits(hr_ref, wr_ref, row0, bm, j * bv, bv, fresh, ref_pieces, inv_temp) if use_ref else None
  dz = stats.grad_logits(z, r, row, cols[None, :] == y[:, None],
                         None if fresh is None else fresh[None, :], use_b, use_ref)
  if inv_temp != 1.0:
    dz = dz * inv_temp
  return dz.astype(mm_dtype), fresh


def _unpack(refs, keys, use_ref):
  n = len(keys)
  row_refs = dict(zip(keys, refs[:n]))
  h_ref, w_ref = refs[n:n + 2]
  rest = refs[n + 2:]
  hr_ref, wr_ref = (rest[0], rest[1]) if use_ref else (None, None)
  return row_refs, h_ref, w_ref, hr_ref, wr_ref, rest[-1]


def _dh_kernel(y_ref, *refs, keys, bm, bv, v, per, nv, **kw):
  row_refs, h_ref, w_ref, hr_ref, wr_ref, dh_ref = _unpack(refs, keys, kw["use_ref"])
  i, s = pl.program_id(0), pl.program_id(1)
  row0 = i * bm
  y = y_ref[pl.ds(row0, bm)]
  row = {k: ref[pl.ds(row0, bm)][:, None] for k, ref in row_refs.items()}

  def body(j, accs):
    dz, fresh = _dz(j, row0, bm, bv, v, y, row, h_ref, w_ref, hr_ref, wr_ref, **kw)
    out = []
    for (off, size), acc in zip(kw["pieces"], accs):
      wk = _load_cols(w_ref, off, size, j * bv, bv, fresh)
      out.append(acc + lax.dot_general(dz, wk, (((1,), (1,)), ((), ())),
                                       preferred_element_type=jnp.float32))
    return tuple(out)

  lo = s * per
  accs = tuple(jnp.zeros((bm, size), jnp.float32) for _, size in kw["pieces"])
  accs = lax.fori_loop(lo, jnp.minimum(lo + per, nv), body, accs)
  for (off, size), acc in zip(kw["pieces"], accs):
    dh_ref[s, pl.ds(row0, bm), pl.ds(off, size)] = acc


def _dw_kernel(y_ref, *refs, keys, bm, bv, v, nm, **kw):
  row_refs, h_ref, w_ref, hr_ref, wr_ref, dw_ref = _unpack(refs, keys, kw["use_ref"])
  j = pl.program_id(0)
  _, fresh = _columns(j, bv, v)

  def body(i, accs):
    row0 = i * bm
    y = y_ref[pl.ds(row0, bm)]
    row = {k: ref[pl.ds(row0, bm)][:, None] for k, ref in row_refs.items()}
    dz, _ = _dz(j, row0, bm, bv, v, y, row, h_ref, w_ref, hr_ref, wr_ref, **kw)
    out = []
    for (off, size), acc in zip(kw["pieces"], accs):
      hk = h_ref[pl.ds(row0, bm), pl.ds(off, size)]
      out.append(acc + lax.dot_general(hk, dz, (((0,), (0,)), ((), ())),
                                       preferred_element_type=jnp.float32))
    return tuple(out)

  accs = tuple(jnp.zeros((size, bv), jnp.float32) for _, size in kw["pieces"])
  accs = lax.fori_loop(0, nm, body, accs)
  for (off, size), acc in zip(kw["pieces"], accs):
    idx = (pl.ds(off, size), pl.ds(j * bv, bv))
    val = acc.astype(dw_ref.dtype)
    if fresh is None:
      dw_ref[idx] = val
    else:
      plgpu.store(dw_ref.at[idx], val, mask=jnp.broadcast_to(fresh[None, :], (size, bv)))


def _prepare(h, w, hr, wr, bm):
  """Cast to one matmul dtype, zero-pad rows to a multiple of bm and D to a multiple of 16."""
  mm_dtype = jnp.result_type(h.dtype, w.dtype, *(() if hr is None else (hr.dtype, wr.dtype)))
  n = h.shape[0]
  n_pad = _round_up(n, bm)

  def pad(hh, ww):
    d = hh.shape[1]
    dp = _round_up(d, 16)
    hh = hh.astype(mm_dtype)
    ww = ww.astype(mm_dtype)
    if n_pad != n or dp != d:
      hh = jnp.pad(hh, ((0, n_pad - n), (0, dp - d)))
    if dp != d:  # only for D not a multiple of 16: a copy of W
      ww = jnp.pad(ww, ((0, dp - d), (0, 0)))
    return hh, ww

  h, w = pad(h, w)
  if hr is not None:
    hr, wr = pad(hr, wr)
  return h, w, hr, wr, mm_dtype, n_pad


def _splits(requested, nm, nv):
  if requested:
    return max(1, min(requested, nv))
  return max(1, min(nv, -(-TARGET_PROGRAMS // nm)))


def _next_pow2(x):
  return 1 << max(4, (x - 1).bit_length())


def _sizes(n, v, block_rows, block_vocab):
  """Powers of two >= 16 (Triton's dot minimum), no larger than the data needs."""
  return (max(16, min(_pow2_floor(block_rows), _next_pow2(n))),
          max(16, min(_pow2_floor(block_vocab), _next_pow2(v))))


def forward_stats(h, w, y, hr=None, wr=None, *, inv_temp, interpret=False, block_rows=64,
                  block_vocab=128, block_d=64, num_warps=4, num_stages=3, splits=0, **_):
  """Statistics (see `stats`), float32 [N] each, of rows h [N, D] against columns w [D, V]."""
  n = h.shape[0]
  v = w.shape[1]
  has_ref = hr is not None
  bm, bv = _sizes(n, v, block_rows, block_vocab)
  h, w, hr, wr, _, n_pad = _prepare(h, w, hr, wr, bm)
  nm, nv = n_pad // bm, pl.cdiv(v, bv)
  ns = _splits(splits, nm, nv)
  per = pl.cdiv(nv, ns)
  ns = pl.cdiv(nv, per)
  names = stats.POLICY + (stats.REFERENCE if has_ref else ())
  y = jnp.pad(y, (0, n_pad - n))
  args = [y, h, w] + ([hr, wr] if has_ref else [])
  kernel = functools.partial(
      _fwd_kernel, has_ref=has_ref, inv_temp=inv_temp, v=v, bm=bm, bv=bv, per=per, nv=nv,
      pieces=chunks(h.shape[1], block_d), ref_pieces=chunks(hr.shape[1], block_d) if has_ref else ())
  out = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((len(names), ns, n_pad), jnp.float32), grid=(nm, ns),
      compiler_params=_params(num_warps, num_stages), interpret=interpret,
      name="logprob_fwd_gpu")(*args)
  st = stats.merge_stacked({k: out[i] for i, k in enumerate(names)})
  return {k: x[:n] for k, x in st.items()}


def backward(h, w, y, hr, wr, rows, *, inv_temp, use_b, use_ref, interpret=False, block_rows=64,
             block_vocab=128, block_d=64, num_warps=4, num_stages=3, splits=0, dh_rows=0,
             dh_vocab=0, dh_warps=0, dh_stages=0, dw_rows=0, dw_vocab=0, dw_warps=0, dw_stages=0,
             **_):
  """(dh float32 [N, D], dW w.dtype [D, V]); rows: float32 [N] (stats.grad_logits).

  dh_* / dw_* set the dh and dW kernels' tiles, warps and stages (0: the forward's)."""
  n, d = h.shape
  v = w.shape[1]
  w_dtype = w.dtype
  if not use_ref:
    hr = wr = None
  bm, bv = _sizes(n, v, dh_rows or block_rows, dh_vocab or block_vocab)
  bm_w, bv_w = _sizes(n, v, dw_rows or block_rows, dw_vocab or block_vocab)
  h, w, hr, wr, mm_dtype, n_pad = _prepare(h, w, hr, wr, max(bm, bm_w))  # powers of two
  keys = tuple(sorted(rows))
  row_vals = [jnp.pad(rows[k].astype(jnp.float32), (0, n_pad - n)) for k in keys]
  args = [jnp.pad(y, (0, n_pad - n))] + row_vals + [h, w] + ([hr, wr] if use_ref else [])
  kw = dict(keys=keys, v=v, inv_temp=inv_temp, use_b=use_b, use_ref=use_ref, mm_dtype=mm_dtype,
            pieces=chunks(h.shape[1], block_d),
            ref_pieces=chunks(hr.shape[1], block_d) if use_ref else ())

  nm, nv = n_pad // bm, pl.cdiv(v, bv)
  ns = _splits(splits, nm, nv)
  per = pl.cdiv(nv, ns)
  ns = pl.cdiv(nv, per)
  dh = pl.pallas_call(
      functools.partial(_dh_kernel, bm=bm, bv=bv, per=per, nv=nv, **kw),
      out_shape=jax.ShapeDtypeStruct((ns, n_pad, h.shape[1]), jnp.float32), grid=(nm, ns),
      compiler_params=_params(dh_warps or num_warps, dh_stages or num_stages),
      interpret=interpret, name="logprob_dh_gpu")(*args)
  dh = jnp.sum(dh, axis=0)[:n, :d] if ns > 1 else dh[0, :n, :d]

  dw = pl.pallas_call(
      functools.partial(_dw_kernel, bm=bm_w, bv=bv_w, nm=n_pad // bm_w, **kw),
      out_shape=jax.ShapeDtypeStruct(w.shape, w_dtype), grid=(pl.cdiv(v, bv_w),),
      compiler_params=_params(dw_warps or num_warps, dw_stages or num_stages),
      interpret=interpret, name="logprob_dw_gpu")(*args)
  return dh, (dw if dw.shape[0] == d else dw[:d])
