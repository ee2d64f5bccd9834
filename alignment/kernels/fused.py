"""The one `custom_vjp` every fused backend runs under, and its vocabulary-parallel placement.

A backend module provides two local functions over the rows and vocabulary columns it is given:
  forward_stats(h, w, y, hr, wr, *, inv_temp, interpret, **blocks) -> statistics (`stats`), [N] each
  backward(h, w, y, hr, wr, rows, *, inv_temp, use_b, use_ref, interpret, **blocks) -> (dh f32, dW)
This module merges, finalises, differentiates and, on a mesh, runs them under `jax.shard_map`: rows
over the mesh axes other than the vocabulary axis, vocabulary columns over that axis, statistics merged
with pmax/psum, dh psum-ed over the vocabulary axis and dW over the row axes.
"""

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.sharding import PartitionSpec as P

from alignment.kernels import stats


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything static about one call."""
  backend: str                     # 'xla' | 'pallas_tpu' | 'pallas_gpu'
  inv_temp: float
  has_ref: bool
  blocks: tuple                    # sorted (name, value) pairs passed to the backend
  interpret: bool = False
  mesh: Optional[object] = None    # AbstractMesh when run under shard_map, else None
  vocab_axis: Optional[str] = None  # mesh axis the vocabulary is split over, or None
  row_axes: tuple = ()             # mesh axes the rows are split over


def _backend(name):
  if name == "xla":
    from alignment.kernels import xla as mod
  elif name == "pallas_tpu":
    from alignment.kernels import pallas_tpu as mod
  elif name == "pallas_gpu":
    from alignment.kernels import pallas_gpu as mod
  else:
    raise ValueError(f"unknown fused backend {name!r}")
  return mod


def _row_spec(plan, *tail):
  return P(plan.row_axes or None, *tail)


def _shard(plan, fn, in_specs, out_specs):
  if plan.mesh is None:
    return fn
  return jax.shard_map(fn, mesh=plan.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _local_targets(plan, y, v_local):
  if plan.vocab_axis is None:
    return y
  return y - lax.axis_index(plan.vocab_axis) * v_local


def _forward(plan, h, w, y, ref):
  mod = _backend(plan.backend)
  kw = dict(plan.blocks, inv_temp=plan.inv_temp, interpret=plan.interpret)
  names = ["logprobs", "logsumexp", "entropy", "m", "log_s"]
  if plan.has_ref:
    names += ["ref_logprobs", "kl", "kl_raw", "mr", "log_sr"]

  def local(h, w, y, *ref):
    st = mod.forward_stats(h, w, _local_targets(plan, y, w.shape[1]), *ref, **kw)
    if plan.vocab_axis is not None:
      st = stats.merge_across(st, plan.vocab_axis)
    out = stats.finalize(st)
    return tuple(out[k] for k in names)

  rows, cols = _row_spec(plan, None), P(None, plan.vocab_axis)
  in_specs = (rows, cols, _row_spec(plan)) + ((rows, cols) if plan.has_ref else ())
  out = _shard(plan, local, in_specs, (_row_spec(plan),) * len(names))(h, w, y, *ref)
  return dict(zip(names, out))


def _backward(plan, h, w, y, ref, rows, use_b, use_ref):
  mod = _backend(plan.backend)
  kw = dict(plan.blocks, inv_temp=plan.inv_temp, interpret=plan.interpret)
  keys = tuple(sorted(rows))

  n_ref = 2 if use_ref else 0

  def local(h, w, y, *rest):
    hr, wr = rest[:n_ref] if use_ref else (None, None)
    dh, dw = mod.backward(h, w, _local_targets(plan, y, w.shape[1]), hr, wr,
                          dict(zip(keys, rest[n_ref:])), use_b=use_b, use_ref=use_ref, **kw)
    if plan.vocab_axis is not None:
      dh = lax.psum(dh, plan.vocab_axis)
    if plan.row_axes:
      dw = lax.psum(dw, plan.row_axes)
    return dh, dw

  rspec, cspec = _row_spec(plan, None), P(None, plan.vocab_axis)
  in_specs = (rspec, cspec, _row_spec(plan)) + (rspec, cspec)[:n_ref] + (_row_spec(plan),) * len(keys)
  fn = _shard(plan, local, in_specs, (rspec, cspec))
  return fn(h, w, y, *tuple(ref)[:n_ref], *(rows[k] for k in keys))


def _zero(ct):
  return ct is None or isinstance(ct, SymbolicZero)


@functools.lru_cache(maxsize=None)
def _fused(plan):
  """A custom_vjp function (h, w, y, *ref) -> outputs tuple, for this plan."""
  n_out = 5 if plan.has_ref else 3

  def outputs(vals):
    names = ["logprobs", "logsumexp", "entropy"] + (["ref_logprobs", "kl"] if plan.has_ref else [])
    return tuple(vals[k] for k in names)

  @jax.custom_vjp
  def fused(h, w, y, *ref):
    return outputs(_forward(plan, h, w, y, ref))

  def fwd(h, w, y, *ref):
    h, w, y = h.value, w.value, y.value
    ref = tuple(x.value for x in ref)
    vals = _forward(plan, h, w, y, ref)
    keep = ("m", "log_s", "entropy") + (("mr", "log_sr", "kl_raw") if plan.has_ref else ())
    res = (h, w, y, ref, {k: vals[k] for k in keep})
    return outputs(vals), res

  def bwd(res, cts):
    h, w, y, ref, saved = res
    cts = [None if _zero(c) else c for c in cts] + [None] * (5 - n_out)
    g_lp, g_lse, g_ent, g_kl = cts[0], cts[1], cts[2], cts[4]  # ref_logprobs (3) gets no gradient
    nothing = (None,) * (3 + len(ref))
    if all(g is None for g in (g_lp, g_lse, g_ent, g_kl)):
      return nothing
    use_ref = g_kl is not None
    use_b = use_ref or g_ent is not None
    g_lp, a, b, c = stats.coefficients(g_lp, g_lse, g_ent, g_kl, saved["entropy"],
                                       saved.get("kl_raw"))
    rows = dict(m=saved["m"], log_s=saved["log_s"], g_lp=g_lp, a=a)
    if use_b:
      rows["b"] = b
    if use_ref:
      rows.update(c=c, mr=saved["mr"], log_sr=saved["log_sr"])
    dh, dw = _backward(plan, h, w, y, ref, rows, use_b, use_ref)
    return (dh.astype(h.dtype), dw.astype(w.dtype), None) + (None,) * len(ref)

  fused.defvjp(fwd, bwd, symbolic_zeros=True)
  return fused


def _axis_is_explicit(mesh, name):
  try:
    return mesh._name_to_type[name] == jax.sharding.AxisType.Explicit
  except Exception:  # pylint: disable=broad-except
    return False


def _vocab_sharded(unembed, mesh, axis):
  """Whether unembed's vocabulary dim is (or, for Auto axes, is taken to be) split over `axis`."""
  if not _axis_is_explicit(mesh, axis):
    return True  # Auto axes carry no layout at trace time; the 'vocab' -> 'tensor' rule is assumed
  try:
    spec = jax.typeof(unembed).sharding.spec
  except Exception:  # pylint: disable=broad-except
    return False
  entry = spec[1] if len(spec) > 1 else None
  names = entry if isinstance(entry, tuple) else (entry,)
  return axis in names


def make_plan(backend, hidden, unembed, *, temperature, has_ref, blocks, interpret, vocab_axis):
  """Reads the ambient mesh (`jax.set_mesh`) and decides the placement of one call."""
  mesh = jax.sharding.get_abstract_mesh()
  plan = dict(backend=backend, inv_temp=1.0 / float(temperature), has_ref=has_ref,
              blocks=tuple(sorted(blocks.items())), interpret=bool(interpret))
  if mesh.empty or mesh.size <= 1 or mesh.manual_axes:
    # No mesh, one device, or already inside a shard_map: run on the local arrays as given.
    return Plan(**plan)
  n, v = hidden.shape[0], unembed.shape[1]
  vaxis = None
  if (vocab_axis is not None and vocab_axis in mesh.axis_names and mesh.shape[vocab_axis] > 1
      and v % mesh.shape[vocab_axis] == 0 and _vocab_sharded(unembed, mesh, vocab_axis)):
    vaxis = vocab_axis
  row_axes = tuple(a for a in mesh.axis_names if a != vocab_axis and mesh.shape[a] > 1)
  if n % math.prod(mesh.shape[a] for a in row_axes) != 0:
    row_axes = ()  # rows that do not divide stay replicated (each device computes all of them)
  return Plan(**plan, mesh=mesh, vocab_axis=vaxis, row_axes=row_axes)


def token_logprobs_fused(plan, hidden, unembed, targets, ref_hidden=None, ref_unembed=None):
  """Returns a dict of float32 [N] outputs; see `alignment.kernels.token_logprobs`."""
  ref = () if ref_hidden is None else (lax.stop_gradient(ref_hidden), lax.stop_gradient(ref_unembed))
  out = _fused(plan)(hidden, unembed, targets.astype(jnp.int32), *ref)
  names = ["logprobs", "logsumexp", "entropy"] + (["ref_logprobs", "kl"] if ref else [])
  return dict(zip(names, out))
