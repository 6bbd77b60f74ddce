"""Files that survive kills: atomic writes, temporary paths, process liveness.

What several modules need to write a file that readers see whole or not at
all, to recognize and remove the temporary files of dead writers, and to tell
whether a process still lives (`run_lock`, the token cache, `run_identity`,
metric files).
"""

from __future__ import annotations

import datetime
import os
import re
import socket
import time

from absl import logging

from bitnet_jax.storage import paths

# Another host's temporary file unmodified this long belongs to a dead writer
# (a live one appends a chunk every few seconds).
STALE_TEMPORARY_SECONDS = 24 * 3600
_TEMPORARY = re.compile(r".\.tmp\.(?P<host>[^/]+)\.(?P<pid>[0-9]+)$")


def process_start_ticks(pid: int) -> int | None:
  """Start time of process `pid` in clock ticks since boot, or None.

  Reads field 22 of `/proc/<pid>/stat` (Linux). Returns None where that file
  does not exist or cannot be parsed (no such process, or not Linux).
  """
  stat = _read_proc_stat(pid)
  return None if stat is None else stat[1]


def _read_proc_stat(pid: int) -> tuple[str, int] | None:
  """(state letter, start ticks) of `pid` from /proc, or None."""
  try:
    with open(f"/proc/{pid}/stat", "rb") as f:
      text = f.read().decode("utf-8", "replace")
  except OSError:
    return None
  # Field 2 (comm) is parenthesized and may hold spaces: split after it.
  fields = text[text.rfind(")") + 2:].split()
  try:
    return fields[0], int(fields[19])  # fields 3 (state) and 22 (starttime)
  except (IndexError, ValueError):
    return None


def process_exists(pid: int) -> bool:
  """Whether a process `pid` exists on this host (zombies count as gone)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except (PermissionError, OverflowError):  # another user's; not a pid_t
    return True
  stat = _read_proc_stat(pid)
  return stat is None or stat[0] not in ("Z", "X")


def utc_now() -> str:
  """The current UTC time, ISO 8601 to the second (lock and history files)."""
  return datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds")


def temporary_path(path: str) -> str:
  """Returns a sibling of `path` unique to this host and process."""
  return f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"


def remove_stale_temporaries(directory: str,
                             max_age_seconds: float = STALE_TEMPORARY_SECONDS
                             ) -> list[str]:
  """Deletes `temporary_path` files under `directory` left by dead writers.

  A process killed while writing leaves `<path>.tmp.<host>.<pid>` behind
  (e.g. a partial `tokens.bin` of gigabytes). Such a file, anywhere under
  `directory` (searched recursively), is removed when its writer is dead:
  on this host, when process `pid` no longer exists; written by another
  host, when unmodified for `max_age_seconds` (default 24 h), since other
  hosts' processes cannot be probed. A live process's file is never
  removed (hosts sharing `directory` must have distinct hostnames, as
  `temporary_path` already assumes). Each removal is logged as a warning.

  Args:
    directory: the data cache root (`pipeline.data_root`).
    max_age_seconds: age, by mtime, after which another host's temporary
      file counts as abandoned.

  Returns:
    The removed paths, sorted.

  Raises:
    OSError: when a stale file exists but cannot be deleted (permissions).
  """
  host, now, removed = socket.gethostname(), time.time(), []
  for parent, _, files in os.walk(directory):
    for name in files:
      match = _TEMPORARY.search(name)
      if match is None:
        continue
      path = os.path.join(parent, name)
      pid = int(match["pid"])
      if name.endswith(f".tmp.{host}.{pid}"):
        if process_exists(pid):
          continue
        reason = f"its writer, process {pid} on this host, is dead"
      else:
        try:
          age = now - os.path.getmtime(path)
        except FileNotFoundError:  # renamed into place meanwhile
          continue
        if age < max_age_seconds:
          continue
        reason = (f"written by host {match['host']}, unmodified for "
                  f"{age / 3600:.0f} h")
      try:
        os.remove(path)
      except FileNotFoundError:
        continue
      logging.warning("Removed the stale temporary file %s (%s)", path,
                      reason)
      removed.append(path)
  return sorted(removed)


def write_atomically(path: str, data: bytes) -> None:
  """Writes `data` to `path` via a temporary file and `os.replace`.

  Readers see either the old file or the complete new one, never a partial
  one; concurrent writers (hosts sharing a filesystem) use distinct temporary
  names and the last one wins. On an object store (gs://) one upload, which
  replaces the object atomically (`paths.write_bytes`).
  """
  if paths.is_url(path):
    paths.write_bytes(path, data)
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = temporary_path(path)
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
