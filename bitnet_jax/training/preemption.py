"""Preemption: SIGTERM / SIGINT end the run at a step with a checkpoint.

Schedulers (Kubernetes, Slurm, Cloud TPU / GPU maintenance) send SIGTERM and
wait a grace period before SIGKILL. `PreemptionWatch` turns the first SIGTERM
or SIGINT into a request that the train loop reads after each step: it then
saves that step's checkpoint synchronously, flushes the metrics and returns
(exit status 0). A second signal exits at once (status 128 + signal number),
for a user who really wants out.

Multi-host (`jax.process_count() > 1`) every process must stop at the same
step, so the decision is JAX's preemption sync point
(`multihost_utils.reached_preemption_sync_point`, the mechanism MaxText and
orbax use): JAX's distributed runtime catches SIGTERM on any process and the
processes agree on a step. SIGINT is forwarded to it as SIGTERM. When the
preemption service is off (`jax_enable_preemption_service=False`), a signal
on any host is found by an all-gather every `sync_every` steps.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from bitnet_jax.training.cadence import Cadence

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class PreemptionWatch:
  """Context manager that records the first SIGTERM / SIGINT.

  Handlers are installed only from the main thread (Python's rule); in other
  threads the watch is inert and `requested` reads the JAX sync point alone.

  Args:
    sync_every: multi-host without JAX's preemption service: steps between
      the all-gathers that spread a local signal to every process.
  """

  def __init__(self, sync_every: int = 10):
    self.sync = Cadence(sync_every, at_last=False)
    self.signal_name: str | None = None
    self._previous: dict[int, object] = {}
    self._multi = jax.process_count() > 1
    self._jax_service = self._multi and _preemption_service_enabled()

  def __enter__(self) -> PreemptionWatch:
    if threading.current_thread() is not threading.main_thread():
      return self
    for signum in _SIGNALS:
      if signum == signal.SIGTERM and self._jax_service:
        continue  # JAX's runtime owns SIGTERM and syncs the step
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum: int, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self.signal_name is not None:  # the second signal: leave now
      sys.stderr.write(f"\n{name} again: exiting at once without saving\n")
      sys.stderr.flush()
      os._exit(128 + signum)  # pylint: disable=protected-access
    self.signal_name = name
    sys.stderr.write(f"\n{name} received: finishing the step in flight and "
                     "saving a checkpoint (send it again to exit at once)\n")
    sys.stderr.flush()
    if self._jax_service and signum == signal.SIGINT:
      os.kill(os.getpid(), signal.SIGTERM)  # let JAX agree on the step

  def requested(self, step: int) -> bool:
    """True when the run should save `step` and stop (same on all hosts).

    Args:
      step: the step just completed; multi-host, every process must call
        this with the same steps (it may synchronize them).
    """
    if not self._multi:
      return self.signal_name is not None
    if self._jax_service:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal_name = self.signal_name or "SIGTERM"
        return True
      return False
    if not self.sync.due(step, is_last=False):
      return False
    flags = multihost_utils.process_allgather(
        np.int32(self.signal_name is not None))
    if np.any(flags):
      self.signal_name = self.signal_name or "a signal on another host"
      return True
    return False


def _preemption_service_enabled() -> bool:
  """True when JAX's distributed runtime runs a preemption sync manager."""
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    return distributed.global_state.preemption_sync_manager is not None
  except (ImportError, AttributeError):
    logging.warning("cannot tell whether JAX's preemption service runs; "
                    "spreading signals by all-gather instead")
    return False
