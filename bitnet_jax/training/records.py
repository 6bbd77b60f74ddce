"""The record stage of the train loop: metric records and the collapse alarms.

`MetricLog` assembles a step's record (its metrics, the reporters' metrics,
the rates), runs the record checks in order and writes it to metrics.jsonl,
TensorBoard and the console; `HealthAlarms` is one of those checks (the
collapse alarms of `bitnet_jax.metrics.health`) and asks to stop a run when
`health.halt_on_alarm` is set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from bitnet_jax.distributed import multihost
from bitnet_jax.metrics import MetricWriter, Throughput, health, log_console
from bitnet_jax.training.actions import (
  NOTHING,
  Cadence,
  PeriodicAction,
  RecordCheck,
  Report,
  Saved,
  StepDone,
  host_values,
)


class MetricLog(PeriodicAction):
  """Writes each logged or evaluated step's record, one step late if it can.

  A record is the step's metrics, `tokens_seen`, the rates since the last
  record (`Throughput`, `mfu` where the device's peak is known), then the
  reporters' metrics, then what the record checks add. A log step that is
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
    checks: called in order with (step, record) before it is written; each
      returns fields to add (and may raise to stop the run).
  """

  def __init__(self, every: int, total_steps: int, writer: MetricWriter,
               throughput: Throughput, tokens_seen: Callable[[int], int],
               flops_per_token: float, peak_flops: float | None,
               checks: Sequence[RecordCheck]):
    self.cadence = Cadence(every, at_last=False)
    self.total_steps = total_steps
    self.writer, self.throughput = writer, throughput
    self.tokens_seen = tokens_seen
    self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
    self.checks = list(checks)
    self.unread_metrics: tuple[int, Mapping[str, jax.Array]] | None = None
    self.last: dict[str, Any] = {}  # the latest record written
    self.alarms_seen: list[str] = []  # alarms fired, in order of first firing
    self._timed_first_step = False

  def __call__(self, done: StepDone, reported: Mapping[str, Any] | None,
               *, write_now: bool) -> None:
    """Logs `done`.

    Args:
      reported: the reporters' metrics of this step (an evaluated step), or
        None.
      write_now: the step is checkpointed: a log step's record is written
        before its checkpoint.
    """
    if done.metrics is not None and not self._timed_first_step:
      jax.block_until_ready(done.metrics)  # compilation is not training
      self.throughput.first_step_done(done.step)
      self._timed_first_step = True
    self.flush()
    logged = self.cadence.due(done.step, done.is_last)
    if reported is not None or (write_now and logged):
      self._write(done.step, done.values, reported)
    elif logged:
      self.unread_metrics = (done.step, done.metrics)

  def flush(self) -> None:
    """Writes the record left unread at the previous step, if any."""
    if self.unread_metrics is not None:
      step, metrics = self.unread_metrics
      self.unread_metrics = None
      self._write(step, host_values(metrics), None)

  def _write(self, step: int, values: dict[str, float],
             reported: Mapping[str, Any] | None) -> None:
    record = dict(values)
    if values:
      record["tokens_seen"] = self.tokens_seen(step)
      record.update(self.throughput.measure(step))
      if self.peak_flops and "tokens_per_sec" in record:
        record["mfu"] = (record["tokens_per_sec"] * self.flops_per_token
                         / self.peak_flops)
    record.update(reported or {})
    for check in self.checks:
      record.update(check(step, record))
    self.writer.write(step, record)
    log_console(step, self.total_steps, record)
    self.alarms_seen += [a for a in record.get("health_alarms") or []
                         if a not in self.alarms_seen]
    self.last = {"step": step, **record}

  def end(self) -> None:
    self.flush()

  def performance(self) -> str:
    """The run's one-line speed summary (`Throughput.summary`)."""
    return self.throughput.summary(
        self.flops_per_token, self.peak_flops,
        f"{jax.device_count()} x {jax.devices()[0].device_kind}")

  def close(self) -> None:
    self.writer.close()


class HealthAlarms(PeriodicAction):
  """The collapse alarms (`config.health`) on every eval record.

  Args:
    health_config: `config.health`.
    monitor: the run's `health.HealthMonitor` (replayed on resume).
  """

  def __init__(self, health_config: Any, monitor: health.HealthMonitor):
    self.halt_on_alarm = health_config.halt_on_alarm
    self.monitor = monitor
    self._alarms: tuple[int, list[str]] = (-1, [])

  def check_record(self, step: int, record: dict) -> Mapping[str, Any]:
    """Feeds the monitor a record (a record check); an eval record gets
    `health_alarms`."""
    alarms = self.monitor.observe(step, record)  # [] for a train record
    if "eval_loss" not in record:
      return {}
    self._alarms = (step, alarms)
    return {"health_alarms": alarms}

  def __call__(self, done: StepDone) -> Report:
    """Asks to stop after an evaluated step whose record raised an alarm,
    with `health.halt_on_alarm`."""
    step, alarms = self._alarms
    if self.halt_on_alarm and multihost.process_zero_decides(
        step == done.step and bool(alarms)):
      return Report(stop=self._halt)
    return NOTHING

  def _halt(self, saved: Saved) -> None:
    raise health.HealthAlarmError(
        f"step {saved.step}: {self.monitor.message(self._alarms[1])} "
        f"(health.halt_on_alarm=True; checkpoint {saved.step} "
        f"{'saved' if saved.saved else 'not saved (diverged loss)'} in "
        f"{saved.directory}; set --config.health.halt_on_alarm=False "
        "to train on)")
