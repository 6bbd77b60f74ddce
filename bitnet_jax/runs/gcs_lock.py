"""The one-writer lock of a gs:// workdir, through GCS generation preconditions.

GCS has no hard links, renames or mtimes to set, so `lock.WorkdirLock`'s
protocol becomes one of object generations
(https://cloud.google.com/storage/docs/request-preconditions):
  * acquire: upload `run.lock` with `if_generation_match=0`, which GCS
    performs only if no such object exists: of two racing writers exactly one
    wins;
  * heartbeat: rewrite the object with `if_generation_match=<ours>`; its
    `updated` time is the heartbeat. A failed precondition means the lock was
    taken over, and is logged as lost;
  * takeover of a stale lock (the same rules as `WorkdirLock`): delete it with
    `if_generation_match=<the generation judged stale>`, so a lock recreated
    meanwhile by another taker is never deleted;
  * release: delete with `if_generation_match=<ours>`.

Before creating, the lock is also looked up, which refuses a second writer on
servers that ignore preconditions (gcp-storage-emulator, used by the tests,
does not enforce them; on GCS the precondition closes the remaining race).
"""

from __future__ import annotations

import json
import threading

from absl import logging
from google.api_core import exceptions as gcs_errors
from google.cloud import storage

from bitnet_jax.runs import lock
from bitnet_jax.storage import deadline, paths


class GcsWorkdirLock(lock.WorkdirLock):
  """`lock.WorkdirLock` for a `gs://BUCKET/RUN` workdir (see module doc).

  Args: as `lock.WorkdirLock`; `workdir` must start with gs://.

  Raises:
    ValueError: for a workdir that is not gs://BUCKET/PATH, and the
      `WorkdirLock` argument checks.
    google.api_core.exceptions.GoogleAPICallError: a GCS error other than a
      failed precondition (a missing bucket, permissions), on acquire.
  """

  def __init__(self, workdir: str, *, stale_seconds: float,
               heartbeat_seconds: float = 30.0):
    super().__init__(workdir, stale_seconds=stale_seconds,
                     heartbeat_seconds=heartbeat_seconds)
    self._bucket_name, self._name = paths.split_gcs(self.path)
    self._bucket = None
    self._data = b""
    self._generation: int | None = None

  def _blob(self) -> storage.Blob:
    if self._bucket is None:
      self._bucket = paths.gcs_bucket(self._bucket_name)
    return self._bucket.blob(self._name)

  def acquire(self) -> None:
    """Takes the lock (see the module doc); starts the heartbeat.

    Raises:
      WorkdirLockedError: a live run holds the lock; the message names it.
      RuntimeError: if this object already holds the lock.
    """
    if self.held:
      raise RuntimeError(f"{self.path} is already held by this lock; "
                         "release() it before acquiring again.")
    token, record = lock.new_record()
    self._data = json.dumps(record).encode()
    deadline.call(lambda: self._take(token), "locking", self.path)
    self._token = token
    self._stop.clear()
    self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                    name=f"GcsWorkdirLock({self.workdir})")
    self._thread.start()

  def _take(self, token: str) -> None:
    """Creates the lock object, taking a stale one over; raises
    WorkdirLockedError for a live holder or endless contention."""
    for _ in range(lock._MAX_ATTEMPTS):  # pylint: disable=protected-access
      if self._create():
        return
      self._take_over_if_stale(token)  # raises if the holder is alive
    raise lock.WorkdirLockedError(
        f"{self.path} stayed contended for {lock._MAX_ATTEMPTS} "  # pylint: disable=protected-access
        "attempts: other processes keep taking it. Make sure one run uses "
        "this workdir, or use another --workdir.")

  def _create(self) -> bool:
    """Creates the lock object; False if one exists."""
    blob = self._blob()
    if blob.exists():
      return False
    try:
      blob.upload_from_string(self._data, content_type="application/json",
                              if_generation_match=0)
    except gcs_errors.PreconditionFailed:
      return False
    self._generation = blob.generation
    return True

  def _take_over_if_stale(self, token: str) -> None:
    """Deletes a stale lock (one WARNING), else raises WorkdirLockedError."""
    del token
    self._blob()  # opens the bucket
    blob = self._bucket.get_blob(self._name)
    if blob is None:
      return  # released meanwhile: retry
    try:
      holder = json.loads(blob.download_as_bytes(
          if_generation_match=blob.generation))
      holder = holder if isinstance(holder, dict) else None
    except (gcs_errors.NotFound, gcs_errors.PreconditionFailed):
      return  # replaced or removed meanwhile: retry
    except ValueError:
      holder = None
    mtime = blob.updated.timestamp()
    reason = self._stale_reason(holder, mtime)
    if reason is None:
      raise lock.WorkdirLockedError(self._locked_message(holder, mtime))
    try:
      blob.delete(if_generation_match=blob.generation)
    except (gcs_errors.NotFound, gcs_errors.PreconditionFailed):
      return  # another process took it over first: retry the race
    logging.warning("Taking over the stale lock %s of %s: %s.", self.path,
                    lock._describe(holder), reason)  # pylint: disable=protected-access

  def _heartbeat(self) -> None:
    """Rewrites the lock with our generation as precondition, until released
    or the lock is lost."""
    while not self._stop.wait(self.heartbeat_seconds):
      if self._token is None:
        return
      blob = self._blob()
      try:
        blob.upload_from_string(self._data, content_type="application/json",
                                if_generation_match=self._generation)
        self._generation = blob.generation
      except (gcs_errors.PreconditionFailed, gcs_errors.NotFound):
        logging.error("Lost the lock %s: it was deleted or taken over by "
                      "another process; another run may now write to %s.",
                      self.path, self.workdir)
        return
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Could not refresh the lock %s: %s", self.path, e)

  def release(self) -> None:
    """Stops the heartbeat and deletes the lock if it is still ours
    (idempotent; another holder's lock stays, with a WARNING)."""
    if self._stop_heartbeat() is None:
      return
    try:
      deadline.call(lambda: self._blob().delete(
          if_generation_match=self._generation), "unlocking", self.path)
    except gcs_errors.NotFound:
      pass
    except gcs_errors.PreconditionFailed:
      logging.warning("Not removing %s: another process holds it now.",
                      self.path)


def workdir_lock(workdir: str, *, stale_seconds: float,
                 heartbeat_seconds: float = 30.0) -> lock.WorkdirLock:
  """The one-writer lock for `workdir`: `GcsWorkdirLock` for gs://,
  `lock.WorkdirLock` for a local (or mounted) directory.

  Raises:
    ValueError: for another URL scheme (s3://, …), naming --workdir.
  """
  if paths.is_url(workdir):
    if not str(workdir).startswith("gs://"):
      raise ValueError(f"--workdir={workdir}: only local directories and "
                       "gs://BUCKET/RUN are supported as run directories.")
    return GcsWorkdirLock(workdir, stale_seconds=stale_seconds,
                          heartbeat_seconds=heartbeat_seconds)
  return lock.WorkdirLock(workdir, stale_seconds=stale_seconds,
                              heartbeat_seconds=heartbeat_seconds)

