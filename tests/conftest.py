"""Shared test setup for both tiers: 8 simulated CPU devices, a data cache
per worker, and one prepared tiny corpus and one trained tiny run per session.

The tests come in two tiers (pyproject's `testpaths` is the unit tier):

    pytest                     # tests/unit: one function or module each,
                               # under 2 minutes on 2 cores
    pytest tests/integration   # training runs, subprocesses of the commands,
                               # several hosts, the GCS emulator, the HF /
                               # GGUF / lm-eval round trips
    pytest tests               # both (CI: `-n 2 --dist loadfile tests`)

tests/drivers.py and tests/gcs_server.py serve both tiers (pyproject's
`pythonpath` puts tests/ on sys.path).
"""

import json
import os
import pathlib
import shutil
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

import bitnet_jax  # noqa: E402,F401  (first: imports JAX quietly on a CPU host with the CUDA plugin)
import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update("jax_numpy_rank_promotion", "raise")  # if imported earlier

import filelock
import pytest

# The slowest test files first (from `--durations=0` on 2 cores): CI's
# pytest-xdist workers (`-n 2 --dist loadfile`) take files in collection
# order (pyproject's `--no-loadscope-reorder`), so the longest ones start
# early instead of leaving one worker running alone at the end. Files not
# listed follow in their usual order. Names are unique across the tiers.
_SLOWEST_FIRST = (
    # tests/integration (test_compile.py second: it needs no data, so the
    # worker that takes it does not wait while the other builds data_dir)
    "test_multihost.py", "test_compile.py", "test_resilience.py",
    "test_evaluation.py", "test_gcs.py", "test_hf_export.py",
    "test_train.py", "test_stream_training.py", "test_distill_steps.py",
    "test_data_stdlib.py", "test_steps_compiled.py", "test_health_run.py",
    "test_hf_sources.py", "test_scan_steps.py", "test_hf_import.py",
    "test_distill_runs.py", "test_sharded_training.py",
    "test_experiments.py", "test_scan_resume.py",
    "test_data_without_tensorflow.py", "test_remedies_training.py",
    "test_verify_stdlib.py", "test_verify_command.py",
    "test_actions_in_a_run.py", "test_launch_slurm.py",
    # tests/unit
    "test_decode.py", "test_distill.py", "test_remedies.py", "test_steps.py",
    "test_loss.py", "test_data.py", "test_model.py", "test_golden.py",
    "test_hf_layout.py", "test_metrics.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


from drivers import load_config as _load_config  # noqa: E402


@pytest.fixture
def load_config():
  """Returns a loader: load_config("configs/d20.py:cpu") -> ConfigDict."""
  return _load_config


@pytest.fixture
def tiny_config(tmp_path_factory):
  """A fresh configs/tiny.py config whose `data.data_dir` is where the
  session's `data_dir` is (or will be) prepared. The unit tier's tests only
  read its model and train fields; tests/integration/conftest.py's
  `tiny_config` prepares the data first.
  """
  config = _load_config("configs/tiny.py")
  config.data.data_dir = str(_session_root(tmp_path_factory) / "data")
  return config


def _session_root(tmp_path_factory) -> pathlib.Path:
  """The temporary directory the pytest-xdist workers of a session share."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # pytest-N/, above each worker's popen-gwK/
  return root


def _built_once(tmp_path_factory, name: str, build) -> pathlib.Path:
  """The session's directory `name`, made by `build(path)` once.

  The pytest-xdist workers of a session share it: the first to ask builds
  it under a file lock in their common temporary directory, the others wait
  for it.
  """
  root = _session_root(tmp_path_factory)
  path, done = root / name, root / f"{name}.done"
  with filelock.FileLock(str(root / f"{name}.lock")):
    if not done.exists():
      shutil.rmtree(path, ignore_errors=True)  # a failed build's remains
      build(path)
      done.touch()
  return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  """A data directory holding configs/tiny.py's corpus, tokenizer and token
  caches (about 35 s to build on 2 cores), prepared once per session and
  shared by the workers. Tests of other corpora or vocabularies add their
  caches beside them (`data.prepare` writes atomically and never removes a
  live writer's files); never edit or delete what is in it.
  """
  def prepare(path):
    from bitnet_jax import data  # pylint: disable=g-import-not-at-top
    config = _load_config("configs/tiny.py")
    config.data.data_dir = str(path)
    data.prepare(config)

  return str(_built_once(tmp_path_factory, "data", prepare))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir) -> str:
  """configs/tiny.py (60 steps, the session's data cache) trained once per
  session and shared by the workers, for tests that only read a run:
  generate, evaluate, export. Never write into it: copy it first
  (shutil.copytree).
  """
  def train(workdir):
    from bitnet_jax.training import loop  # pylint: disable=g-import-not-at-top
    config = _load_config("configs/tiny.py")
    config.data.data_dir = data_dir
    final = loop.train_and_evaluate(config, str(workdir))
    with open(f"{workdir}.json", "w", encoding="utf-8") as f:
      json.dump(final, f, default=lambda x: x.item())  # numpy scalars

  return str(_built_once(tmp_path_factory, "trained_run", train))


@pytest.fixture(scope="session")
def trained_run_final(trained_run) -> dict:
  """What `train_and_evaluate` returned for `trained_run`: its last record."""
  with open(f"{trained_run}.json", encoding="utf-8") as f:
    return json.load(f)
