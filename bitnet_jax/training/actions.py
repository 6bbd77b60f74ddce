"""Periodic actions: what runs after each train step, each on its own cadence.

The train loop (`bitnet_jax.training.loop`) runs one step, wraps what it produced in
a `StepDone` and hands it to each action of `Run.actions`, in this order:

  Preemption     every step: after SIGTERM / SIGINT, checkpoint this step
                 and stop (exit 0)
  Evaluation     train.eval_every, the last step (and step 0): eval metrics
                 of the fixed validation windows, greedy samples
  MetricLog      train.log_every and every evaluated step: the step's record
                 to metrics.jsonl, TensorBoard and the console; read one step
                 late (no host sync in the loop) unless the step is
                 evaluated or checkpointed, so its line is on disk first
  HealthAlarms   evaluated steps: with health.halt_on_alarm, an alarm stops
                 the run after a checkpoint
  Checkpointing  train.checkpoint_every, the last step and any stop: saves
                 the state, the data position and the run facts, unless the
                 loss diverged

A record passes through `MetricLog`'s observers before it is written:
`Checkpointing.observe` (a NaN or diverged loss stops the run,
`bitnet_jax.training.guards`) and `HealthAlarms.observe` (the collapse alarms of an
eval record, `bitnet_jax.metrics.health`). A new periodic feature is a new action:
an object with `__call__(done)` (and `end()` / `close()` if it needs them)
added to the list in `bitnet_jax.training.setup.build_run`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

import jax
from absl import logging

from bitnet_jax.training import guards
from bitnet_jax.metrics import health
from bitnet_jax.distributed import multihost
from bitnet_jax.training import preemption
from bitnet_jax.runs.checkpoint import Checkpointer
from bitnet_jax.metrics import MetricWriter, Throughput, log_console
from bitnet_jax.training.train_state import TrainState

Observer = Callable[[int, dict], None]  # (step, record) -> None; may raise


def host_values(metrics: Mapping[str, jax.Array]) -> dict[str, float]:
  """Python floats of a step's metric scalars (blocks until they exist)."""
  return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}


@dataclasses.dataclass
class StepDone:
  """What one train step produced, handed to every periodic action.

  Attributes:
    step: the steps completed (1 for the first optimizer update); 0 for the
      baseline evaluation before training.
    state: the train state after the step.
    metrics: the step's metrics on device (float32 scalars: loss, nll,
      accuracy, grad_norm, learning_rate, weight_decay), None at step 0.
    is_last: whether `step` is `train.steps`.
    evaluation: the eval metrics of `state`, once `Evaluation` ran.
    harness: `harness/<task>/<metric>` scalars of `state`, once the
      lm-eval tasks ran (`bitnet_jax.training.harness`).
    checkpoint: an action asks `Checkpointing` to save this step.
    saved: `Checkpointing` saved this step.
    stops: what to do, once the step is checkpointed, to stop the run after
      it (log why, or raise); set by `stop_after`.
  """
  step: int
  state: TrainState
  metrics: Mapping[str, jax.Array] | None
  is_last: bool = False
  evaluation: dict[str, Any] | None = None
  harness: dict[str, float] | None = None
  checkpoint: bool = False
  saved: bool = False
  stops: list[Callable[[StepDone], None]] = dataclasses.field(
      default_factory=list)
  _values: dict[str, float] | None = None

  def values(self) -> dict[str, float]:
    """The step's metrics as host floats (read once; {} at step 0)."""
    if self._values is None:
      self._values = host_values(self.metrics) if self.metrics else {}
    return self._values

  def stop_after(self, finish: Callable[[StepDone], None]) -> None:
    """Asks for a checkpoint of this step and for the run to stop after it;
    `finish(self)` runs once the checkpoint is on disk."""
    self.stops.append(finish)
    self.checkpoint = True


class PeriodicAction:
  """An action of the train loop (see the module docstring)."""

  def __call__(self, done: StepDone) -> None:
    """Acts on a completed step when its cadence says so."""

  def end(self) -> None:
    """After the last step of this start, when no error propagates."""

  def close(self) -> None:
    """Always, after `end` or an error (actions close in reverse order)."""


class Checkpointing(PeriodicAction):
  """Checkpoints at its cadence and on request; the divergence guard.

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
    self.every, self.checkpointer, self.guard = every, checkpointer, guard
    self.data_iterator, self.tokens_seen = data_iterator, tokens_seen

  def saves(self, done: StepDone) -> bool:
    """Whether this step is checkpointed (cadence, last step, a request)."""
    return done.checkpoint or done.is_last or done.step % self.every == 0

  def kept(self) -> str:
    """The checkpoints a failed run keeps, for error messages."""
    return (f"checkpoint {self.checkpointer.latest_step()} (best eval: "
            f"{self.checkpointer.best_step()})")

  def observe(self, step: int, record: dict) -> None:
    """Checks a train record before it is written (a `MetricLog` observer).

    Raises:
      FloatingPointError: the loss or gradient norm is NaN or inf.
      guards.DivergenceError: the cross-entropy (`nll`, the loss without
        regularizers) stayed above the divergence line.
    """
    if "loss" in record:
      guards.check_finite(step, record, self.kept())
      self.guard.observe(step, record["nll"], self.kept())

  def __call__(self, done: StepDone) -> None:
    self.checkpointer.check()  # a failed background save stops the run here
    if self.saves(done):
      done.saved = self._save(done)
    if done.stops:  # a stopping run's checkpoint is on disk before it exits
      self.checkpointer.wait()

  def _save(self, done: StepDone) -> bool:
    """Starts saving `done`'s step unless its loss is bad; True if it did."""
    values = done.values()
    guards.check_finite(done.step, values, self.kept())  # never save NaNs
    if self.guard.is_diverged(values["nll"]):
      logging.warning("not saving checkpoint %d: loss %.4g lies above %.4g "
                      "(train.divergence_factor x its running minimum)",
                      done.step, values["nll"], self.guard.threshold())
      return False
    run = {"tokens_seen": self.tokens_seen(done.step), **self.guard.state()}
    if done.evaluation:  # ranks the checkpoint for retention
      run["eval_loss"] = done.evaluation["eval_loss"]
    self.checkpointer.save(done.step, done.state, self.data_iterator, run)
    return True

  def close(self) -> None:
    self.checkpointer.close()  # completes the save in flight, even on error


class Preemption(PeriodicAction):
  """SIGTERM / SIGINT end the run after the step in flight, checkpointed.

  A context manager: the signal handlers are installed while it is entered
  (`preemption.PreemptionWatch`; multi-host, every process stops at the
  same step).
  """

  def __init__(self, checkpointing: Checkpointing):
    self.checkpointing = checkpointing
    self.watch = preemption.PreemptionWatch()

  def __enter__(self) -> Preemption:
    self.watch.__enter__()
    return self

  def __exit__(self, *exc_info) -> None:
    self.watch.__exit__(*exc_info)

  def __call__(self, done: StepDone) -> None:
    if self.watch.requested(done.step):
      done.stop_after(self._report)

  def _report(self, done: StepDone) -> None:
    directory = self.checkpointing.checkpointer.directory
    logging.warning(
        "%s: stopped after step %d; %s. Rerun the same command to continue.",
        self.watch.signal_name, done.step,
        f"saved its checkpoint in {directory}/{done.step}" if done.saved
        else f"not saved (diverged loss), {self.checkpointing.kept()} kept")


class Evaluation(PeriodicAction):
  """Eval metrics and greedy samples of the fixed validation windows.

  Args:
    every: `train.eval_every` (also the last step, and step 0 when the
      loop asks: the collapse diagnostics' reference point).
    evaluate: (params, step) -> eval metrics (`steps.evaluate`).
    sample: (params, step) -> samples (`samples.continue_prompts`).
    write_samples: (step, samples) -> None (`MetricWriter.write_samples`).
    throughput: paused while evaluating (evaluation is not training time).
  """

  def __init__(self, every: int, evaluate: Callable[[Any, int], dict],
               sample: Callable[[Any, int], list[dict[str, str]]],
               write_samples: Callable[[int, list], None],
               throughput: Throughput):
    self.every, self.evaluate, self.sample = every, evaluate, sample
    self.write_samples, self.throughput = write_samples, throughput

  def __call__(self, done: StepDone) -> None:
    if done.step % self.every and not done.is_last:
      return
    with self.throughput.paused():
      done.evaluation = self.evaluate(done.state.params, done.step)
      self.write_samples(done.step,
                         self.sample(done.state.params, done.step))


class MetricLog(PeriodicAction):
  """Writes each logged or evaluated step's record, one step late if it can.

  A record is the step's metrics, `tokens_seen`, the rates since the last
  record (`Throughput`, `mfu` where the device's peak is known), then the
  eval metrics and `health_alarms` of an evaluated step. A log step that is
  neither evaluated nor checkpointed is read after the next step has been
  dispatched, so reading it does not stall the device.

  Args:
    every: `train.log_every`.
    total_steps: `train.steps` (the console line).
    writer: the run's `MetricWriter`.
    throughput: the run's clock (`begin` is called by the loop).
    tokens_seen: step -> tokens trained on by the end of it.
    flops_per_token, peak_flops: for `mfu` (`metrics.throughput`); peak
      None where unknown.
    observers: called with (step, record) before it is written, in order.
    writes_now: whether a step's record must be written at once (its
      checkpoint is about to be saved: `Checkpointing.saves`).
  """

  def __init__(self, every: int, total_steps: int, writer: MetricWriter,
               throughput: Throughput, tokens_seen: Callable[[int], int],
               flops_per_token: float, peak_flops: float | None,
               observers: list[Observer],
               writes_now: Callable[[StepDone], bool]):
    self.every, self.total_steps = every, total_steps
    self.writer, self.throughput = writer, throughput
    self.tokens_seen = tokens_seen
    self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
    self.observers, self.writes_now = observers, writes_now
    self.unread_metrics: tuple[int, Mapping[str, jax.Array]] | None = None
    self.last: dict[str, Any] = {}  # the latest record written
    self._timed_first_step = False

  def __call__(self, done: StepDone) -> None:
    if done.metrics is not None and not self._timed_first_step:
      jax.block_until_ready(done.metrics)  # compilation is not training
      self.throughput.first_step_done(done.step)
      self._timed_first_step = True
    self.flush()
    evaluated = done.evaluation is not None or done.harness is not None
    if evaluated or self.writes_now(done):
      if evaluated or done.step % self.every == 0:
        self._write(done.step, done.values(),
                    {**(done.evaluation or {}), **(done.harness or {})}
                    if evaluated else None)
    elif done.step % self.every == 0:
      self.unread_metrics = (done.step, done.metrics)

  def flush(self) -> None:
    """Writes the record left unread at the previous step, if any."""
    if self.unread_metrics is not None:
      step, metrics = self.unread_metrics
      self.unread_metrics = None
      self._write(step, host_values(metrics), None)

  def _write(self, step: int, values: dict[str, float],
             evaluation: dict[str, Any] | None) -> None:
    record = dict(values)
    if values:
      record["tokens_seen"] = self.tokens_seen(step)
      record.update(self.throughput.measure(step))
      if self.peak_flops and "tokens_per_sec" in record:
        record["mfu"] = (record["tokens_per_sec"] * self.flops_per_token
                         / self.peak_flops)
    record.update(evaluation or {})
    for observe in self.observers:
      observe(step, record)
    self.writer.write(step, record)
    log_console(step, self.total_steps, record)
    self.last = {"step": step, **record}

  def end(self) -> None:
    self.flush()
    if jax.process_index() == 0:
      logging.info("final metrics: %s", json.dumps(self.last))
      logging.info(self.throughput.summary(
          self.flops_per_token, self.peak_flops,
          f"{jax.device_count()} x {jax.devices()[0].device_kind}"))

  def close(self) -> None:
    self.writer.close()


class HealthAlarms(PeriodicAction):
  """The collapse alarms (`config.health`) on every eval record.

  Args:
    health_config: `config.health`.
    monitor: the run's `health.HealthMonitor` (replayed on resume).
    checkpoint_dir: where a halted run's checkpoint is, for the message.
  """

  def __init__(self, health_config: Any, monitor: health.HealthMonitor,
               checkpoint_dir: str):
    self.halt_on_alarm = health_config.halt_on_alarm
    self.monitor, self.checkpoint_dir = monitor, checkpoint_dir
    self._alarms: tuple[int, list[str]] = (-1, [])

  def observe(self, step: int, record: dict) -> None:
    """Feeds the monitor a record; adds `health_alarms` to eval records."""
    alarms = self.monitor.observe(step, record)  # [] for a train record
    if "eval_loss" in record:
      record["health_alarms"] = alarms
      self._alarms = (step, alarms)

  def __call__(self, done: StepDone) -> None:
    if done.evaluation is None or not self.halt_on_alarm:
      return
    step, alarms = self._alarms
    if multihost.process_zero_decides(step == done.step and bool(alarms)):
      done.stop_after(self._halt)

  def _halt(self, done: StepDone) -> None:
    raise health.HealthAlarmError(
        f"step {done.step}: {self.monitor.message(self._alarms[1])} "
        f"(health.halt_on_alarm=True; checkpoint {done.step} "
        f"{'saved' if done.saved else 'not saved (diverged loss)'} in "
        f"{self.checkpoint_dir}; set --config.health.halt_on_alarm=False "
        "to train on)")
