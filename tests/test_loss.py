"""The loss scores position i against token i + 1 (the seeds' copy bug)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax import loss

VOCAB = 16
CONFIDENCE = 30.0  # logit margin of the fake models below


def _incrementing_window(batch=2, length=9):
  """Windows where token i + 1 = token i + 1 (mod VOCAB): never a repeat."""
  start = jnp.arange(batch)[:, None] * 5
  return ((start + jnp.arange(length)[None]) % VOCAB).astype(jnp.int32)


def copy_model(inputs):
  """Predicts the token it is looking at (the seeds' degenerate solution)."""
  return CONFIDENCE * jax.nn.one_hot(inputs, VOCAB)


def next_token_model(inputs):
  """Predicts token + 1: correct on incrementing windows iff labels shift."""
  return CONFIDENCE * jax.nn.one_hot((inputs + 1) % VOCAB, VOCAB)


def test_split_window_shifts_targets_by_one():
  window = _incrementing_window()
  inputs, targets = loss.split_window(window)
  np.testing.assert_array_equal(inputs, window[:, :-1])
  np.testing.assert_array_equal(targets, window[:, 1:],
                                err_msg="targets are not window[:, 1:]")


def test_next_token_model_has_near_zero_loss_and_copy_model_high_loss():
  window = _incrementing_window()
  good, good_aux = loss.next_token_loss(next_token_model, {"tokens": window})
  bad, bad_aux = loss.next_token_loss(copy_model, {"tokens": window})
  assert good < 1e-3 and good_aux["accuracy"] == 1.0, (
      f"predicting token i+1 scored {good}: targets are not shifted")
  assert bad > CONFIDENCE / 2 and bad_aux["accuracy"] == 0.0, (
      f"copying token i scored {bad}: the loss rewards a copy task")


def test_loss_at_position_i_uses_token_i_plus_1():
  window = jax.random.randint(jax.random.key(0), (1, 7), 0, VOCAB)
  _, targets = loss.split_window(window)
  for i in range(6):
    logits = jnp.zeros((1, 6, VOCAB)).at[0, i, window[0, i + 1]].set(50.0)
    per_position = loss.token_losses(logits, targets)
    assert per_position[0, i] < 1e-6, (
        f"position {i}: mass on token {i + 1} not rewarded")


def test_loss_rejects_a_window_without_a_next_token():
  with pytest.raises(ValueError, match="seq_len \\+ 1"):
    loss.split_window(jnp.zeros((2, 1), jnp.int32))


def test_label_smoothing_matches_its_definition():
  logits = jax.random.normal(jax.random.key(1), (2, 3, VOCAB))
  targets = jnp.array([[1, 2, 3], [4, 5, 6]])
  log_probs = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  expected = 0.9 * nll + 0.1 * (-log_probs.mean(-1))
  np.testing.assert_allclose(
      loss.token_losses(logits, targets, label_smoothing=0.1), expected,
      rtol=1e-5, err_msg="label smoothing != (1-a) nll + a uniform CE")


def test_z_loss_adds_squared_log_partition():
  logits = jax.random.normal(jax.random.key(2), (1, 2, VOCAB)) + 3.0
  targets = jnp.array([[1, 2]])
  plain = loss.token_losses(logits, targets)
  with_z = loss.token_losses(logits, targets, z_loss_weight=1e-2)
  expected = plain + 1e-2 * jax.nn.logsumexp(logits, -1) ** 2
  np.testing.assert_allclose(with_z, expected, rtol=1e-5,
                             err_msg="z-loss is not w * logsumexp^2")


def test_the_target_starting_the_next_document_is_not_scored():
  # pylint: disable-next=g-import-not-at-top
  from bitnet_jax.data.stream import document_features
  eot = 0
  window = np.array([[5, 6, eot, 7, 8, eot, 9]], np.int32)
  batch = document_features(window, eot)
  _, targets, features, weights = loss.split_batch(batch)
  np.testing.assert_array_equal(
      weights[0], [1, 1, 0, 1, 1, 0],
      "only the positions whose input is EOT (target: next doc) get weight 0")
  np.testing.assert_array_equal(features["segment_ids"][0], [1, 1, 1, 2, 2, 2])

  def uniform_except_at_eot(inputs, **_):
    logits = jnp.zeros(inputs.shape + (10,))
    return jnp.where((inputs == eot)[..., None], -1e4 * jax.nn.one_hot(
        targets, 10), logits)  # hopeless only where the target is masked

  value, _ = loss.next_token_loss(uniform_except_at_eot, batch)
  np.testing.assert_allclose(value, np.log(10), rtol=1e-6,
                             err_msg="a cross-document position was scored")
