"""Periodic actions: what runs after each train step, each on its cadence.

Each action owns its cadence (a `Cadence`) and reports by returning: a
`Report` holds the metrics it adds to the step's record and, optionally, a
request to stop the run after the step. No action reads what another wrote.
`AfterStep` runs them in this order, which it spells out because later
stages consume what earlier ones return:

  1. reporters, independent of each other (`AfterStep.reporters`):
       Preemption          every step: after SIGTERM / SIGINT, stop
       Evaluation          train.eval_every, the last step, step 0: eval
                           metrics of the fixed validation windows, samples
       HarnessEvaluation   eval.harness_every, the last step: lm-eval tasks
                           (`bitnet_jax.training.harness`)
  2. MetricLog     train.log_every and every evaluated step: the record (the
                   step's metrics, the reporters' metrics, rates) passes the
                   record checks in order (the divergence guard raises on a
                   NaN or diverged loss; the collapse alarms add
                   `health_alarms`), then goes to metrics.jsonl, TensorBoard
                   and the console; read one step late (no host sync in the
                   loop) unless the step is evaluated or checkpointed, so its
                   line is on disk first
  3. HealthAlarms  evaluated steps: with health.halt_on_alarm, an alarm
                   (from stage 2's check) asks to stop
  4. Checkpointing train.checkpoint_every, the last step and any stop:
                   saves the state, the data position and the run facts
                   (with the step's eval_loss from stage 1), unless the loss
                   diverged
  5. the stop requests run, in order, once the checkpoint is on disk.


`Checkpointing` lives in `bitnet_jax.training.checkpointing`, `MetricLog`
and `HealthAlarms` in `bitnet_jax.training.records`. A new periodic feature
that measures something is a reporter: an object
with `due(done)` and `__call__(done) -> Report` (and `end()` / `close()` if
it needs them) added to the reporters in `bitnet_jax.training.setup`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
from absl import logging

from bitnet_jax.metrics import Throughput
from bitnet_jax.training import preemption
from bitnet_jax.training.cadence import Cadence
from bitnet_jax.training.train_state import TrainState

if TYPE_CHECKING:
  from bitnet_jax.training.checkpointing import Checkpointing
  from bitnet_jax.training.records import HealthAlarms, MetricLog

# (step, record) -> fields to add to the record; may raise to stop the run
RecordCheck = Callable[[int, dict], Mapping[str, Any]]


def host_values(metrics: Mapping[str, jax.Array]) -> dict[str, float]:
  """Python floats of a step's metric scalars (blocks until they exist)."""
  return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}


@dataclasses.dataclass(frozen=True)
class StepDone:
  """What one train step produced, handed to every periodic action.

  Attributes:
    step: the steps completed (1 for the first optimizer update); 0 for the
      baseline evaluation before training.
    state: the train state after the step.
    metrics: the step's metrics on device (float32 scalars: loss, nll,
      accuracy, grad_norm, learning_rate, weight_decay, ...), None at step
      0.
    is_last: whether `step` is `train.steps`.
  """
  step: int
  state: TrainState
  metrics: Mapping[str, jax.Array] | None
  is_last: bool = False

  @functools.cached_property
  def values(self) -> dict[str, float]:
    """The step's metrics as host floats (read once; {} at step 0)."""
    return host_values(self.metrics) if self.metrics else {}


@dataclasses.dataclass(frozen=True)
class Saved:
  """What the checkpoint stage did for a stopping step (for the message).

  Attributes:
    step: the step.
    saved: whether its checkpoint is on disk (False: a diverged loss).
    directory: the checkpoint directory.
    kept: the checkpoints a failed run keeps, in words.
  """
  step: int
  saved: bool
  directory: str
  kept: str


@dataclasses.dataclass(frozen=True)
class Report:
  """What an action reports for a step.

  Attributes:
    metrics: scalars (or lists) joining the step's record.
    stop: None, or what to do to stop the run after this step once its
      checkpoint is saved (log why, or raise); called with the `Saved`.
  """
  metrics: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  stop: Callable[[Saved], None] | None = None


NOTHING = Report()


class PeriodicAction:
  """An action of the train loop (see the module docstring)."""

  def end(self) -> None:
    """After the last step of this start, when no error propagates."""

  def close(self) -> None:
    """Always, after `end` or an error (actions close in reverse order)."""


class Preemption(PeriodicAction):
  """SIGTERM / SIGINT end the run after the step in flight, checkpointed.

  A context manager: the signal handlers are installed while it is entered
  (`preemption.PreemptionWatch`; multi-host, every process stops at the
  same step).
  """

  def __init__(self):
    self.watch = preemption.PreemptionWatch()

  def __enter__(self) -> Preemption:
    self.watch.__enter__()
    return self

  def __exit__(self, *exc_info) -> None:
    self.watch.__exit__(*exc_info)

  def due(self, done: StepDone) -> bool:
    return done.step > 0  # checked after every step

  def __call__(self, done: StepDone) -> Report:
    if self.watch.requested(done.step):
      return Report(stop=self._report)
    return NOTHING

  def _report(self, saved: Saved) -> None:
    logging.warning(
        "%s: stopped after step %d; %s. Rerun the same command to continue.",
        self.watch.signal_name, saved.step,
        f"saved its checkpoint in {saved.directory}/{saved.step}"
        if saved.saved else f"not saved (diverged loss), {saved.kept} kept")


class Evaluation(PeriodicAction):
  """Eval metrics and greedy samples of the fixed validation windows.

  Args:
    every: `train.eval_every` (also the last step, and the step-0
      baseline: the collapse diagnostics' reference point).
    evaluate: (params, step) -> eval metrics (`steps.evaluate`).
    sample: (params, step) -> samples (`samples.continue_prompts`).
    write_samples: (step, samples) -> None (`MetricWriter.write_samples`).
    throughput: paused while evaluating (evaluation is not training time).
  """

  def __init__(self, every: int, evaluate: Callable[[Any, int], dict],
               sample: Callable[[Any, int], list[dict[str, str]]],
               write_samples: Callable[[int, list], None],
               throughput: Throughput):
    self.cadence = Cadence(every, at_start=True)
    self.evaluate, self.sample = evaluate, sample
    self.write_samples, self.throughput = write_samples, throughput

  def due(self, done: StepDone) -> bool:
    return self.cadence.due(done.step, done.is_last)

  def __call__(self, done: StepDone) -> Report:
    with self.throughput.paused(ready=done.state):
      evaluation = self.evaluate(done.state.params, done.step)
      self.write_samples(done.step,
                         self.sample(done.state.params, done.step))
    return Report(metrics=evaluation)


class AfterStep:
  """The periodic actions in their order (module docstring).

  Args:
    reporters: actions with `due(done)` and `__call__(done) -> Report`,
      independent of each other (preemption, evaluation, lm-eval tasks).
    metric_log: writes the records.
    alarms: the collapse alarms (its `check_record` is one of the metric
      log's checks).
    checkpointing: saves the state.
  """

  def __init__(self, reporters: Sequence[Any], metric_log: MetricLog,
               alarms: HealthAlarms, checkpointing: Checkpointing):
    self.reporters = list(reporters)
    self.metric_log, self.alarms = metric_log, alarms
    self.checkpointing = checkpointing

  @property
  def actions(self) -> list[PeriodicAction]:
    """Every action, in order (`end` and, reversed, `close`)."""
    return [*self.reporters, self.metric_log, self.alarms,
            self.checkpointing]

  def __call__(self, done: StepDone) -> bool:
    """Runs the actions after `done`; True when the run stops after it."""
    reports = [reporter(done) for reporter in self.reporters
               if reporter.due(done)]
    evaluated = any(report.metrics for report in reports)
    reported = {k: v for report in reports for k, v in report.metrics.items()}
    stops = [report.stop for report in reports if report.stop]
    if done.step == 0:  # the baseline: evaluated and logged, no state saved
      self.metric_log(done, reported, write_now=False)
      return False
    self.metric_log(done, reported if evaluated else None,
                    write_now=bool(stops) or self.checkpointing.due(done))
    if evaluated:
      alarm = self.alarms(done)
      stops += [alarm.stop] if alarm.stop else []
    with self.metric_log.throughput.paused(
        ready=done.state if self.checkpointing.due(done) else None):
      saved = self.checkpointing(done, stopping=bool(stops),
                                 eval_loss=reported.get("eval_loss"))
    for stop in stops:
      stop(saved)
    return bool(stops)

  def end(self) -> None:
    for action in self.actions:
      action.end()
