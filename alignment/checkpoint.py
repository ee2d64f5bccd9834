"""Orbax checkpoints of the train state plus JSON metadata (data position, summary), local or behind a
URI (orbax takes `etils.epath` paths)."""

import logging
from typing import Optional

import jax
import orbax.checkpoint as ocp

from alignment import workdir as workdir_lib


class Checkpointer:
  """Saves {state, meta} every call to `save`; restores onto any mesh from an abstract state."""

  def __init__(self, directory, max_to_keep: int = 3, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(workdir_lib.resolve(directory), options=options)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                    meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, abstract_state):
    """`abstract_state`: ShapeDtypeStructs carrying the target shardings. Returns (state, meta)."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def saved_keys(self, step: int) -> list:
    """The top-level keys of the state saved at `step` (its parts and bookkeeping), from its metadata."""
    return sorted(_state_tree(workdir_lib.resolve(self.manager.directory) / str(step) / "state"))

  def reached_preemption(self, step: int) -> bool:
    """Multi-host: True at the step every host stops at after any of them got SIGTERM (JAX's
    preemption service, started by `jax.distributed.initialize`, agrees on it)."""
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    """Blocks until an async save in flight is on disk."""
    if self.manager is not None:
      self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for an async save in flight; safe to call more than once."""
    if self.manager is not None:
      self.manager.wait_until_finished()
      self.manager.close()
      self.manager = None


def latest_step(directory) -> Optional[int]:
  """The latest finished checkpoint's step in `directory`, or None (a directory that is not there is not
  created)."""
  directory = workdir_lib.resolve(directory)
  if not directory.exists():
    return None
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
  try:
    return manager.latest_step()
  finally:
    manager.close()


def restore_entry(directory, key: str, *, step: Optional[int] = None, sharding=None):
  """One top-level entry of a saved train state (e.g. its 'policy'), read alone: the optimizer state and
  any other part stay on disk. Shapes and dtypes come from the checkpoint's own metadata; leaves are
  placed with `sharding`: one `jax.sharding.Sharding` for every leaf, or a tree of them shaped like the
  entry (e.g. `state.param_shardings(...)`); by default the first local device.

  Returns (entry, step). Raises FileNotFoundError when `directory` holds no checkpoint and KeyError
  when the state has no `key`.
  """
  directory = workdir_lib.resolve(directory)
  step = latest_step(directory) if step is None else step
  if step is None:
    raise FileNotFoundError(f"{directory}: no checkpoint")
  path = directory / str(step) / "state"
  tree = _state_tree(path)
  if key not in tree:
    raise KeyError(f"{path}: the saved state has no {key!r} (it has {sorted(tree)})")
  sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if isinstance(sharding, jax.sharding.Sharding):
    sharding = jax.tree.map(lambda _: sharding, tree[key])
  abstract = {key: jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), tree[key], sharding)}
  restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract)
  restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      item=abstract, restore_args=restore_args, partial_restore=True))
  return restored[key], step


def _state_tree(path) -> dict:
  """The saved state's tree of array metadata (shapes, dtypes), read from its own files. Orbax warns that
  the step's metadata is not in this sub-folder (it is one level up, for the whole step): kept quiet."""
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    return dict(ocp.StandardCheckpointer().metadata(path).item_metadata)
  finally:
    absl_logger.setLevel(level)


def restore_meta(directory, step: int) -> dict:
  """The JSON metadata saved beside the train state at `step` (data position, summary)."""
  manager = ocp.CheckpointManager(workdir_lib.resolve(directory))
  try:
    return dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
  finally:
    manager.close()
