"""The checkpoint stage of the train loop: saves on its cadence and on a stop.

Orbax does the writing (`bitnet_jax.runs.checkpoint.Checkpointer`); this
action decides when (`train.checkpoint_every`, the last step, a stop
request), refuses to save a NaN or diverged state (`bitnet_jax.training.
guards`), and records the run facts each checkpoint holds (tokens seen, the
divergence guard's minimum, the step's eval loss).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from absl import logging

from bitnet_jax.runs.checkpoint import Checkpointer
from bitnet_jax.training import guards
from bitnet_jax.training.actions import Cadence, PeriodicAction, Saved, StepDone


class Checkpointing(PeriodicAction):
  """Checkpoints at its cadence and on request, unless the loss diverged.

  Args:
    every: `train.checkpoint_every`.
    checkpointer: the run's `Checkpointer`.
    guard: the `DivergenceGuard` (`train.divergence_factor`,
      `train.divergence_patience`), restored from the checkpoint's facts.
    data_iterator: the train iterator whose position each checkpoint holds.
    tokens_seen: step -> tokens trained on by the end of it.
  """

  def __init__(self, every: int, checkpointer: Checkpointer,
               guard: guards.DivergenceGuard, data_iterator: Any,
               tokens_seen: Callable[[int], int]):
    self.cadence = Cadence(every)
    self.checkpointer, self.guard = checkpointer, guard
    self.data_iterator, self.tokens_seen = data_iterator, tokens_seen

  def due(self, done: StepDone) -> bool:
    """Whether this step is checkpointed by cadence (a stop adds more)."""
    return self.cadence.due(done.step, done.is_last)

  def kept(self) -> str:
    """The checkpoints a failed run keeps, for error messages."""
    return (f"checkpoint {self.checkpointer.latest_step()} (best eval: "
            f"{self.checkpointer.best_step()})")

  def check_record(self, step: int, record: dict) -> Mapping[str, Any]:
    """Checks a train record before it is written (a record check).

    Raises:
      FloatingPointError: the loss or gradient norm is NaN or inf.
      guards.DivergenceError: the cross-entropy (`nll`, the loss without
        regularizers) stayed above the divergence line.
    """
    if "loss" in record:
      guards.check_finite(step, record, self.kept())
      self.guard.observe(step, record["nll"], self.kept())
    return {}

  def __call__(self, done: StepDone, *, stopping: bool,
               eval_loss: float | None) -> Saved:
    """Saves `done` when due or `stopping`; waits for it when stopping.

    Args:
      stopping: the run stops after this step (it is checkpointed first).
      eval_loss: this step's eval loss (ranks the checkpoint), or None.
    """
    self.checkpointer.check()  # a failed background save stops the run here
    saved = False
    if stopping or self.due(done):
      saved = self._save(done, eval_loss)
    if stopping:  # a stopping run's checkpoint is on disk before it exits
      self.checkpointer.wait()
    return Saved(done.step, saved, self.checkpointer.directory, self.kept())

  def _save(self, done: StepDone, eval_loss: float | None) -> bool:
    """Starts saving `done`'s step unless its loss is bad; True if it did."""
    values = done.values
    guards.check_finite(done.step, values, self.kept())  # never save NaNs
    if self.guard.is_diverged(values["nll"]):
      logging.warning("not saving checkpoint %d: loss %.4g lies above %.4g "
                      "(train.divergence_factor x its running minimum)",
                      done.step, values["nll"], self.guard.threshold())
      return False
    run = {"tokens_seen": self.tokens_seen(done.step), **self.guard.state()}
    if eval_loss is not None:  # ranks the checkpoint for retention
      run["eval_loss"] = eval_loss
    self.checkpointer.save(done.step, done.state, self.data_iterator, run)
    return True

  def close(self) -> None:
    self.checkpointer.close()  # completes the save in flight, even on error
