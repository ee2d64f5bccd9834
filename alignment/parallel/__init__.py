"""Mesh, logical-axis rules and shardings for params, optimizer state and batches."""

from alignment.parallel.mesh import MESH_AXES, BATCH_AXES, initialize_distributed, make_mesh
from alignment.parallel.sharding import (batch_sharding, shard_batch, logical_to_mesh_spec,
                                         replicated, tree_shardings)
