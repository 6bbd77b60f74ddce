"""The train loop's structure in a 12-step run: a new periodic action sees
every step, and the start plan says finished, then resumes (the actions
alone: tests/unit/test_actions.py)."""

import pytest

from bitnet_jax.training import actions, loop, setup


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

    def due(self, done):
      return True

    def __call__(self, done):
      self.steps.append((done.step, int(done.state.step)))
      return actions.NOTHING

    def end(self):
      self.ended = True

  built = setup.build_run(config, workdir)
  assert built.start is setup.Start.FRESH and built.start_step == 0, built.start
  recorder = Recorder()
  built.after_step.reporters.append(recorder)
  final = loop.train(built)
  assert recorder.steps == [(s, s) for s in range(13)], recorder.steps
  assert recorder.ended, "end() was not called after the last step"
  assert final["step"] == 12 and "eval_loss" in final, final

  finished = setup.build_run(config, workdir)
  assert isinstance(finished, setup.Finished) and finished.step == 12, finished
  assert finished.metrics["eval_loss"] == final["eval_loss"]
  config.train.steps = 18
  resumed = setup.build_run(config, workdir)
  assert resumed.start is setup.Start.RESUME and resumed.start_step == 12, (
      resumed.start, resumed.start_step)
  for action in reversed(resumed.after_step.actions):
    action.close()
