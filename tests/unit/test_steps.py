"""The train step: its objective as a value, gradient accumulation, the
loss mask, and its config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.config import ConfigError
from bitnet_jax.data.batch import Batch
from bitnet_jax.distributed import sharding
from bitnet_jax.optim import optimizer
from bitnet_jax.training import loss, objectives, steps, train_state


def _one_step(config, batch, devices, objective=None):
  mesh = sharding.make_mesh(config.mesh, devices)
  tx = optimizer.make_optimizer(config)
  graphdef, state, shardings = train_state.create_train_state(config, mesh, tx)
  step = steps.make_train_step(config, graphdef, tx, shardings, mesh,
                               objective or objectives.NextToken(config.train))
  state, out = step(state, sharding.global_batch(batch, mesh))
  return jax.device_get(state.params), jax.device_get(out)


def _packed_batch(config):
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, config.model.vocab_size,
                        (config.train.batch_size, config.train.seq_len + 1),
                        dtype=np.int32)
  # documents of different lengths: micro-batches count different targets
  for row in range(0, tokens.shape[0], 3):
    tokens[row, 5 + row] = 0
  return Batch.packed(tokens, 0)


def test_a_micro_batch_that_does_not_split_over_devices_is_refused(
    tiny_config):
  tiny_config.train.grad_accum_steps = 4  # batch 8 -> micro-batches of 2
  mesh = sharding.make_mesh(tiny_config.mesh)  # 8 devices
  with pytest.raises(ConfigError, match="config.train.grad_accum_steps=4"):
    steps.check_micro_batch(tiny_config, mesh)


def test_evaluation_in_micro_batches_sums_to_the_whole_batch(tiny_config):
  batch = _packed_batch(tiny_config)
  mesh = sharding.make_mesh(tiny_config.mesh)  # 8 devices, batch 8
  tiny_config.train.batch_size = 16
  batch = jax.tree.map(lambda x: np.concatenate([x, x[::-1]]), batch)
  tx = optimizer.make_optimizer(tiny_config)
  graphdef, state, shardings = train_state.create_train_state(
      tiny_config, mesh, tx)
  placed = sharding.global_batch(batch, mesh)
  totals = {}
  for accum in (1, 2):
    tiny_config.train.grad_accum_steps = accum
    step = steps.make_eval_step(tiny_config, graphdef, shardings.params,
                                mesh, objectives.NextToken(tiny_config.train))
    totals[accum] = jax.device_get(step(state.params, placed, 0))
  per_batch = ("attention_rms", "ffn_rms", "batches")  # a value per batch
  for name, value in totals[1].items():
    if name not in per_batch:
      np.testing.assert_allclose(totals[2][name], value, rtol=1e-5,
                                 err_msg=f"eval {name} in 2 micro-batches")
  assert totals[2]["batches"] == 2, totals[2]["batches"]
  for name in per_batch[:2]:  # the mean RMS of the halves ~ the whole's
    np.testing.assert_allclose(totals[2][name] / 2, totals[1][name],
                               rtol=0.05, err_msg=f"eval {name} per batch")
  assert totals[1]["count"] < 16 * tiny_config.train.seq_len, (
      "no masked positions: the weights are untested")


def test_the_int8_matmul_needs_ternary_weights(tiny_config):
  # pylint: disable-next=g-import-not-at-top
  from bitnet_jax import config as config_lib
  tiny_config.model.quantization = "none"
  tiny_config.model.bitlinear_matmul = "int8"
  with pytest.raises(ConfigError, match="config.model.bitlinear_matmul"):
    config_lib.validate(tiny_config)


class _MeanSquaredLogit(objectives.Objective):
  """A toy objective the step has never heard of: the squared top logit,
  with a second term, `mean_logit`, reported beside it."""

  def __call__(self, model, batch, frozen, **forward):
    logits = model(batch.inputs, **batch.features, **forward)
    top = jnp.max(logits, axis=-1)
    return loss.masked_sums({"loss": jnp.square(top),
                             "mean_logit": jnp.mean(logits, axis=-1)},
                            batch.loss_mask)


def test_the_step_minimizes_and_reports_whatever_objective_it_is_handed(
    tiny_config):
  tiny_config.mesh.data = 1
  tiny_config.optimizer.warmup_steps = 0
  batch = _packed_batch(tiny_config)
  _, out = _one_step(tiny_config, batch, jax.devices()[:1],
                     _MeanSquaredLogit())
  assert {"loss", "mean_logit", "grad_norm"} <= set(out), sorted(out)
  assert "nll" not in out and "accuracy" not in out, (
      f"the step reports terms its objective does not have: {sorted(out)}")
  assert out["loss"] > 0 and out["grad_norm"] > 0, out


def test_the_eval_step_weights_positions_by_the_loss_mask_only(tiny_config):
  mesh = sharding.make_mesh(tiny_config.mesh)
  tx = optimizer.make_optimizer(tiny_config)
  graphdef, state, shardings = train_state.create_train_state(
      tiny_config, mesh, tx)
  step = steps.make_eval_step(tiny_config, graphdef, shardings.params, mesh,
                              objectives.NextToken(tiny_config.train))
  batch = _packed_batch(tiny_config)
  full = jax.device_get(step(state.params,
                             sharding.global_batch(batch, mesh), 0))
  mask = np.zeros_like(batch.loss_mask)
  mask[:, -5:] = 1.0  # only the last five targets of each row (a reply)
  masked = jax.device_get(step(
      state.params, sharding.global_batch(batch.replace(loss_mask=mask),
                                          mesh), 0))
  assert masked["count"] == mask.sum(), (masked["count"], mask.sum())
  assert masked["count"] < full["count"], "the mask changed nothing"
  assert masked["loss_sum"] != full["loss_sum"], "loss ignores the mask"
