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
