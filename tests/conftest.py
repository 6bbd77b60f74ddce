"""Shared test setup: 8 simulated CPU devices and one data cache per session."""

import os

# Must be set before jax is imported anywhere: tests may build multi-device
# meshes; single-device tests simply use the first device.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")
# Implicit rank promotion ([n] + [n, 1] -> [n, n]) hides shape bugs: make it
# an error here and in the subprocesses tests start (they inherit os.environ).
os.environ["JAX_NUMPY_RANK_PROMOTION"] = "raise"

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_numpy_rank_promotion", "raise")  # if imported earlier

import pytest


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  """A data directory shared by the session: corpora and tokens build once."""
  return str(tmp_path_factory.mktemp("data"))


from drivers import load_config as _load_config  # noqa: E402


@pytest.fixture
def load_config():
  """Returns a loader: load_config("configs/d20.py:cpu") -> ConfigDict."""
  return _load_config


@pytest.fixture
def tiny_config(data_dir):
  """A fresh configs/tiny.py config reading the session's data cache."""
  config = _load_config("configs/tiny.py")
  config.data.data_dir = data_dir
  return config
