"""gs:// run directories against a real GCS API server on loopback.

`gcp-storage-emulator` (PyPI) serves the GCS JSON API; gcsfs (through
etils.epath) and tensorstore (orbax's array writer) are pointed at it with
`STORAGE_EMULATOR_HOST` and `TENSORSTORE_GCS_HTTP_URL`. Nothing is mocked.
"""

import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from bitnet_jax import checkpoint, paths
from test_checkpoint import _abstract, _iterator, _save_steps, _state

BUCKET = "bitnet-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs():
  """Starts the emulator; yields the gs:// URL of an empty bucket."""
  executable = shutil.which("gcp-storage-emulator",
                            path=os.path.dirname(sys.executable))
  if executable is None:
    pytest.skip("gcp-storage-emulator is not installed: pip install -e "
                "'.[test]' brings it")
  port = _free_port()
  server = subprocess.Popen(
      [executable, "start", "--host=localhost", f"--port={port}",
       "--in-memory", f"--default-bucket={BUCKET}", "--quiet"],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 30
  while True:
    try:
      socket.create_connection(("localhost", port), timeout=1).close()
      break
    except OSError:
      if time.monotonic() > deadline or server.poll() is not None:
        server.kill()
        pytest.fail(f"the GCS emulator did not start on port {port}")
      time.sleep(0.2)
  url = f"http://localhost:{port}"
  saved = {k: os.environ.get(k) for k in (
      "STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
      "GOOGLE_AUTH_TOKEN_FOR_TESTING")}
  os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
                    GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator")
  try:
    yield f"gs://{BUCKET}"
  finally:
    server.kill()
    server.wait()
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value


def test_paths_leave_urls_alone_and_make_local_paths_absolute():
  assert paths.resolve("gs://b/run/") == "gs://b/run"
  assert paths.join("gs://b/run", "checkpoints", "3") == (
      "gs://b/run/checkpoints/3")
  assert paths.parent("gs://b/run/checkpoints") == "gs://b/run"
  assert paths.resolve("run") == os.path.join(os.getcwd(), "run"), (
      "a relative local path was not made absolute")


def test_checkpoints_save_and_restore_on_gcs(gcs):
  directory = f"{gcs}/roundtrip/checkpoints"
  ckpt = checkpoint.Checkpointer(directory, keep=2)
  _save_steps(ckpt, {1: 5.0, 2: None})
  ckpt.close()
  reopened = checkpoint.Checkpointer(directory, keep=2)
  assert reopened.all_steps() == [1, 2], reopened.all_steps()
  restored = reopened.restore(_abstract(_state()), _iterator())
  assert restored is not None and restored.step == 2
  assert restored.run == {"tokens_seen": 20}, restored.run
  np.testing.assert_array_equal(restored.state["params"]["w"],
                                _state()["params"]["w"])
  reopened.close()


def test_a_damaged_checkpoint_on_gcs_is_moved_aside(gcs):
  from etils import epath
  run = f"{gcs}/damaged"
  ckpt = checkpoint.Checkpointer(f"{run}/checkpoints", keep=3)
  _save_steps(ckpt, {1: None, 2: None})
  ckpt.close()
  epath.Path(f"{run}/checkpoints/2/state").rmtree()

  reopened = checkpoint.Checkpointer(f"{run}/checkpoints", keep=3)
  restored = reopened.restore(_abstract(_state()), _iterator())
  assert restored is not None and restored.step == 1, (
      "the previous checkpoint was not restored from gs://")
  moved = [p.name for p in epath.Path(
      f"{run}/{checkpoint.DAMAGED_DIR}").iterdir()]
  assert len(moved) == 1 and moved[0].startswith("2-"), (
      f"damaged checkpoint not kept aside on gs://: {moved}")
  assert reopened.all_steps() == [1]
  reopened.close()


def test_a_second_writer_of_a_gcs_workdir_is_refused_until_released(gcs):
  from bitnet_jax import gcs_lock, run_lock
  workdir = f"{gcs}/locked"
  first = gcs_lock.workdir_lock(workdir, stale_seconds=60,
                                heartbeat_seconds=1)
  assert isinstance(first, gcs_lock.GcsWorkdirLock)
  first.acquire()
  second = gcs_lock.workdir_lock(workdir, stale_seconds=60,
                                 heartbeat_seconds=1)
  with pytest.raises(run_lock.WorkdirLockedError) as caught:
    second.acquire()
  assert f"{workdir}/run.lock" in str(caught.value), str(caught.value)
  generation = first._generation  # pylint: disable=protected-access
  time.sleep(2.5)  # heartbeats rewrite the object under our generation
  assert first._generation != generation, (  # pylint: disable=protected-access
      "the heartbeat did not rewrite the lock object")
  blob = first._bucket.get_blob(first._name)  # pylint: disable=protected-access
  assert blob.generation == first._generation, (  # pylint: disable=protected-access
      "the stored lock is not the heartbeat's")
  first.release()
  second.acquire()
  assert second.held, "the lock was not free after release"
  second.release()


def test_a_dead_holders_gcs_lock_is_taken_over(gcs):
  from etils import epath
  from bitnet_jax import gcs_lock
  import json as json_lib
  workdir = f"{gcs}/dead-holder"
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  epath.Path(f"{workdir}/run.lock").write_text(json_lib.dumps(
      {"host": socket.gethostname(), "pid": int(dead.stdout), "token": "x"}))
  lock = gcs_lock.workdir_lock(workdir, stale_seconds=60)
  lock.acquire()
  assert lock.held, "a lock of a process that no longer exists was kept"
  lock.release()


def test_training_into_gs_is_refused_instead_of_writing_a_local_gs_folder(
    tiny_config, tmp_path, monkeypatch):
  from bitnet_jax import config as config_lib
  from bitnet_jax import train
  monkeypatch.chdir(tmp_path)
  with pytest.raises(config_lib.ConfigError, match="gcsfuse"):
    train.train_and_evaluate(tiny_config, "gs://bucket/run")
  assert not os.path.exists(tmp_path / "gs:"), (
      "a local folder named gs: was created for a gs:// workdir")


def _upload_tree(local: str, url: str) -> None:
  from etils import epath
  for parent_dir, _, names in os.walk(local):
    for name in names:
      source = os.path.join(parent_dir, name)
      relative = os.path.relpath(source, local).replace(os.sep, "/")
      with open(source, "rb") as f:
        epath.Path(f"{url}/{relative}").write_bytes(f.read())


def test_a_run_copied_to_gcs_loads_as_the_local_one(gcs, tiny_config,
                                                    tmp_path):
  import jax
  from bitnet_jax import runs, train
  tiny_config.train.steps = 4
  tiny_config.train.checkpoint_every = 4
  tiny_config.optimizer.warmup_steps = 1
  local = str(tmp_path / "run")
  train.train_and_evaluate(tiny_config, local)
  url = f"{gcs}/copied-run"
  _upload_tree(local, url)

  config, params, step = runs.load_run(url)
  local_config, local_params, local_step = runs.load_run(local)
  assert step == local_step == 4, (step, local_step)
  assert config.to_dict() == local_config.to_dict(), (
      "the gs:// run's config.json was read differently")
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params),
                          jax.tree_util.tree_leaves(local_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b),
                                  err_msg=f"{path} differs")
  with open(runs.tokenizer_path(url), "rb") as f, open(
      runs.tokenizer_path(local), "rb") as g:
    assert f.read() == g.read(), "the downloaded tokenizer.json differs"
  with pytest.raises(Exception, match="--step=9"):
    runs.load_run(url, step=9)
