"""Run guards: stop a run whose loss is not finite or has diverged.

Both stop the run before the bad state is checkpointed, so the newest
checkpoint stays a good one (and checkpoint retention always keeps the
best-eval checkpoint besides). A diverged run that only logged its loss would
otherwise exit 0 and rotate every good checkpoint out (`keep_checkpoints`).
"""

from __future__ import annotations

import math


class DivergenceError(FloatingPointError):
  """The loss stayed far above its running minimum: the run diverged."""


def check_finite(step: int, values: dict, resume_hint: str) -> None:
  """Raises FloatingPointError when `loss` or `grad_norm` is NaN or inf.

  Args:
    step: the step the values belong to.
    values: host floats; only the keys `loss` and `grad_norm` are read.
    resume_hint: where the run can resume (e.g. "step 275"), for the message.
  """
  for name in ("loss", "grad_norm"):
    if name in values and not math.isfinite(values[name]):
      raise FloatingPointError(
          f"{name} is {values[name]} at step {step}: the run stops and keeps "
          f"its last good checkpoint ({resume_hint}). Lower "
          "optimizer.learning_rate or check the data, then rerun the same "
          "command to resume.")


class DivergenceGuard:
  """Watches logged losses; raises after `patience` in a row above the line.

  The train loop feeds it the cross-entropy (`nll`), not the objective: an
  entropy bonus can take the objective to or below 0, where a multiple of
  the minimum means nothing.

  The line is `factor` x the running minimum of the losses seen so far: a
  language model's training loss falls or plateaus, and noise or the
  stage-boundary drop move it by percent, not by a factor of 3. A loss that
  explodes (an exploding step multiplies it by orders of magnitude: a
  stage-2 learning rate of 1e3 was reported to take a run from 5.5 nats to
  1.9e8) crosses the line and stays there.

  Args:
    factor: multiple of the running minimum (> 1); 0 disables the guard.
    patience: consecutive observed losses above the line that stop the run.
  """

  def __init__(self, factor: float, patience: int):
    self.factor, self.patience = factor, patience
    self.minimum: float | None = None
    self.minimum_step: int | None = None
    self._above: list[tuple[int, float]] = []

  def threshold(self) -> float:
    """The current line (nats/token); inf while disabled or unseeded."""
    if not self.factor or self.minimum is None:
      return math.inf
    return self.factor * self.minimum

  def is_diverged(self, loss: float) -> bool:
    """True when `loss` lies above the line (without recording it)."""
    return loss > self.threshold()

  def state(self) -> dict:
    """The running minimum, saved with each checkpoint (see `seed`)."""
    return {"loss_minimum": self.minimum,
            "loss_minimum_step": self.minimum_step}

  def restore(self, saved: dict) -> None:
    """Continues from a checkpoint's `state()` (missing keys: a fresh start)."""
    if saved.get("loss_minimum") is not None:
      self.seed(saved["loss_minimum_step"], saved["loss_minimum"])

  def seed(self, step: int, loss: float) -> None:
    """Counts a loss towards the running minimum."""
    if math.isfinite(loss) and (self.minimum is None or loss < self.minimum):
      self.minimum, self.minimum_step = loss, step

  def observe(self, step: int, loss: float, resume_hint: str) -> None:
    """Records a logged loss.

    Raises:
      DivergenceError: on the `patience`-th consecutive loss above the line,
        naming the losses, the minimum and the checkpoint to resume from.
    """
    if self.is_diverged(loss):
      self._above.append((step, loss))
      if len(self._above) >= self.patience:
        seen = ", ".join(f"{v:.4g} (step {s})" for s, v in self._above)
        raise DivergenceError(
            f"the loss diverged: {seen} all lie above {self.factor:g} x the "
            f"running minimum {self.minimum:.4g} (step {self.minimum_step}) "
            f"(train.divergence_factor, train.divergence_patience). The run "
            f"stops without checkpointing the diverged state; it keeps "
            f"{resume_hint}. Lower optimizer.learning_rate or "
            "optimizer.stage2_learning_rate, then rerun the same command "
            "(with --config.train.allow_config_change=true) to resume.")
      return
    self._above.clear()
    self.seed(step, loss)
