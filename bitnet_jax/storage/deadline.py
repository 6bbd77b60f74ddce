"""Deadlines on object-store operations: a gs:// run whose store stops
answering fails, naming the path and the endpoint, instead of hanging.

Local paths are never timed. On an object store each operation of a run
(checkpoint save, restore and close; metric appends; the lock; probes and
listings) runs in a helper thread that the caller waits for at most the
deadline (`train.storage_timeout_seconds`, set once per run by
`configure`). Past it, `StorageTimeoutError` is raised; the stuck request is
abandoned (its thread is a daemon and does not keep the process alive).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

DEFAULT_SECONDS = 600.0  # train.storage_timeout_seconds's default
_seconds = DEFAULT_SECONDS


class StorageTimeoutError(OSError):
  """An object-store operation got no answer in time; names what, where
  and the endpoint."""


def configure(seconds: float) -> None:
  """Sets the deadline of every later object-store operation (seconds > 0).

  Raises:
    ValueError: `seconds` <= 0.
  """
  global _seconds
  if not seconds > 0:
    raise ValueError(f"storage deadline {seconds!r} s must be > 0")
  _seconds = float(seconds)


def endpoint(path: str, *, tensorstore: bool = False) -> str:
  """The HTTP endpoint that serves `path`: an emulator's or a private
  endpoint's URL from the environment, else the public one. `tensorstore`:
  the one orbax's array writes use (`TENSORSTORE_GCS_HTTP_URL`)."""
  if str(path).startswith("gs://"):
    names = (("TENSORSTORE_GCS_HTTP_URL", "STORAGE_EMULATOR_HOST")
             if tensorstore else ("STORAGE_EMULATOR_HOST",))
    for name in names:
      if os.environ.get(name):
        return f"{os.environ[name]} (${name})"
    return "https://storage.googleapis.com"
  return str(path).split("://", 1)[0] + "://"


def call(fn: Callable[[], T], what: str, path: str, *,
         tensorstore: bool = False) -> T:
  """`fn()`, given at most the deadline when `path` is on an object store.

  Args:
    fn: the operation.
    what: what it does, for the message ("saving checkpoint").
    path: the local path or URL it works on.
    tensorstore: whether `fn` goes through TensorStore (orbax's arrays),
      for naming the endpoint.

  Raises:
    StorageTimeoutError: `fn` did not return within the deadline.
    Whatever `fn` raises.
  """
  if "://" not in str(path):
    return fn()
  outcome: dict = {}

  def run() -> None:
    try:
      outcome["value"] = fn()
    except BaseException as e:  # pylint: disable=broad-except  # noqa: BLE001
      outcome["error"] = e

  worker = threading.Thread(target=run, name=f"bitnet_jax {what}",
                            daemon=True)
  worker.start()
  worker.join(_seconds)
  if worker.is_alive():
    where = endpoint(path, tensorstore=tensorstore)
    raise StorageTimeoutError(
        f"{what} {path}: no answer from {where} within {_seconds:.0f} s "
        "(config.train.storage_timeout_seconds); "
        "check that the endpoint is reachable and the bucket exists, then "
        "rerun the same command (it resumes from the last checkpoint)")
  if "error" in outcome:
    raise outcome["error"]
  return outcome["value"]
