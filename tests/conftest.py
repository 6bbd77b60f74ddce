"""Shared test setup: 8 simulated CPU devices and one data cache per session."""

import os
import tempfile

# Must be set before jax is imported anywhere: tests may build multi-device
# meshes; single-device tests simply use the first device.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8")
# Implicit rank promotion ([n] + [n, 1] -> [n, n]) hides shape bugs: make it
# an error here and in the subprocesses tests start (they inherit os.environ).
os.environ["JAX_NUMPY_RANK_PROMOTION"] = "raise"
# Nothing is downloaded in tests: lm-eval's datasets and transformers' models
# come from files the tests write (and a hub dataset fails at once).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# Many tests (and the runs they start in subprocesses) compile the same tiny
# programs: JAX's persistent compilation cache, shared by the pytest-xdist
# workers and their subprocesses, compiles each once per machine. Keys hash
# the program, flags and jax version, so stale entries only miss.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), "bitnet_jax_tests_jax_cache"))
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_numpy_rank_promotion", "raise")  # if imported earlier

import pytest


# The slowest test files first (from `--durations=0` on 2 cores): CI's
# pytest-xdist workers (`-n 2 --dist loadfile`) take files in collection
# order (pyproject's `--no-loadscope-reorder`), so the longest ones start
# early instead of leaving one worker running alone at the end. Files not
# listed follow in their usual order.
_SLOWEST_FIRST = (
    "test_multihost.py", "test_evaluation.py", "test_resilience.py",
    "test_hf.py", "test_train.py", "test_aot.py", "test_distill.py",
    "test_experiments.py", "test_gcs.py", "test_scan.py", "test_steps.py",
    "test_sharding.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


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
