"""Agreement between processes: one decides or acts, all learn the outcome.

Multi-host JAX runs the same program on every host; a decision taken on one
(process 0 checks the workdir, prepares the data, judges the alarms) must
reach the others at the same point of the program, or they diverge and hang
in the next collective. Each helper is a no-op beyond its action on a
single process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

T = TypeVar("T")


def on_process_zero(action: Callable[[], T], what: str) -> T | None:
  """Runs `action` on process 0 only; every process raises if it failed.

  Args:
    action: what process 0 does (e.g. lock the workdir, check the config).
    what: the action in words, for the other processes' error.

  Returns:
    `action()`'s result on process 0, None on the others.

  Raises:
    The error of `action` on process 0; a RuntimeError naming `what` on
    the others.
  """
  result, error = None, None
  if jax.process_index() == 0:
    try:
      result = action()
    except Exception as e:  # pylint: disable=broad-except
      error = e
  if jax.process_count() > 1:
    failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
    if failed and error is None:
      raise RuntimeError(f"process 0 could not {what}; its log says why")
  if error is not None:
    raise error
  return result


def process_zero_first(action: Callable[[], T], name: str) -> T:
  """`action()` on process 0, then (once it is done) on the others.

  For work that fills a shared cache (data preparation): the other
  processes then find it done. `name` labels the barrier.
  """
  if jax.process_count() == 1:
    return action()
  result = action() if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices(f"bitnet_jax:{name}")
  return action() if result is None else result


def process_zero_decides(flag: bool) -> bool:
  """Process 0's `flag` on every process (every process must call it)."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is true on at least one."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))
