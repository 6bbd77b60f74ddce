"""Orbax checkpoints of the train state and the grain iterator position.

`WORKDIR/checkpoints/<step>/` holds two items: `state` (params, optimizer
state, step; sharded arrays, saved asynchronously) and `data` (the grain
iterator state, one JSON file per process). Orbax writes each checkpoint to a
temporary directory and renames it when complete, so a run killed mid-save
leaves the previous checkpoint intact and resumes from it.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging


class CheckpointMismatchError(RuntimeError):
  """The checkpoint on disk does not fit the configured model or optimizer."""


class Checkpointer:
  """Saves when told to (the train loop decides when), keeps the last `keep`.

  Args:
    directory: absolute or relative path; created if missing.
    keep: how many checkpoints stay on disk.
  """

  def __init__(self, directory: str, *, keep: int):
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        item_names=("state", "data"))

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    return self.manager.latest_step()

  def save(self, step: int, state: Any,
           data_iterator: grain.DatasetIterator) -> None:
    """Starts saving `state` and the iterator position at `step`.

    The arrays are copied to host now and written in the background; the
    iterator state is captured now.
    """
    self.manager.save(
        step, force=True,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator)))

  def restore(self, abstract_state: Any,
              data_iterator: grain.DatasetIterator) -> Any:
    """Restores the newest checkpoint into the given shapes and shardings.

    Args:
      abstract_state: a pytree of `jax.ShapeDtypeStruct` with `.sharding`, the
        structure of the freshly initialized state.
      data_iterator: moved in place to the saved position.

    Returns:
      The restored state, sharded like `abstract_state`.

    Raises:
      CheckpointMismatchError: when the saved arrays do not fit the config
        (model size or optimizer changed since the checkpoint was written).
    """
    step = self.latest_step()
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state),
              data=grain.checkpoint.CheckpointRestore(data_iterator)))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointMismatchError(
          f"checkpoint {self.directory}/{step} does not match the config "
          f"({e}). Resume with the config it was written with, or start a "
          "new run with another --workdir.") from e
    logging.info("restored checkpoint %s/%d", self.directory, step)
    return restored.state

  def close(self) -> None:
    """Waits for pending saves, then releases the manager."""
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(state_shapes: Any, shardings: Any) -> Any:
  """Attaches shardings to `jax.eval_shape` output for a sharded restore."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      state_shapes, shardings)
