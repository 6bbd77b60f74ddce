"""One writer per workdir, between processes: a live holder process refuses,
a killed one's lock is taken over, racers take a stale lock exactly once
(the lock's rules alone: tests/unit/test_run_lock.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from bitnet_jax.runs.lock import WorkdirLock, WorkdirLockedError

from drivers import REPO, lock_token, write_lock

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
    assert lock_token(lock.path) == lock._token, "stale lock was not replaced"
  finally:
    lock.release()


def test_racing_processes_take_over_a_stale_lock_exactly_once(tmp_path):
  workdir = tmp_path / "work"
  write_lock(workdir, host="other-host", pid=1, age_seconds=3600)
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
