"""One writer per workdir: live holders refuse, stale locks are taken over."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from bitnet_jax.storage import files
from bitnet_jax.runs import lock
from bitnet_jax.runs.lock import WorkdirLock, WorkdirLockedError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT_SECONDS = 120  # generous bound on a child's start-up; never a sleep

# A child that tries to acquire, reports "won" or "refused" in a file, then
# holds until the test creates the release file (or it is killed).
CHILD = """
import os, sys, time
from bitnet_jax.runs.lock import WorkdirLock, WorkdirLockedError
workdir, report, release = sys.argv[1:4]
lock = WorkdirLock(workdir, stale_seconds=60, heartbeat_seconds=1)
try:
  lock.acquire()
  result = "won"
except WorkdirLockedError:
  result = "refused"
with open(report + ".tmp", "w") as f:
  f.write(result)
os.replace(report + ".tmp", report)
while not os.path.exists(release):
  time.sleep(0.05)
lock.release()
"""


def _start_child(workdir, tmp_path, name: str) -> tuple[subprocess.Popen,
                                                        str, str]:
  report = str(tmp_path / f"{name}.report")
  release = str(tmp_path / f"{name}.release")
  child = subprocess.Popen(
      [sys.executable, "-c", CHILD, str(workdir), report, release],
      cwd=REPO, stderr=subprocess.PIPE, text=True)
  return child, report, release


def _wait_for_report(child: subprocess.Popen, report: str) -> str:
  deadline = time.monotonic() + WAIT_SECONDS
  while not os.path.exists(report):
    if child.poll() is not None:
      pytest.fail(f"lock child exited with {child.returncode} before "
                  f"reporting: {child.stderr.read()}")
    if time.monotonic() > deadline:
      pytest.fail(f"lock child did not report within {WAIT_SECONDS} s")
    time.sleep(0.02)
  with open(report) as f:
    return f.read()


@pytest.fixture
def holder(tmp_path):
  """A child process holding tmp_path/"work"; killed after the test."""
  workdir = tmp_path / "work"
  child, report, _ = _start_child(workdir, tmp_path, "holder")
  try:
    assert _wait_for_report(child, report) == "won", "holder did not lock"
    yield child, workdir
  finally:
    if child.poll() is None:
      child.kill()
    child.wait()
    child.stderr.close()


def _write_lock(workdir, *, host: str, pid: int, age_seconds: float,
                token: str = "other-token", **extra) -> str:
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, lock.LOCK_NAME)
  record = {"host": host, "pid": pid, "started": "2024-01-01T00:00:00+00:00",
            "token": token, "argv": ["train", "--workdir", str(workdir)],
            **extra}
  with open(path, "w") as f:
    json.dump(record, f)
  then = time.time() - age_seconds
  os.utime(path, (then, then))
  return path


def _token(path: str) -> str:
  with open(path) as f:
    return json.load(f)["token"]


def test_a_live_holder_process_refuses_acquire_naming_its_pid_and_host(
    holder):
  child, workdir = holder
  lock = WorkdirLock(str(workdir), stale_seconds=60)
  with pytest.raises(WorkdirLockedError) as error:
    lock.acquire()
  message = str(error.value)
  assert f"pid {child.pid}" in message, f"holder pid missing: {message}"
  assert socket.gethostname() in message, f"holder host missing: {message}"
  assert "run.lock" in message, f"the fix must name the lock: {message}"


def test_the_lock_of_a_killed_holder_is_taken_over(holder):
  child, workdir = holder
  child.send_signal(signal.SIGKILL)
  child.wait()  # reaped: the pid no longer exists
  lock = WorkdirLock(str(workdir), stale_seconds=60)
  lock.acquire()
  try:
    assert _token(lock.path) == lock._token, "stale lock was not replaced"
  finally:
    lock.release()


def test_another_hosts_lock_with_an_old_heartbeat_is_taken_over(tmp_path,
                                                                 caplog):
  path = _write_lock(tmp_path, host="other-host", pid=1, age_seconds=3600)
  lock = WorkdirLock(str(tmp_path), stale_seconds=60)
  with caplog.at_level(logging.WARNING):
    lock.acquire()
  try:
    assert _token(path) == lock._token, "stale lock was not taken over"
    warnings = [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "other-host" in warnings[0], (
        f"want one WARNING naming the old holder, got {warnings}")
  finally:
    lock.release()


def test_another_hosts_lock_with_a_fresh_heartbeat_is_refused(tmp_path):
  path = _write_lock(tmp_path, host="other-host", pid=1, age_seconds=5)
  lock = WorkdirLock(str(tmp_path), stale_seconds=60)
  with pytest.raises(WorkdirLockedError, match="other-host"):
    lock.acquire()
  assert _token(path) == "other-token", "a live lock was modified"


def test_a_reused_pid_on_this_host_is_stale(tmp_path):
  ticks = files.process_start_ticks(os.getpid())
  if ticks is None:
    pytest.skip("no /proc/<pid>/stat: pid reuse cannot be detected here")
  # This test's own pid is alive but started at another time: pid reused.
  path = _write_lock(tmp_path, host=socket.gethostname(), pid=os.getpid(),
                     age_seconds=0, pid_start_ticks=ticks + 1)
  with WorkdirLock(str(tmp_path), stale_seconds=60) as lock:
    assert _token(path) == lock._token, "a reused pid kept its lock"


def test_a_live_pid_on_this_host_with_its_start_time_is_refused(tmp_path):
  _write_lock(tmp_path, host=socket.gethostname(), pid=os.getpid(),
              age_seconds=3600,
              pid_start_ticks=files.process_start_ticks(os.getpid()))
  with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):
    WorkdirLock(str(tmp_path), stale_seconds=60).acquire()


def test_release_leaves_a_lock_that_another_process_now_holds(tmp_path):
  lock = WorkdirLock(str(tmp_path), stale_seconds=60)
  lock.acquire()
  # Someone took it over (e.g. after judging us stale) and wrote their own.
  path = _write_lock(tmp_path, host="other-host", pid=1, age_seconds=0)
  lock.release()
  assert os.path.exists(path), "release() removed another holder's lock"
  assert _token(path) == "other-token", "another holder's lock was changed"


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


def test_racing_processes_take_over_a_stale_lock_exactly_once(tmp_path):
  workdir = tmp_path / "work"
  _write_lock(workdir, host="other-host", pid=1, age_seconds=3600)
  children = [_start_child(workdir, tmp_path, f"racer{i}") for i in range(4)]
  try:
    results = [_wait_for_report(child, report)
               for child, report, _ in children]
  finally:
    for child, _, release in children:
      open(release, "w").close()
    for child, _, _ in children:
      child.wait(timeout=WAIT_SECONDS)
      child.stderr.close()
  assert sorted(results) == ["refused"] * 3 + ["won"], (
      f"want exactly one winner among racers, got {results}")


def test_stale_seconds_not_above_heartbeat_is_rejected(tmp_path):
  with pytest.raises(ValueError, match="stale_seconds"):
    WorkdirLock(str(tmp_path), stale_seconds=10, heartbeat_seconds=30)
