"""A (data=2, fsdp=4) mesh trains as one device does: five steps of the tiny
config on the session's data, sharded and not (the mesh and parameter specs
alone: tests/unit/test_sharding.py)."""

import jax
import numpy as np
import pytest

from bitnet_jax import data
from bitnet_jax.distributed import sharding
from bitnet_jax.optim import optimizer
from bitnet_jax.training import steps, train_state
from bitnet_jax.training.objectives import NextToken


def _setup(config, devices):
  mesh = sharding.make_mesh(config.mesh, devices)
  tx = optimizer.make_optimizer(config)
  graphdef, state, shardings = train_state.create_train_state(config, mesh, tx)
  step = steps.make_train_step(config, graphdef, tx, shardings, mesh,
                               NextToken(config.train))
  return mesh, state, shardings, step


def _batches(config, count=5):
  iterator = data.train_iterator(data.prepare(config), config)
  return [next(iterator) for _ in range(count)]


def _trajectory(config, batches, devices):
  """Losses of consecutive steps, and the per-step metrics and states."""
  mesh, state, _, step = _setup(config, devices)
  host_states, step_metrics = [], []
  for batch in batches:
    host_states.append(jax.device_get(state))
    state, out = step(state, sharding.global_batch(batch, mesh))
    step_metrics.append(jax.device_get(out))
  return [float(m["loss"]) for m in step_metrics], step_metrics, host_states


def _use_mesh(config, data_size, fsdp_size):
  config.mesh.data, config.mesh.fsdp = data_size, fsdp_size
  return config


@pytest.mark.slow
def test_eight_device_mesh_matches_one_device_full_precision(tiny_config):
  """The 5-step trajectory on (data=2, fsdp=4) equals one device's."""
  assert jax.device_count() == 8, "conftest must simulate 8 CPU devices"
  tiny_config.model.quantization = "none"
  batches = _batches(tiny_config)
  single, _, _ = _trajectory(_use_mesh(tiny_config, 1, 1), batches,
                             jax.devices()[:1])
  sharded, _, _ = _trajectory(_use_mesh(tiny_config, 2, 4), batches,
                              jax.devices())
  np.testing.assert_allclose(sharded, single, rtol=1e-5, err_msg=(
      "losses on the (data=2, fsdp=4) mesh differ from one device"))
  assert single[-1] != single[0], "the losses did not move: vacuous test"


@pytest.mark.slow
def test_eight_device_mesh_matches_one_device_ternary_step_by_step(
    tiny_config):
  """From the same state, each sharded ternary step equals one device's.

  Over several steps the two trajectories drift apart by ~1e-5: round() in
  the ternary quantizer turns float32 reduction-order noise into discrete
  flips. So each step starts from the one-device state, re-sharded. Within a
  step, the fsdp matmuls' reduction order can flip one activation code too;
  one flip moved grad_norm by 2e-4 (relative) at step 0 with seed 0, hence its
  looser tolerance. (Full precision matches exactly: the test above.)
  """
  batches = _batches(tiny_config)
  _, single, states = _trajectory(_use_mesh(tiny_config, 1, 1), batches,
                                  jax.devices()[:1])
  mesh, _, shardings, step = _setup(_use_mesh(tiny_config, 2, 4),
                                    jax.devices())
  for k, (batch, host_state) in enumerate(zip(batches, states)):
    state = jax.device_put(host_state, shardings)
    state, out = step(state, sharding.global_batch(batch, mesh))
    for name, rtol in (("loss", 2e-5), ("grad_norm", 1e-3)):
      np.testing.assert_allclose(
          out[name], single[k][name], rtol=rtol,
          err_msg=f"step {k}: sharded {name} differs from one device")
  kernel = state.params["layers"]["mlp"]["gate_proj"]["kernel"]
  assert kernel.sharding.spec[0] is None and "fsdp" in kernel.sharding.spec, (
      f"{kernel.sharding.spec}: scanned [layers, in, out] kernels must shard "
      "a weight dimension over fsdp, never the layers axis")
  shard_shape = kernel.addressable_shards[0].data.shape
  assert np.prod(shard_shape) * 4 == kernel.size, (
      f"a device holds {shard_shape} of {kernel.shape}: not sharded 4 ways")
  assert shard_shape[0] == kernel.shape[0], "a device lacks some layers"
  adam_mu = state.opt_state[-1].inner_state[0].mu["embed_tokens"][
      "embedding"]
  assert "fsdp" in adam_mu.sharding.spec, "optimizer state not sharded"
