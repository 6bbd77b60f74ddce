"""The collapse alarms in a real run: the seeds' copy bug fires `copying`."""

import json
import os

import pytest

from bitnet_jax.data import batch as batch_lib
from bitnet_jax.metrics import health
from bitnet_jax.training import loop


def _copy_bug(monkeypatch):
  """Scores position i against token i (the seeds' first model)."""
  monkeypatch.setattr(batch_lib, "split_window",
                      lambda window: (window[:, :-1], window[:, :-1]))


def _copy_bug_config(config):
  config.train.steps = 150
  config.train.eval_every = 25
  config.train.checkpoint_every = 150
  config.train.sample_prompts = 0
  return config


def _alarms(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r["health_alarms"] for r in records
          if "health_alarms" in r}


@pytest.mark.slow
def test_unshifted_labels_fire_copying(tiny_config, tmp_path, monkeypatch):
  _copy_bug(monkeypatch)
  loop.train_and_evaluate(_copy_bug_config(tiny_config), str(tmp_path))
  alarms = _alarms(tmp_path)
  fired = [step for step, names in alarms.items() if "copying" in names]
  assert fired, f"the copy bug ran 150 steps and copying never fired: {alarms}"


@pytest.mark.slow
def test_a_healthy_tiny_run_fires_no_alarm(tiny_config, tmp_path):
  loop.train_and_evaluate(_copy_bug_config(tiny_config), str(tmp_path))
  alarms = _alarms(tmp_path)
  assert not any(alarms.values()), f"alarms on a healthy run: {alarms}"


@pytest.mark.slow
def test_halt_on_alarm_stops_with_a_checkpoint(tiny_config, tmp_path,
                                               monkeypatch):
  _copy_bug(monkeypatch)
  config = _copy_bug_config(tiny_config)
  config.health.halt_on_alarm = True
  with pytest.raises(health.HealthAlarmError, match="copying") as error:
    loop.train_and_evaluate(config, str(tmp_path))
  step = max(_alarms(tmp_path))
  assert step < config.train.steps, "the run did not stop early"
  assert os.path.isdir(tmp_path / "checkpoints" / str(step)), (
      f"no checkpoint of the halted step {step}: {error.value}")
