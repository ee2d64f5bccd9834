import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from alignment.parallel import logical_to_mesh_spec, make_mesh, shard_batch
from configs.common import SHARDING_RULES


def test_mesh_fills_the_minus_one_axis():
  mesh = make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("sizes, message", [
    ({"data": 3, "fsdp": 1, "tensor": 1}, "needs 3 devices; there are 8"),
    ({"data": -1, "fsdp": 3, "tensor": 1}, "not divisible by 3"),
    ({"data": -1, "fsdp": -1, "tensor": 1}, "at most one axis may be -1"),
    ({"data": 8, "model": 1}, "unknown axis 'model'"),
])
def test_bad_mesh_is_named(sizes, message):
  with pytest.raises(ValueError, match=message):
    make_mesh(sizes)


def test_logical_rules_drop_axes_that_do_not_divide():
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  # [layers, embed, heads, kv]: 3 KV heads do not split over tensor=2, so that dim stays whole.
  assert logical_to_mesh_spec(("layers", "embed", "heads", "kv"), (4, 64, 3, 16), mesh, SHARDING_RULES) == \
      P(None, "fsdp", None, None)
  assert logical_to_mesh_spec(("layers", "embed", "heads", "kv"), (4, 64, 4, 16), mesh, SHARDING_RULES) == \
      P(None, "fsdp", "tensor", None)
  assert logical_to_mesh_spec(("vocab", "embed"), (512, 64), mesh, SHARDING_RULES) == P("tensor", "fsdp")
  with pytest.raises(ValueError, match="no entry for logical axis 'experts'"):
    logical_to_mesh_spec(("experts",), (4,), mesh, SHARDING_RULES)


def test_global_batch_becomes_an_array_split_over_data_and_fsdp():
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rows = np.arange(8 * 5, dtype=np.int32).reshape(8, 5)
  batch = shard_batch({"inputs": rows}, mesh)["inputs"]
  np.testing.assert_array_equal(np.asarray(batch), rows)
  assert batch.sharding.spec == P(("data", "fsdp"), None)
  # each of the 4 batch shards holds 2 rows, replicated over the 2 tensor devices
  assert {s.data.shape for s in batch.addressable_shards} == {(2, 5)}
  # the rows a device holds are the ones its (data, fsdp) coordinates name, wherever it sits
  for shard in batch.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), rows[shard.index])
  with pytest.raises(ValueError, match="6 rows, not divisible by the 4"):
    shard_batch({"inputs": rows[:6]}, mesh)


def test_mesh_takes_its_devices_in_topology_order():
  devices = jax.devices()
  mesh = make_mesh({"data": 2, "fsdp": 4}, devices)
  expected = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"), devices=devices)
  assert mesh.devices.tolist() == expected.devices.tolist()
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
