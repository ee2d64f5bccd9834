"""Logical axis names -> mesh PartitionSpecs -> NamedShardings; host-local batches -> global arrays."""

from typing import Any, Mapping, Sequence, Tuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from alignment.parallel.mesh import BATCH_AXES

Rules = Sequence[Tuple[str, Any]]  # (logical name, mesh axis | tuple of mesh axes | None)


def logical_to_mesh_spec(logical: Sequence[Any], shape: Sequence[int], mesh: Mesh, rules: Rules) -> P:
  """Maps a param's logical axis names to a PartitionSpec over `mesh`.

  A mesh axis is used at most once per array, and is dropped for a dimension it does not divide (that
  dimension is then replicated over it), so e.g. 3 KV heads stay whole on a tensor axis of 2.
  """
  table = {name: axes for name, axes in rules}
  logical = tuple(logical) + (None,) * (len(shape) - len(logical))
  used, spec = set(), []
  for name, dim in zip(logical, shape):
    if name is not None and name not in table:
      raise ValueError(f"sharding rules have no entry for logical axis {name!r}; "
                       f"known: {sorted(table)}")
    axes = table.get(name) if name is not None else None
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    kept = []
    for axis in axes:
      size = mesh.shape[axis]
      if axis in used or size == 1:
        continue
      if dim % (size * int(np.prod([mesh.shape[a] for a in kept], dtype=int))) == 0:
        kept.append(axis)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*spec)


def tree_shardings(logical_specs, abstract_tree, mesh: Mesh, rules: Rules):
  """NamedShardings for a pytree, from a same-structured pytree of logical PartitionSpecs."""
  return jax.tree.map(
      lambda spec, leaf: NamedSharding(mesh, logical_to_mesh_spec(tuple(spec), leaf.shape, mesh, rules)),
      logical_specs, abstract_tree, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dimension split over ('data', 'fsdp'); the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict:
  """A global batch, numpy [B, ...] per feature and the same on every host, -> global jax.Arrays whose
  rows are split over ('data', 'fsdp'). Each host copies only the rows its own devices hold, so the
  layout never depends on how many hosts there are or how their devices sit in the mesh."""
  batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
  out = {}
  for key, value in batch.items():
    value = np.asarray(value)
    if value.shape[0] % batch_devices:
      raise ValueError(f"batch[{key!r}] has {value.shape[0]} rows, not divisible by the "
                       f"{batch_devices} data x fsdp devices of the mesh")
    out[key] = jax.make_array_from_callback(value.shape, batch_sharding(mesh, value.ndim),
                                            lambda index, value=value: value[index])
  return out
