"""Orbax checkpoints of the train state, the grain iterator and run facts.

`WORKDIR/checkpoints/<step>/` holds three items: `state` (params, optimizer
state, step; sharded arrays, saved asynchronously), `data` (the grain iterator
state, one JSON file per process) and `run` (JSON facts of the run at that
step that the arrays do not hold: `tokens_seen`, the divergence guard's loss
minimum, and `eval_loss` when the step was evaluated). Orbax writes each
checkpoint to a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint intact; leftover temporary
directories are removed at the next start.

What this layer adds to orbax, each guarding a way a long run loses work:
- a save that fails in the background (permissions, a full disk) raises
  `CheckpointSaveError` in the main thread at the next `check()` (every
  step), naming the path and the cause; orbax alone logs it and then blocks
  the next save forever;
- retention keeps the newest `keep` checkpoints plus the one with the lowest
  eval loss, so a diverging run can never rotate out every good state;
- `restore` refuses a checkpoint of another shape with one line per differing
  array (`CheckpointMismatchError`), and moves a damaged newest checkpoint
  (missing or truncated files) aside to `WORKDIR/damaged_checkpoints/` with a
  WARNING, then restores the previous one;
- small replicated arrays are copied from one replica (`_small_arrays_from_
  one_replica`), not sliced across all of them.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from bitnet_jax.distributed.multihost import any_process
from bitnet_jax.model.tree_paths import is_stacked, path_name
from bitnet_jax.runs.directory import (
    DAMAGED_CHECKPOINTS,
    damaged_checkpoint_dir,
)
from bitnet_jax.storage import deadline, paths

DAMAGED_DIR = DAMAGED_CHECKPOINTS  # its older name, read by a GCS test
MAX_MISMATCH_LINES = 40  # differing arrays listed before "... and N more"
# Orbax saves a replicated array replica-parallel: one slice per replica, each
# an eager slice op that its device copies to the host. Below this many bytes
# per slice (norm scales, and every array of a small model) the dispatches
# cost more than the parallel copy saves, and one replica copies the array
# whole. Measured (experiments/checkpoint_save.py, configs/tiny.py on 8 CPU
# devices): first save 5.5 s -> 0.3 s, later saves 0.58 s -> 0.38 s
# (experiments/RESULTS.md, "Test suite time, third pass").
REPLICA_PARALLEL_MIN_SLICE_BYTES = 1 << 20


def register_array_handler(min_slice_bytes: int | None) -> None:
  """Registers orbax's jax.Array handler, process-wide, with its defaults
  but `min_slice_bytes_for_replica_parallel=min_slice_bytes` (None: orbax's
  own default, every replicated array replica-parallel). What is written is
  the same either way: the same arrays, read back by any orbax."""
  try:  # the array metadata store orbax's default handler is built with
    from orbax.checkpoint._src.metadata import array_metadata_store  # pylint: disable=g-import-not-at-top
  except ImportError:  # another orbax layout: keep its default handler
    return
  ocp.type_handlers.register_type_handler(
      jax.Array, ocp.type_handlers.ArrayHandler(
          array_metadata_store=array_metadata_store.Store(),
          min_slice_bytes_for_replica_parallel=min_slice_bytes),
      override=True)


@functools.cache
def _small_arrays_from_one_replica() -> None:
  """`register_array_handler(REPLICA_PARALLEL_MIN_SLICE_BYTES)`, once per
  process (at the first Checkpointer)."""
  register_array_handler(REPLICA_PARALLEL_MIN_SLICE_BYTES)


def _first_line(problem: str, limit: int = 300) -> str:
  """An orbax error's first line, without TensorStore's spec dump (the
  spec is orbax's, not the user's to act on), cut to `limit` characters."""
  for dump in ("See full TensorStore details", " [tensorstore_spec="):
    problem = problem.split(dump)[0]
  line = problem.splitlines()
  line = line[0].strip() if line else problem
  return line if len(line) <= limit else line[:limit] + "..."


class CheckpointMismatchError(RuntimeError):
  """The checkpoint on disk does not fit the configured model or optimizer."""


class UnrestorableRunError(RuntimeError):
  """A run has checkpoints but none restores; the message says how to start
  it over (`train.start_over_if_unrestorable`) or elsewhere."""


class CheckpointSaveError(OSError):
  """A checkpoint could not be written; the message names the path and cause."""


@dataclasses.dataclass(frozen=True)
class Restored:
  """What `Checkpointer.restore` returns.

  Attributes:
    state: the train state, sharded like the restore target.
    step: the restored checkpoint's step.
    run: the checkpoint's `run` item, as given to `Checkpointer.save`.
  """
  state: Any
  step: int
  run: dict


def _flat_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  return {path_name(path): (tuple(leaf.shape), np.dtype(leaf.dtype).name)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def mismatch_error(what: str, mismatch: list[str],
                   fix: str) -> CheckpointMismatchError:
  """The error for `describe_mismatch`'s lines: at most MAX_MISMATCH_LINES,
  one per array, between `what` and `fix`."""
  shown = mismatch[:MAX_MISMATCH_LINES]
  if len(mismatch) > len(shown):
    shown.append(f"... and {len(mismatch) - len(shown)} more")
  return CheckpointMismatchError(
      f"{what}:\n" + "\n".join("  " + line for line in shown) + "\n" + fix)


def describe_mismatch(saved: Any, expected: Any) -> list[str]:
  """One line per array that differs between two trees of shaped leaves.

  Args:
    saved: the checkpoint's array metadata (anything with .shape, .dtype).
    expected: the restore target (e.g. `jax.ShapeDtypeStruct`s).

  Returns:
    Lines such as "params/embed_tokens/embedding: checkpoint (512, 64)
    float32, config (512, 128) float32", parameters first; empty when shapes
    and dtypes match.
  """
  old, new = _flat_shapes(saved), _flat_shapes(expected)
  lines = []
  # parameters first: the optimizer state repeats their shapes
  for name in sorted(old.keys() | new.keys(),
                     key=lambda n: (not n.startswith("params/"), n)):
    if old.get(name) == new.get(name):
      continue
    describe = lambda d: "absent" if d is None else f"{d[0]} {d[1]}"
    lines.append(f"{name}: checkpoint {describe(old.get(name))}, config "
                 f"{describe(new.get(name))}")
  return lines


class Checkpointer:
  """Saves when told to (the train loop decides when); see the module doc.

  Args:
    directory: the checkpoint directory (created if missing).
    keep: newest checkpoints kept; the best-eval one is kept in addition.

  Raises:
    CheckpointSaveError: when `directory` cannot be created or written.
  """

  def __init__(self, directory: str, *, keep: int):
    self.directory = paths.resolve(directory)
    self.keep = keep
    self._pending: int | None = None  # step of a save still in flight
    self._probe_writable()
    self.manager = self._open()
    # step -> `run` item, read once: retention ranks by its eval_loss
    self._runs = {step: self._read_run(step)
                  for step in self.manager.all_steps()}

  def _open(self) -> ocp.CheckpointManager:
    _small_arrays_from_one_replica()
    return deadline.call(lambda: ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            create=True, cleanup_tmp_directories=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "run": ocp.JsonCheckpointHandler()}),
        "opening the checkpoints in", self.directory)

  def _probe_writable(self) -> None:
    """Writes and removes a small file, so a bad directory fails now."""
    try:
      paths.probe_writable(
          self.directory,
          f".write_probe.{os.getpid()}.{jax.process_index()}")
    except OSError as e:
      raise CheckpointSaveError(
          f"cannot write checkpoints to {self.directory}: {e}. Make the "
          "directory writable (or free disk space), or choose another "
          "--workdir; the run's previous checkpoints are untouched.") from e

  def _read_run(self, step: int) -> dict:
    try:
      restored = deadline.call(lambda: self.manager.restore(
          step, args=ocp.args.Composite(run=ocp.args.JsonRestore())),
          "reading checkpoint", paths.join(self.directory, str(step)))
      return dict(restored.run or {})
    except deadline.StorageTimeoutError:
      raise
    except Exception:  # pylint: disable=broad-except
      return {}  # an old or damaged checkpoint; restore() decides

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of the complete checkpoints on disk, ascending."""
    return sorted(self.manager.all_steps())

  def best_step(self) -> int | None:
    """The step of the checkpoint with the lowest eval loss, or None."""
    losses = {step: run["eval_loss"] for step, run in self._runs.items()
              if "eval_loss" in run}
    return min(losses, key=losses.get) if losses else None

  def save(self, step: int, state: Any,
           data_iterator: grain.DatasetIterator, run: dict) -> None:
    """Starts saving `state`, the iterator position and the run facts.

    The arrays are copied to host now and written in the background; the
    iterator state is captured now. A failure of the previous save is raised
    first.

    Args:
      run: JSON-able facts of the run at `step`; an `eval_loss` entry ranks
        the checkpoint for retention.

    Raises:
      CheckpointSaveError: the previous save failed, or the directory cannot
        be written now (permissions, a full disk).
    """
    self.check(block=True)
    self._probe_writable()
    self._runs[step] = dict(run)
    deadline.call(lambda: self.manager.save(
        step, force=True,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            run=ocp.args.JsonSave(self._runs[step]))),
        "saving checkpoint", paths.join(self.directory, str(step)),
        tensorstore=True)
    self._pending = step

  def save_weights(self, step: int, params: Any, run: dict) -> None:
    """Writes a weights-only checkpoint (no optimizer or data state) and waits.

    `convert import-hf` writes one at step 0: a run whose newest intact
    checkpoint is weights-only starts at step 0 from these parameters with a
    fresh optimizer and data order (`is_weights_only`). Retention never
    deletes it.

    Args:
      params: the parameter pytree (as `state["params"]`).
      run: JSON-able facts; `weights_only: True` is added.
    """
    self.check(block=True)
    self._probe_writable()
    self._runs[step] = {**run, "weights_only": True}
    self.manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave({"params": params}),
        run=ocp.args.JsonSave(self._runs[step])))
    self._pending = step
    self.wait()

  def is_weights_only(self, step: int) -> bool:
    """Whether checkpoint `step` holds parameters only (`save_weights`)."""
    return bool(self._runs.get(step, {}).get("weights_only"))

  def newest_is_weights_only(self) -> bool:
    """Whether the newest checkpoint is weights-only (an imported model)."""
    latest = self.latest_step()
    return latest is not None and self.is_weights_only(latest)

  def check(self, block: bool = False) -> None:
    """Raises if the save in flight failed; prunes old checkpoints after it.

    Cheap when nothing is in flight or the save is still running (and
    `block` is False): the train loop calls it every step.

    Raises:
      CheckpointSaveError: naming the checkpoint path and the cause.
    """
    if self._pending is None:
      return
    if not block and self.manager.is_saving_in_progress():
      return
    step, self._pending = self._pending, None
    path = paths.join(self.directory, str(step))
    try:
      deadline.call(self.manager.wait_until_finished, "saving checkpoint",
                    path, tensorstore=True)
      if step not in self.manager.all_steps():
        raise OSError("the checkpoint was not finalized (see orbax's log)")
    except Exception as e:  # pylint: disable=broad-except
      self._runs.pop(step, None)
      if isinstance(e, deadline.StorageTimeoutError):
        raise CheckpointSaveError(str(e)) from e
      latest = self.latest_step()
      raise CheckpointSaveError(
          f"saving checkpoint {path} failed: {_first_line(str(e), 1000)}. Free "
          "disk space or fix the directory's permissions, then rerun the "
          "same command: it " + (f"resumes from checkpoint {latest}."
                                 if latest is not None else
                                 "starts again from step 0.")) from e
    self._prune()

  def _prune(self) -> None:
    """Keeps the newest `keep` checkpoints, the best-eval one and every
    weights-only one (an imported model is the run's fallback start)."""
    steps = self.all_steps()
    keep = set(steps[-self.keep:]) | {self.best_step()} | {
        step for step in steps if self.is_weights_only(step)}
    for step in steps:
      if step not in keep:
        self.manager.delete(step)
        self._runs.pop(step, None)

  def wait(self) -> None:
    """Blocks until the save in flight is on disk; raises if it failed."""
    self.check(block=True)

  def restore(self, abstract_state: Any,
              data_iterator: grain.DatasetIterator) -> Restored | None:
    """Restores the newest checkpoint that is intact; None if there is none.

    A checkpoint whose files are missing or unreadable is moved to
    `WORKDIR/damaged_checkpoints/<step>-<unix time>` with a WARNING, and the
    previous one is tried, until one restores or none is left.

    Args:
      abstract_state: a pytree of `jax.ShapeDtypeStruct` with `.sharding`, the
        structure of the freshly initialized state.
      data_iterator: moved in place to the saved position.

    Returns None as well when the newest intact checkpoint is weights-only
    (`save_weights`): the caller then starts from its parameters.

    Raises:
      CheckpointMismatchError: when the saved arrays do not fit the config
        (model size or optimizer changed since the checkpoint was written),
        with one line per differing array.
      StorageTimeoutError: an object store did not answer in time
        (`storage.deadline`).
    """
    while (step := self.latest_step()) is not None:
      if self.is_weights_only(step):
        return None  # the caller starts a new run from its weights
      path = paths.join(self.directory, str(step))
      problem = None
      try:
        saved = deadline.call(lambda: self.manager.item_metadata(step)[
            "state"], "reading checkpoint", path, tensorstore=True)
        if saved is None:
          raise FileNotFoundError(f"{path}/state is missing")
        mismatch = describe_mismatch(saved.tree, abstract_state)
      except deadline.StorageTimeoutError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        problem, mismatch = f"its metadata is unreadable ({e})", []
      if mismatch:
        raise mismatch_error(
            f"checkpoint {path} does not fit the config; differing arrays",
            mismatch, "Resume with the config it was written with, or start "
            "a new run with another --workdir.")
      if problem is None:
        try:
          restored = deadline.call(
              lambda: self.manager.restore(step, args=ocp.args.Composite(
                  state=ocp.args.StandardRestore(abstract_state),
                  data=grain.checkpoint.CheckpointRestore(data_iterator))),
              "restoring checkpoint", path, tensorstore=True)
        except deadline.StorageTimeoutError:
          raise
        except Exception as e:  # pylint: disable=broad-except
          problem = f"it cannot be read ({type(e).__name__}: {e})"
      if not any_process(problem is not None):
        logging.info("restored checkpoint %s", path)
        return Restored(state=restored.state, step=step,
                        run=self._runs.get(step, {}))
      self._move_aside(step, problem or "another process could not read it")
    return None

  def saved_scan_layers(self) -> bool | None:
    """The layer layout of the newest full checkpoint: True for scanned
    (`model.scan_layers`), False for unrolled, None if there is none or its
    metadata cannot be read (the restore then reports it)."""
    step = self.latest_step()
    if step is None or self.is_weights_only(step):
      return None
    try:
      return is_stacked(self.manager.item_metadata(step)["state"].tree[
          "params"])
    except Exception:  # pylint: disable=broad-except
      return None

  def _move_aside(self, step: int, problem: str) -> None:
    path = paths.join(self.directory, str(step))
    target = damaged_checkpoint_dir(paths.parent(self.directory), step,
                                    int(time.time()))
    if jax.process_index() == 0:
      logging.warning(
          "checkpoint %s is damaged: %s. Moved it to %s (kept for "
          "inspection) and trying the previous checkpoint.", path,
          _first_line(problem), target)
      paths.move(path, target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"bitnet_jax:moved_aside_{step}")
    self.manager.reload()
    self._runs.pop(step, None)

  def close(self) -> None:
    """Waits for the save in flight, then releases the manager.

    Raises:
      CheckpointSaveError: when that save failed.
    """
    try:
      self.wait()
    finally:
      deadline.call(self.manager.close, "closing the checkpoints in",
                    self.directory, tensorstore=True)


def abstract_with_shardings(state_shapes: Any, shardings: Any) -> Any:
  """Attaches shardings to `jax.eval_shape` output for a sharded restore."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      state_shapes, shardings)
