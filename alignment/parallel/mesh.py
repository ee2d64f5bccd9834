"""The one device mesh, axes ('data', 'fsdp', 'tensor'), with GSPMD (Auto) axis types."""

import math
import os
from typing import Mapping, Optional, Sequence

import jax
from jax.sharding import AxisType, Mesh

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # a batch is split over every axis that does not shard the model's width


def mesh_shape(sizes: Mapping[str, int], n_devices: int, what: str = "there are") -> tuple:
  """The sizes of MESH_AXES from {'data': d, 'fsdp': f, 'tensor': t} over `n_devices`; at most one size may
  be -1 (the rest)."""
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"config.mesh: unknown axis {unknown[0]!r}; the axes are {MESH_AXES}")
  shape = [int(sizes.get(axis, 1)) for axis in MESH_AXES]
  if shape.count(-1) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, shape))}")
  for axis, size in zip(MESH_AXES, shape):
    if size == 0 or size < -1:
      raise ValueError(f"config.mesh.{axis}={size}: sizes are positive or -1 (the rest)")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if n_devices % known:
      raise ValueError(f"config.mesh {dict(zip(MESH_AXES, shape))}: {n_devices} devices are not "
                       f"divisible by {known}")
    shape[shape.index(-1)] = n_devices // known
  if math.prod(shape) != n_devices:
    raise ValueError(f"config.mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices; "
                     f"{what} {n_devices}")
  return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Builds the mesh from {'data': d, 'fsdp': f, 'tensor': t}; at most one size may be -1 (the rest)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(sizes, len(devices))
  # jax.make_mesh orders the devices by the physical topology (TPU ICI rings, hosts), not by id.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def initialize_distributed() -> None:
  """Joins a multi-host job, or does nothing on a single host.

  Explicit: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. Detected: with
  ALIGNMENT_DISTRIBUTED=1 (set by launch/tpu_pod.sh and launch/gpu_slurm.sh) jax finds the cluster
  itself (Cloud TPU pod metadata, SLURM variables).
  """
  if "JAX_COORDINATOR_ADDRESS" in os.environ:
    jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif os.environ.get("ALIGNMENT_DISTRIBUTED") == "1":
    jax.distributed.initialize()
