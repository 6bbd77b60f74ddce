"""Train steps compiled at several device counts and micro-batchings: gradient
accumulation equals one step on the whole batch; dropout is seeded and acts
in every micro-batch. (Single-step properties: tests/unit/test_steps.py.)"""

import jax
import numpy as np
import pytest

from unit.test_steps import _one_step, _packed_batch


@pytest.mark.slow
@pytest.mark.parametrize("accum,n_devices", [(4, 1), (2, 4)])
def test_accumulated_micro_batches_equal_one_step_on_the_whole_batch(
    tiny_model_config, accum, n_devices):
  tiny_model_config.optimizer.warmup_steps = 0  # a real update at step 1
  # an update linear in the gradient (Adam's g / (|g| + eps) ~ g for eps 1,
  # no clipping), so the parameters compare the gradients themselves; with
  # eps 1e-8, g / |g| amplifies float noise in gradients near 0
  tiny_model_config.optimizer.eps = 1.0
  tiny_model_config.optimizer.grad_clip_norm = 0.0
  tiny_model_config.mesh.data = n_devices
  batch = _packed_batch(tiny_model_config)
  devices = jax.devices()[:n_devices]
  whole, whole_out = _one_step(tiny_model_config, batch, devices)
  tiny_model_config.train.grad_accum_steps = accum
  accumulated, out = _one_step(tiny_model_config, batch, devices)
  for name in ("loss", "accuracy", "grad_norm"):
    np.testing.assert_allclose(out[name], whole_out[name], rtol=1e-5,
                               err_msg=f"accumulated {name} differs")
  for (path, a), w in zip(jax.tree_util.tree_leaves_with_path(accumulated),
                          jax.tree.leaves(whole)):
    np.testing.assert_allclose(
        a, w, rtol=1e-6, atol=1e-9,
        err_msg=f"after accumulation {jax.tree_util.keystr(path)} differs")
  assert out["grad_norm"] > 0, "no gradient: the test is vacuous"



@pytest.mark.slow
def test_the_train_step_applies_dropout_reproducibly(tiny_model_config):
  tiny_model_config.mesh.data = 1
  batch = _packed_batch(tiny_model_config)
  devices = jax.devices()[:1]
  _, plain = _one_step(tiny_model_config, batch, devices)
  tiny_model_config.model.dropout_rate = 0.3
  _, dropped = _one_step(tiny_model_config, batch, devices)
  _, again = _one_step(tiny_model_config, batch, devices)
  assert abs(dropped["nll"] - plain["nll"]) > 1e-3, (
      f"dropout 0.3 left the step's loss at {plain['nll']:.5f}")
  assert dropped["nll"] == again["nll"], "the dropout masks are not seeded"
  tiny_model_config.train.grad_accum_steps = 2
  _, micro = _one_step(tiny_model_config, batch, devices)
  assert abs(micro["nll"] - plain["nll"]) > 1e-3, (
      "no dropout in accumulated micro-batches")

