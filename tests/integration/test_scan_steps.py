"""Scanned and unrolled layers compiled into train steps: the same losses, a
step that does not grow with depth, every remat policy giving the same loss
and gradients. (Layouts and names: tests/unit/test_scan.py.)"""

import numpy as np
import pytest

from bitnet_jax.config import REMAT_POLICIES

from unit.test_scan import (
  _assert_trees_equal,
  _equations,
  _loss_and_grads,
  _losses,
)


@pytest.mark.slow
@pytest.mark.parametrize("quantization,rtol", [("none", 1e-6),
                                               ("ternary", 1e-4)])
def test_scanned_and_unrolled_runs_have_the_same_losses(tiny_model_config,
                                                        quantization, rtol):
  """Step for step; in ternary, XLA's different fusion of the two programs
  (1e-7 apart) can flip a rounding in the quantizers: 2.4e-5 at step 4 with
  seed 0, hence the looser tolerance."""
  tiny_model_config.optimizer.warmup_steps = 1  # large updates from step 2 on
  tiny_model_config.model.quantization = quantization
  scanned = _losses(tiny_model_config, True)
  unrolled = _losses(tiny_model_config, False)
  np.testing.assert_allclose(scanned, unrolled, rtol=rtol, err_msg=(
      "the scanned model's losses differ from the unrolled model's"))
  assert len(set(scanned)) == len(scanned), "the loss did not move"



def test_the_scanned_step_does_not_grow_with_depth(tiny_model_config):
  """Compile time follows program size: scanning keeps it flat in depth."""
  scanned = [_equations(tiny_model_config, n, True) for n in (2, 6)]
  unrolled = [_equations(tiny_model_config, n, False) for n in (2, 6)]
  assert scanned[0] == scanned[1], (
      f"scanned gradient program has {scanned} equations at 2 and 6 layers")
  assert unrolled[1] > unrolled[0], (
      f"unrolled program {unrolled} did not grow: the test is vacuous")



@pytest.mark.slow
def test_every_remat_policy_gives_the_same_loss_and_gradients(tiny_model_config):
  """(Scanned; the unrolled loop wraps each block in the same function.)"""
  reference, reference_grads, plain = _loss_and_grads(tiny_model_config, "none")
  assert "remat" not in plain and "checkpoint" not in plain
  for policy in REMAT_POLICIES[1:]:
    value, grads, jaxpr = _loss_and_grads(tiny_model_config, policy)
    assert "remat" in jaxpr or "checkpoint" in jaxpr, (
        f"remat_policy={policy!r} put no jax.checkpoint in the program")
    np.testing.assert_allclose(value, reference, rtol=1e-6,
                               err_msg=f"{policy}: loss differs")
    _assert_trees_equal(grads, reference_grads, f"{policy} gradients",
                        rtol=1e-5, atol=1e-7)

