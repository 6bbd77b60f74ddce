"""One writer per workdir: live holders refuse, stale locks are taken over
(with other processes holding and racing: test_run_lock_processes.py in
tests/integration)."""

from __future__ import annotations

import logging
import os
import socket
import time

import pytest

from bitnet_jax.runs.lock import WorkdirLock, WorkdirLockedError
from bitnet_jax.storage import files

from drivers import lock_token, write_lock

WAIT_SECONDS = 120  # generous bound on the heartbeat thread; never a sleep


def test_another_hosts_lock_with_an_old_heartbeat_is_taken_over(tmp_path,
                                                                 caplog):
  path = write_lock(tmp_path, host="other-host", pid=1, age_seconds=3600)
  lock = WorkdirLock(str(tmp_path), stale_seconds=60)
  with caplog.at_level(logging.WARNING):
    lock.acquire()
  try:
    assert lock_token(path) == lock._token, "stale lock was not taken over"
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "other-host" in warnings[0], (
        f"want one WARNING naming the old holder, got {warnings}")
  finally:
    lock.release()


def test_another_hosts_lock_with_a_fresh_heartbeat_is_refused(tmp_path):
  path = write_lock(tmp_path, host="other-host", pid=1, age_seconds=5)
  lock = WorkdirLock(str(tmp_path), stale_seconds=60)
  with pytest.raises(WorkdirLockedError, match="other-host"):
    lock.acquire()
  assert lock_token(path) == "other-token", "a live lock was modified"


def test_a_reused_pid_on_this_host_is_stale(tmp_path):
  ticks = files.process_start_ticks(os.getpid())
  if ticks is None:
    pytest.skip("no /proc/<pid>/stat: pid reuse cannot be detected here")
  # This test's own pid is alive but started at another time: pid reused.
  path = write_lock(tmp_path, host=socket.gethostname(), pid=os.getpid(),
                     age_seconds=0, pid_start_ticks=ticks + 1)
  with WorkdirLock(str(tmp_path), stale_seconds=60) as lock:
    assert lock_token(path) == lock._token, "a reused pid kept its lock"


def test_a_live_pid_on_this_host_with_its_start_time_is_refused(tmp_path):
  write_lock(tmp_path, host=socket.gethostname(), pid=os.getpid(),
              age_seconds=3600,
              pid_start_ticks=files.process_start_ticks(os.getpid()))
  with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):
    WorkdirLock(str(tmp_path), stale_seconds=60).acquire()


def test_release_leaves_a_lock_that_another_process_now_holds(tmp_path):
  lock = WorkdirLock(str(tmp_path), stale_seconds=60)
  lock.acquire()
  # Someone took it over (e.g. after judging us stale) and wrote their own.
  path = write_lock(tmp_path, host="other-host", pid=1, age_seconds=0)
  lock.release()
  assert os.path.exists(path), "release() removed another holder's lock"
  assert lock_token(path) == "other-token", "another holder's lock was changed"


def test_acquire_then_release_leaves_no_file(tmp_path):
  with WorkdirLock(str(tmp_path), stale_seconds=60):
    assert os.path.exists(tmp_path / "run.lock"), "no lock while held"
  assert os.listdir(tmp_path) == [], (
      f"files left after release: {os.listdir(tmp_path)}")


def test_release_twice_is_harmless(tmp_path):
  lock = WorkdirLock(str(tmp_path), stale_seconds=60)
  lock.acquire()
  lock.release()
  lock.release()
  assert not lock.held, "lock still marked held after release()"


def test_the_heartbeat_refreshes_the_lock_mtime(tmp_path):
  lock = WorkdirLock(str(tmp_path), stale_seconds=60, heartbeat_seconds=0.05)
  with lock:
    os.utime(lock.path, (1.0, 1.0))  # as if last refreshed in 1970
    deadline = time.monotonic() + WAIT_SECONDS
    while os.stat(lock.path).st_mtime == 1.0:
      assert time.monotonic() < deadline, "heartbeat never touched the lock"
      time.sleep(0.02)


def test_stale_seconds_not_above_heartbeat_is_rejected(tmp_path):
  with pytest.raises(ValueError, match="stale_seconds"):
    WorkdirLock(str(tmp_path), stale_seconds=10, heartbeat_seconds=30)
