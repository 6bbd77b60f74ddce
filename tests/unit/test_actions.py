"""The train loop's periodic actions, alone (in a run:
tests/integration/test_actions_in_a_run.py)."""

import numpy as np
import pytest

from bitnet_jax import metrics
from bitnet_jax.training import actions, records


class _Lines:
  """A MetricWriter stand-in that keeps (step, record) in write order."""

  def __init__(self):
    self.lines = []

  def write(self, step, record):
    self.lines.append((step, dict(record)))

  def close(self):
    pass


def _metric_log(writer, checks=()):
  throughput = metrics.Throughput(tokens_per_step=10, total_steps=100)
  throughput.begin()
  return records.MetricLog(
      every=2, total_steps=100, writer=writer, throughput=throughput,
      tokens_seen=lambda step: 10 * step, flops_per_token=1.0,
      peak_flops=None, checks=list(checks))


def _done(step):
  return actions.StepDone(step, state=None,
                          metrics={"loss": np.float32(step), "nll":
                                   np.float32(step)})


def test_a_log_step_is_written_one_step_late_unless_it_is_checkpointed():
  writer = _Lines()
  log = _metric_log(writer)
  written_after = {}
  for step in range(1, 7):
    log(_done(step), None, write_now=step % 4 == 0)
    written_after[step] = [s for s, _ in writer.lines]
  assert written_after[2] == [], "step 2 (a log step) was read at once"
  assert written_after[3] == [2], "step 2 was not written after step 3"
  assert written_after[4] == [2, 4], (
      "step 4 is checkpointed: its line must be on disk before the "
      f"checkpoint, got {written_after[4]}")
  assert written_after[6] == [2, 4], written_after
  log.end()
  assert [s for s, _ in writer.lines] == [2, 4, 6], "end() lost step 6"
  assert writer.lines[0][1]["tokens_seen"] == 20, writer.lines[0]


def test_an_evaluated_step_is_written_at_once_with_what_its_checks_add():
  writer, seen = _Lines(), []

  def check(step, record):
    seen.append((step, dict(record)))
    return {"checked": True}

  log = _metric_log(writer, checks=[check])
  log(_done(3), {"eval_loss": 1.5}, write_now=False)  # not a log step
  assert [s for s, _ in writer.lines] == [3], writer.lines
  assert writer.lines[0][1]["eval_loss"] == 1.5
  assert seen and seen[0][0] == 3, "the checks did not see the record"
  assert writer.lines[0][1]["checked"], "what a check returns is not written"


@pytest.mark.parametrize("every,at_last,at_start,due", [
    (3, True, False, [False, False, False, True, False, False, True, True]),
    (3, False, True, [True, False, False, True, False, False, True, False]),
    (0, True, False, [False] * 7 + [True])])
def test_a_cadence_is_due_every_n_steps_at_the_last_and_at_the_start(
    every, at_last, at_start, due):
  cadence = actions.Cadence(every, at_last=at_last, at_start=at_start)
  got = [cadence.due(step, is_last=step == 7) for step in range(8)]
  assert got == due, f"Cadence({every}, {at_last}, {at_start}): {got}"


class _Reporter(actions.PeriodicAction):
  """Reports `metrics` (and a stop) at the steps in `at`."""

  def __init__(self, at, metrics=None, stop=None):
    self.at, self.metrics, self.stop, self.calls = at, metrics, stop, []

  def due(self, done):
    return done.step in self.at

  def __call__(self, done):
    self.calls.append(done.step)
    return actions.Report(metrics=self.metrics or {}, stop=self.stop)


class _Checkpointing:
  """Records what `AfterStep` asks the checkpoint stage."""

  def __init__(self, every):
    self.every, self.calls = every, []

  def due(self, done):
    return done.step % self.every == 0

  def __call__(self, done, *, stopping, eval_loss):
    self.calls.append((done.step, stopping, eval_loss))
    return actions.Saved(done.step, True, "ckpt", "kept")

  def end(self):
    pass

  def close(self):
    pass


def test_after_step_assembles_the_record_from_the_reports_and_stops_in_order():
  writer, stopped = _Lines(), []
  evaluation = _Reporter({4}, {"eval_loss": 2.0})
  signal = _Reporter({5}, stop=lambda saved: stopped.append(saved.step))
  alarms = records.HealthAlarms.__new__(records.HealthAlarms)
  alarms.halt_on_alarm, alarms._alarms = False, (-1, [])  # never halts
  checkpointing = _Checkpointing(every=3)
  after = actions.AfterStep([signal, evaluation], _metric_log(writer),
                            alarms, checkpointing)
  stops = [after(_done(step)) for step in range(1, 6)]
  assert stops == [False] * 4 + [True], stops
  assert evaluation.calls == [4] and signal.calls == [5], (
      "a reporter ran off its cadence")
  assert [s for s, r in writer.lines if "eval_loss" in r] == [4], (
      writer.lines)
  assert checkpointing.calls == [(1, False, None), (2, False, None),
                                 (3, False, None), (4, False, 2.0),
                                 (5, True, None)], checkpointing.calls
  assert stopped == [5], "the stop ran before (or without) its checkpoint"


