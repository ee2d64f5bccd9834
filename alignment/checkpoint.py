"""Orbax checkpoints of the train state plus JSON metadata (data position, config)."""

import os
from typing import Optional

import orbax.checkpoint as ocp


class Checkpointer:
  """Saves {state, meta} every call to `save`; restores onto any mesh from an abstract state."""

  def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

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

  def close(self) -> None:
    """Waits for an async save in flight; safe to call more than once."""
    if self.manager is not None:
      self.manager.wait_until_finished()
      self.manager.close()
      self.manager = None
