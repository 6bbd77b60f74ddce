"""The train loop's structure: the start plan and the periodic actions."""

import numpy as np
import pytest

from bitnet_jax import metrics
from bitnet_jax.training import actions
from bitnet_jax.training import setup
from bitnet_jax.training import loop


class _Lines:
  """A MetricWriter stand-in that keeps (step, record) in write order."""

  def __init__(self):
    self.lines = []

  def write(self, step, record):
    self.lines.append((step, dict(record)))

  def close(self):
    pass


def _metric_log(writer, observers=(), checkpoint_every=4):
  throughput = metrics.Throughput(tokens_per_step=10, total_steps=100)
  throughput.begin()
  return actions.MetricLog(
      every=2, total_steps=100, writer=writer, throughput=throughput,
      tokens_seen=lambda step: 10 * step, flops_per_token=1.0,
      peak_flops=None, observers=list(observers),
      writes_now=lambda done: done.step % checkpoint_every == 0)


def _done(step, **fields):
  return actions.StepDone(step, state=None,
                          metrics={"loss": np.float32(step), "nll":
                                   np.float32(step)}, **fields)


def test_a_log_step_is_written_one_step_late_unless_it_is_checkpointed():
  writer = _Lines()
  log = _metric_log(writer)
  written_after = {}
  for step in range(1, 7):
    log(_done(step))
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


def test_an_evaluated_step_is_written_at_once_with_its_eval_metrics():
  writer, seen = _Lines(), []
  log = _metric_log(writer, observers=[lambda s, r: seen.append((s, r))])
  log(_done(3, evaluation={"eval_loss": 1.5}))  # not a log step
  assert [s for s, _ in writer.lines] == [3], writer.lines
  assert writer.lines[0][1]["eval_loss"] == 1.5
  assert seen and seen[0][0] == 3, "the observers did not see the record"


@pytest.mark.slow
def test_a_new_periodic_action_sees_every_step_and_the_plan_says_finished(
    tiny_config, tmp_path):
  config = tiny_config
  config.train.steps, config.optimizer.warmup_steps = 12, 2
  config.train.log_every, config.train.eval_every = 3, 6
  config.train.checkpoint_every = 6
  workdir = str(tmp_path)

  class Recorder(actions.PeriodicAction):
    def __init__(self):
      self.steps, self.ended = [], False

    def __call__(self, done):
      self.steps.append((done.step, int(done.state.step)))

    def end(self):
      self.ended = True

  built = setup.build_run(config, workdir)
  assert built.start is setup.Start.FRESH and built.start_step == 0, built.start
  recorder = Recorder()
  built.actions.append(recorder)
  final = loop.train(built)
  assert recorder.steps == [(s, s) for s in range(1, 13)], recorder.steps
  assert recorder.ended, "end() was not called after the last step"
  assert final["step"] == 12 and "eval_loss" in final, final

  finished = setup.build_run(config, workdir)
  assert isinstance(finished, setup.Finished) and finished.step == 12, finished
  assert finished.metrics["eval_loss"] == final["eval_loss"]
  config.train.steps = 18
  resumed = setup.build_run(config, workdir)
  assert resumed.start is setup.Start.RESUME and resumed.start_step == 12, (
      resumed.start, resumed.start_step)
  for action in reversed(resumed.actions):
    action.close()
