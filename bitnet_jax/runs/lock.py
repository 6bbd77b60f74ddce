"""One writer per workdir: an exclusive lock file `WORKDIR/run.lock`.

Without it, the same command started twice on one workdir trains twice: every
step is logged twice and two lineages of checkpoints interleave. The lock file
holds JSON naming its holder:

  {"host": ..., "pid": ..., "pid_start_ticks": ..., "started": ISO UTC,
   "token": random hex, "argv": [...]}

`pid_start_ticks` is field 22 of `/proc/<pid>/stat` (the process start time in
clock ticks since boot, Linux only; null elsewhere); it tells a reused pid from
the holder. While held, a daemon thread refreshes the file's mtime every
`heartbeat_seconds` (the heartbeat).

A lock is stale, and taken over with one WARNING, when
  * its holder ran on this host and its pid is gone, a zombie, or now belongs
    to a process with another start time (pid reused);
  * its holder ran on another host and its heartbeat is older than
    `stale_seconds` (config.train.lock_stale_seconds); pids of other hosts
    cannot be checked.

Acquisition is atomic: the holder record is written to a temporary file that
is then hard-linked to `run.lock` (`os.link` fails if it exists), so of two
racing processes exactly one wins. A takeover first renames the stale file to
a name unique to the taker; only the process whose rename succeeded goes on,
and it checks that the file it moved is the one it judged stale.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import socket
import sys
import threading
import time
from typing import Any

from absl import logging

from bitnet_jax.runs.directory import RUN_LOCK
from bitnet_jax.storage import paths
from bitnet_jax.storage.files import (
  process_exists,
  process_start_ticks,
  utc_now,
)

_MAX_ATTEMPTS = 10  # acquire retries after losing a race (each is a new race)


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir; the message names it and the fix."""


class WorkdirLock:
  """An exclusive, stale-aware lock on a workdir; also a context manager.

  Args:
    workdir: the run's directory (created if missing); the lock file is
      `workdir/run.lock`.
    stale_seconds: a lock of another host whose heartbeat (mtime) is older
      than this many seconds is taken over. Must exceed `heartbeat_seconds`.
    heartbeat_seconds: seconds between refreshes of the lock's mtime while
      held.

  Raises:
    ValueError: if `heartbeat_seconds` <= 0 or `stale_seconds` <=
      `heartbeat_seconds` (a live holder would look stale between beats).
  """

  def __init__(self, workdir: str, *, stale_seconds: float,
               heartbeat_seconds: float = 30.0):
    if heartbeat_seconds <= 0:
      raise ValueError(f"WorkdirLock(heartbeat_seconds={heartbeat_seconds!r})"
                       " must be > 0 seconds.")
    if stale_seconds <= heartbeat_seconds:
      raise ValueError(
          f"WorkdirLock(stale_seconds={stale_seconds!r}) must exceed "
          f"heartbeat_seconds={heartbeat_seconds!r}: a live holder would look "
          "stale between heartbeats. Raise config.train.lock_stale_seconds.")
    self.workdir = paths.resolve(workdir)  # gs://… stays a URL (gcs_lock)
    self.path = paths.join(self.workdir, RUN_LOCK)
    self.stale_seconds = float(stale_seconds)
    self.heartbeat_seconds = float(heartbeat_seconds)
    self._token: str | None = None
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  @property
  def held(self) -> bool:
    """Whether this object acquired the lock and has not released it."""
    return self._token is not None

  def acquire(self) -> None:
    """Takes the lock, taking over a stale one; starts the heartbeat.

    Raises:
      WorkdirLockedError: a live run holds the lock (or it stays contended
        after repeated races); the message names the holder and the fix.
      RuntimeError: if this object already holds the lock.
    """
    if self.held:
      raise RuntimeError(f"{self.path} is already held by this WorkdirLock; "
                         "release() it before acquiring again.")
    os.makedirs(self.workdir, exist_ok=True)
    token, record = new_record()
    tmp = f"{self.path}.tmp.{token}"
    with open(tmp, "w") as f:
      json.dump(record, f)
      f.flush()
      os.fsync(f.fileno())
    try:
      for _ in range(_MAX_ATTEMPTS):
        if self._create(tmp, record):
          break
        self._take_over_if_stale(token)  # raises if the holder is alive
      else:
        raise WorkdirLockedError(
            f"{self.path} stayed contended for {_MAX_ATTEMPTS} attempts: "
            "other processes keep taking it. Make sure one run uses this "
            "workdir, or use another --workdir.")
    finally:
      _remove(tmp)
    self._token = token
    self._stop.clear()
    self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                    name=f"WorkdirLock({self.workdir})")
    self._thread.start()

  def _create(self, tmp: str, record: dict[str, Any]) -> bool:
    """Atomically creates the lock from `tmp`; False if it exists."""
    try:
      os.link(tmp, self.path)
      return True
    except FileExistsError:
      return False
    except OSError as e:  # no hard links here (some network filesystems)
      if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP,
                         errno.EXDEV, errno.EMLINK):
        raise
    try:
      fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      json.dump(record, f)
    return True

  def _take_over_if_stale(self, token: str) -> None:
    """Moves a stale lock aside (logging one WARNING), else raises.

    Returns normally when the caller should retry creating the lock: after a
    takeover, or when the lock vanished or another process moved it first.
    """
    try:
      mtime = os.stat(self.path).st_mtime
    except FileNotFoundError:
      return  # released meanwhile: retry
    holder = _read_record(self.path)
    reason = self._stale_reason(holder, mtime)
    if reason is None:
      raise WorkdirLockedError(self._locked_message(holder, mtime))
    aside = f"{self.path}.stale.{token}"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return  # another process moved it first: retry the race
    moved = _read_record(aside)
    if _token_of(moved) != _token_of(holder):
      # Between our read and our rename, another process took the stale lock
      # over and created its own: put that live lock back and retry.
      try:
        os.link(aside, self.path)
      except FileExistsError:
        logging.error("%s: moved a live lock of %s aside during a takeover "
                      "race and could not restore it; that run's lock is "
                      "now %s", self.path, _describe(moved), aside)
        return
      _remove(aside)
      return
    _remove(aside)
    logging.warning("Taking over the stale lock %s of %s: %s.", self.path,
                    _describe(holder), reason)

  def _stale_reason(self, holder: dict[str, Any] | None,
                    mtime: float) -> str | None:
    """Why the lock is stale, or None while its holder may be alive."""
    age = time.time() - mtime
    if holder is None or not isinstance(holder.get("pid"), int):
      if age > self.stale_seconds:
        return (f"the lock file is unreadable and unrefreshed for "
                f"{age:.0f} s > stale_seconds={self.stale_seconds:g}")
      return None
    if holder.get("host") == socket.gethostname():
      pid = holder["pid"]
      if not process_exists(pid):
        return f"process {pid} no longer exists on this host"
      recorded, current = holder.get("pid_start_ticks"), \
          process_start_ticks(pid)
      if recorded is not None and current is not None and recorded != current:
        return (f"pid {pid} now belongs to another process (start time "
                f"{current} ticks, the holder's was {recorded})")
      return None
    if age > self.stale_seconds:
      return (f"its heartbeat is {age:.0f} s old > stale_seconds="
              f"{self.stale_seconds:g} (config.train.lock_stale_seconds)")
    return None

  def _locked_message(self, holder: dict[str, Any] | None,
                      mtime: float) -> str:
    age = time.time() - mtime
    if holder is None:
      who = "a run whose lock file cannot be read (being written?)"
    else:
      who = _describe(holder)
    other_host = holder is None or holder.get("host") != socket.gethostname()
    takeover = (f" It is taken over automatically once unrefreshed for "
                f"{self.stale_seconds:g} s (config.train.lock_stale_seconds)."
                if other_host else "")
    return (
        f"Workdir {self.workdir} is in use by {who}; its lock {self.path} "
        f"was refreshed {age:.0f} s ago. Two runs in one workdir would "
        f"interleave their steps and checkpoints.{takeover} Fix: wait for "
        "that run to finish, use another --workdir, or, if you are sure the "
        f"holder is gone (e.g. its host died), delete {self.path}.")

  def _heartbeat(self) -> None:
    """Refreshes the lock's mtime until released or the lock is lost."""
    while not self._stop.wait(self.heartbeat_seconds):
      token = self._token
      if token is None:
        return
      if _token_of(_read_record(self.path)) != token:
        logging.error("Lost the lock %s: it was deleted or taken over by "
                      "another process; another run may now write to %s.",
                      self.path, self.workdir)
        return
      try:
        os.utime(self.path)
      except OSError as e:
        logging.warning("Could not refresh the lock %s: %s", self.path, e)

  def release(self) -> None:
    """Stops the heartbeat and removes the lock if it is still ours.

    A lock now holding another token (taken over by someone else) stays in
    place, with a WARNING. Idempotent: releasing twice, or an unacquired
    lock, does nothing.
    """
    token = self._stop_heartbeat()
    if token is None:
      return
    current = _token_of(_read_record(self.path))
    if current == token:
      _remove(self.path)
    elif current is not None:
      logging.warning("Not removing %s: another process holds it now.",
                      self.path)

  def _stop_heartbeat(self) -> str | None:
    """Forgets the token and joins the heartbeat; returns the token that
    was held (None if not held)."""
    token, self._token = self._token, None
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    return token

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc_info) -> None:
    self.release()


def new_record() -> tuple[str, dict[str, Any]]:
  """(token, the lock record of this process holding it): see module doc."""
  token = secrets.token_hex(16)
  return token, {"host": socket.gethostname(), "pid": os.getpid(),
                 "pid_start_ticks": process_start_ticks(os.getpid()),
                 "started": utc_now(), "token": token,
                 "argv": list(sys.argv)}


def _read_record(path: str) -> dict[str, Any] | None:
  """The lock's JSON record, or None if missing or unreadable."""
  try:
    with open(path) as f:
      record = json.load(f)
  except (OSError, ValueError):
    return None
  return record if isinstance(record, dict) else None


def _token_of(record: dict[str, Any] | None) -> str | None:
  return None if record is None else record.get("token")


def _describe(holder: dict[str, Any] | None) -> str:
  """'host H, pid P, started T, command C' of a lock record."""
  if holder is None:
    return "an unreadable lock record"
  argv = holder.get("argv")
  command = " ".join(map(str, argv)) if isinstance(argv, list) else argv
  return (f"host {holder.get('host')}, pid {holder.get('pid')}, started "
          f"{holder.get('started')}, command: {command}")


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except FileNotFoundError:
    pass
