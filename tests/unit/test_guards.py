"""Run guards: non-finite and diverged losses stop the run."""

import math

import pytest

from bitnet_jax.training import guards


def test_non_finite_grad_norm_raises_naming_the_step():
  with pytest.raises(FloatingPointError, match="grad_norm is inf at step 7"):
    guards.check_finite(7, {"loss": 2.0, "grad_norm": math.inf}, "step 5")


def test_divergence_raises_after_patience_losses_above_the_line():
  guard = guards.DivergenceGuard(factor=3.0, patience=3)
  for step, loss in enumerate([9.0, 6.0, 5.0, 5.5], start=1):
    guard.observe(step, loss, "checkpoint 2")
  guard.observe(5, 16.0, "checkpoint 2")
  guard.observe(6, 1e8, "checkpoint 2")
  with pytest.raises(guards.DivergenceError, match="running minimum 5"):
    guard.observe(7, 2e8, "checkpoint 2")


def test_a_single_spike_does_not_stop_the_run():
  guard = guards.DivergenceGuard(factor=3.0, patience=2)
  for step, loss in enumerate([5.0, 16.0, 5.1, 16.0, 5.0], start=1):
    guard.observe(step, loss, "checkpoint 0")  # never two in a row
  assert guard.minimum == 5.0


def test_the_minimum_saved_before_a_resume_counts():
  before = guards.DivergenceGuard(factor=3.0, patience=1)
  before.observe(100, 4.0, "checkpoint 0")
  guard = guards.DivergenceGuard(factor=3.0, patience=1)
  guard.restore(before.state())  # as from a checkpoint's run facts
  assert guard.is_diverged(12.5), "the pre-resume minimum was ignored"
  with pytest.raises(guards.DivergenceError):
    guard.observe(101, 12.5, "checkpoint 100")


def test_factor_zero_disables_the_guard():
  guard = guards.DivergenceGuard(factor=0.0, patience=1)
  for step, loss in enumerate([5.0, 1e9, 1e12], start=1):
    guard.observe(step, loss, "checkpoint 0")
  assert not guard.is_diverged(1e30)
