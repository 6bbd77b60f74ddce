"""The seeds' remedies in a run: a 40-step mHC-lite tiny run trains (the
remedies alone: tests/unit/test_remedies.py)."""

import tempfile

import pytest

from bitnet_jax import metrics
from bitnet_jax.training import loop


@pytest.mark.slow
def test_mhc_lite_model_trains(tiny_config):
  tiny_config.model.residual = "mhc_lite"
  tiny_config.train.steps = 40
  tiny_config.train.eval_every = 40
  tiny_config.train.sample_prompts = 0
  with tempfile.TemporaryDirectory() as workdir:
    final = loop.train_and_evaluate(tiny_config, workdir)
    first = metrics.final_metrics(workdir, 0)
  assert final["eval_loss"] < first["eval_loss"] - 0.5, (
      f"mHC-lite eval loss {first['eval_loss']:.3f} -> "
      f"{final['eval_loss']:.3f} in 40 steps: not training")
