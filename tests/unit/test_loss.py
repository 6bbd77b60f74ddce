"""The loss scores position i against token i + 1 (the seeds' copy bug)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.config import base_config
from bitnet_jax.data.batch import Batch, split_window
from bitnet_jax.model.transformer import bind
from bitnet_jax.training import loss
from bitnet_jax.training.objectives import NextToken
from bitnet_jax.training.objectives.next_token import mean_loss

VOCAB = 16
CONFIDENCE = 30.0  # logit margin of the fake models below


def _incrementing_window(batch=2, length=9):
  """Windows where token i + 1 = token i + 1 (mod VOCAB): never a repeat."""
  start = jnp.arange(batch)[:, None] * 5
  return ((start + jnp.arange(length)[None]) % VOCAB).astype(jnp.int32)


def copy_model(inputs):
  """Predicts the token it is looking at (the seeds' degenerate solution)."""
  return CONFIDENCE * jax.nn.one_hot(inputs, VOCAB)


def _next_token_loss(model, batch, **train_fields):
  """(mean loss, means) of the next-token objective with `train_fields`."""
  train = base_config().train
  train.update(train_fields)
  return mean_loss(NextToken(train), model, batch)


def next_token_model(inputs):
  """Predicts token + 1: correct on incrementing windows iff labels shift."""
  return CONFIDENCE * jax.nn.one_hot((inputs + 1) % VOCAB, VOCAB)


def test_split_window_shifts_targets_by_one():
  window = _incrementing_window()
  inputs, targets = split_window(window)
  np.testing.assert_array_equal(inputs, window[:, :-1])
  np.testing.assert_array_equal(targets, window[:, 1:],
                                err_msg="targets are not window[:, 1:]")


def test_next_token_model_has_near_zero_loss_and_copy_model_high_loss():
  window = _incrementing_window()
  good, good_aux = _next_token_loss(next_token_model,
                                    Batch.of_windows(window))
  bad, bad_aux = _next_token_loss(copy_model, Batch.of_windows(window))
  assert good < 1e-3 and good_aux["accuracy"] == 1.0, (
      f"predicting token i+1 scored {good}: targets are not shifted")
  assert bad > CONFIDENCE / 2 and bad_aux["accuracy"] == 0.0, (
      f"copying token i scored {bad}: the loss rewards a copy task")


@pytest.mark.slow
def test_loss_at_position_i_uses_token_i_plus_1():
  window = jax.random.randint(jax.random.key(0), (1, 7), 0, VOCAB)
  _, targets = split_window(window)
  for i in range(6):
    logits = jnp.zeros((1, 6, VOCAB)).at[0, i, window[0, i + 1]].set(50.0)
    per_position = loss.token_losses(logits, targets)
    assert per_position[0, i] < 1e-6, (
        f"position {i}: mass on token {i + 1} not rewarded")


def test_loss_rejects_a_window_without_a_next_token():
  with pytest.raises(ValueError, match="seq_len \\+ 1"):
    split_window(jnp.zeros((2, 1), jnp.int32))


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
  eot = 0
  window = np.array([[5, 6, eot, 7, 8, eot, 9]], np.int32)
  batch = Batch.packed(window, eot)
  targets = batch.targets
  np.testing.assert_array_equal(
      batch.loss_mask[0], [1, 1, 0, 1, 1, 0],
      "only the positions whose input is EOT (target: next doc) get mask 0")
  np.testing.assert_array_equal(batch.features["segment_ids"][0],
                                [1, 1, 1, 2, 2, 2])

  def uniform_except_at_eot(inputs, **_):
    logits = jnp.zeros(inputs.shape + (10,))
    return jnp.where((inputs == eot)[..., None], -1e4 * jax.nn.one_hot(
        targets, 10), logits)  # hopeless only where the target is masked

  value, _ = _next_token_loss(uniform_except_at_eot, batch)
  np.testing.assert_allclose(value, np.log(10), rtol=1e-6,
                             err_msg="a cross-document position was scored")


def test_the_loss_mask_is_the_only_loss_weight():
  """A mask that keeps some positions of plain windows (as a chat template
  sets it) makes the loss the mean over exactly those positions."""
  window = _incrementing_window(batch=2, length=9)
  mask = np.zeros((2, 8), np.float32)
  mask[0, [1, 4]] = mask[1, 7] = 1.0
  batch = Batch(tokens=window, loss_mask=mask)

  def half_right(inputs, **_):  # hits the target only at even positions
    even = (jnp.arange(inputs.shape[1]) % 2 == 0)[None, :, None]
    return jnp.where(even, next_token_model(inputs), copy_model(inputs))

  per_position = loss.logit_outputs(half_right(batch.inputs), batch.targets)
  value, means = _next_token_loss(half_right, batch)
  expected = per_position["loss"][mask > 0].mean()
  np.testing.assert_allclose(value, expected, rtol=1e-6, err_msg=(
      "the loss is not the mean over the positions the loss mask keeps"))
  np.testing.assert_allclose(means["accuracy"], 1 / 3, rtol=1e-6,
                             err_msg="accuracy ignores the loss mask")
  unmasked, _ = _next_token_loss(half_right, Batch.of_windows(window))
  assert abs(float(unmasked) - float(value)) > 1.0, (
      "the test cannot tell a masked loss from an unmasked one")


def _tiny_model_and_packed_batch(tiny_config):
  # pylint: disable-next=g-import-not-at-top
  from flax import nnx

  from bitnet_jax.model.transformer import Transformer
  model = Transformer(tiny_config.model, rngs=nnx.Rngs(0))
  seq_len = tiny_config.train.seq_len
  tokens = np.array(jax.random.randint(jax.random.key(1), (4, seq_len + 1),
                                       1, tiny_config.model.vocab_size))
  tokens[:, seq_len // 3] = 0  # an EOT: two documents per window
  return model, Batch.packed(tokens, 0)


@pytest.mark.slow
@pytest.mark.parametrize("chunk_size", [8])
def test_the_chunked_loss_equals_the_unchunked_loss_and_gradients(
    tiny_config, chunk_size):
  # pylint: disable-next=g-import-not-at-top
  from flax import nnx
  model, batch = _tiny_model_and_packed_batch(tiny_config)
  graphdef, params = nnx.split(model)[0], nnx.to_pure_dict(
      nnx.state(model, nnx.Param))

  def value(params, chunk):
    mean, aux = _next_token_loss(
        bind(graphdef, params, 0), batch, label_smoothing=0.1,
        z_loss_weight=1e-3, loss_chunk_size=chunk)
    return mean, aux

  (whole, whole_aux), whole_grads = jax.value_and_grad(value, has_aux=True)(
      params, 0)
  (chunked, aux), grads = jax.jit(jax.value_and_grad(value, has_aux=True),
                                  static_argnums=1)(params, chunk_size)
  np.testing.assert_allclose(chunked, whole, rtol=1e-6,
                             err_msg="chunked loss != unchunked loss")
  for name in ("nll", "accuracy"):
    np.testing.assert_allclose(aux[name], whole_aux[name], rtol=1e-6,
                               err_msg=f"chunked {name} differs")
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads),
                          jax.tree.leaves(whole_grads)):
    np.testing.assert_allclose(
        g, w, rtol=1e-6, atol=1e-6 * float(np.abs(w).max()),
        err_msg=f"chunked gradient {jax.tree_util.keystr(path)} differs")
  train = base_config().train
  reference = NextToken(train).outputs(model, batch)
  train.loss_chunk_size = chunk_size
  outputs = NextToken(train).outputs(model, batch)
  np.testing.assert_array_equal(outputs["prediction"],
                                reference["prediction"],
                                "chunked argmax predictions differ")


def test_the_chunked_loss_never_holds_the_whole_logits(tiny_config):
  # pylint: disable-next=g-import-not-at-top
  from flax import nnx
  model, batch = _tiny_model_and_packed_batch(tiny_config)
  graphdef, params = nnx.split(model)[0], nnx.to_pure_dict(
      nnx.state(model, nnx.Param))
  vocab, seq_len = tiny_config.model.vocab_size, tiny_config.train.seq_len

  def shapes(chunk):
    def value(params):
      return _next_token_loss(bind(graphdef, params, 0), batch,
                              loss_chunk_size=chunk)[0]
    text = str(jax.make_jaxpr(jax.grad(value))(params))
    return text

  assert f"4,{seq_len},{vocab}]" in shapes(0), "the reference lost its logits"
  chunked = shapes(8)
  assert f"4,{seq_len},{vocab}]" not in chunked, (
      "a [batch, seq_len, vocab] array exists despite loss_chunk_size=8")
  assert f"4,8,{vocab}]" in chunked, "no [batch, 8, vocab] chunk logits"
