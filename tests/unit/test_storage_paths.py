"""Run-directory paths: gs:// URLs are left alone, local paths made absolute
(the gs:// runs themselves: tests/integration/test_gcs.py)."""

import os

from bitnet_jax.storage import paths


def test_paths_leave_urls_alone_and_make_local_paths_absolute():
  assert paths.resolve("gs://b/run/") == "gs://b/run"
  assert paths.join("gs://b/run", "checkpoints", "3") == (
      "gs://b/run/checkpoints/3")
  assert paths.parent("gs://b/run/checkpoints") == "gs://b/run"
  assert paths.resolve("run") == os.path.join(os.getcwd(), "run"), (
      "a relative local path was not made absolute")
