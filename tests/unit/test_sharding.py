"""The device mesh and parameter shardings (training on the mesh:
tests/integration/test_sharded_training.py)."""

import jax
import numpy as np
import pytest

from bitnet_jax.config import ConfigError
from bitnet_jax.distributed import sharding


def test_parameter_spec_shards_the_largest_divisible_dimension():
  assert sharding.parameter_spec((64, 128), 4) == jax.sharding.PartitionSpec(
      None, "fsdp")
  assert sharding.parameter_spec((512, 6), 4) == jax.sharding.PartitionSpec(
      "fsdp", None)
  assert sharding.parameter_spec((64,), 4) == jax.sharding.PartitionSpec()
  assert sharding.parameter_spec((5, 7), 4) == jax.sharding.PartitionSpec()


def test_mesh_sizes_must_cover_the_devices(tiny_config):
  tiny_config.mesh.data, tiny_config.mesh.fsdp = 3, 1
  with pytest.raises(ConfigError, match="config.mesh.data=3"):
    sharding.make_mesh(tiny_config.mesh)
  tiny_config.mesh.data, tiny_config.mesh.fsdp = -1, 4
  assert dict(sharding.make_mesh(tiny_config.mesh).shape) == {
      "data": 2, "fsdp": 4}, "-1 must fill the remaining devices"


def test_batch_not_divisible_by_the_mesh_is_rejected(tiny_config):
  mesh = sharding.make_mesh(tiny_config.mesh)  # data=-1 -> 8 devices
  with pytest.raises(ConfigError, match="config.train.batch_size=6"):
    sharding.global_batch(np.zeros((6, 33), np.int32), mesh)
