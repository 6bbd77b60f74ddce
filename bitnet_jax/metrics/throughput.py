"""Speed: tokens/s, step time, FLOPs per token and MFU.

MFU = tokens/s x FLOPs per token / the devices' summed dense bf16 peak
(MaxText's convention, whatever `model.dtype` is).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from bitnet_jax.model.tree_paths import path_keys

# Dense (no sparsity) bf16 peak FLOP/s per JAX device, from the vendors' spec
# sheets; `mfu` divides by it whatever model.dtype is (MaxText's convention).
# Keys are `device_kind` prefixes; the longest matching one wins.
PEAK_FLOPS_PER_DEVICE = {
    "TPU v4": 275e12,  # one chip (megacore) per device
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # v5p's device_kind (v5e is "TPU v5 lite")
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "NVIDIA H100": 989e12,  # SXM (device_kind "NVIDIA H100 80GB HBM3")
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,  # same tensor cores as H100 SXM, more memory
    "NVIDIA GH200": 989e12,
    "NVIDIA A100": 312e12,  # SXM4 and PCIe, 40 and 80 GB
}


def flops_per_token(n_matmul_params: int, n_layers: int, d_model: int,
                    seq_len: int) -> float:
  """Training FLOPs per token: 6N + 12 L d T (PaLM, arXiv 2204.02311, B)."""
  return 6.0 * n_matmul_params + 12.0 * n_layers * d_model * seq_len


def matmul_params(params: Any, model_config: Any) -> int:
  """Parameters used in matmuls (the N of `flops_per_token`): every
  `kernel` (block linears, lm_head) in either layer layout, plus the
  embedding when it doubles as the lm_head (`config.model.tie_embeddings`).
  """
  m = model_config
  tied = m.vocab_size * m.d_model if m.tie_embeddings else 0
  return tied + sum(
      int(np.prod(x.shape)) for path, x in
      jax.tree_util.tree_leaves_with_path(params)
      if path_keys(path)[-1] == "kernel")


def device_peak_flops(device_kind: str) -> float | None:
  """Peak dense bf16 FLOP/s of one device of `device_kind`, None if unknown
  (then no `mfu` is reported)."""
  matches = [k for k in PEAK_FLOPS_PER_DEVICE if device_kind.startswith(k)]
  return PEAK_FLOPS_PER_DEVICE[max(matches, key=len)] if matches else None


def peak_flops(devices: list[jax.Device]) -> float | None:
  """Summed peak FLOP/s of `devices`, or None where a kind is unknown."""
  peaks = [device_peak_flops(d.device_kind) for d in devices]
  return None if None in peaks else float(sum(peaks))


class Throughput:
  """Wall-clock rates between log lines: steps/s, tokens/s and the ETA.

  Train steps are dispatched asynchronously: when an evaluation starts,
  several may still be queued on the device. `paused(ready=state)` waits
  for them before it stops the clock, so their time counts as training and
  the evaluation's does not (else an evaluated step would report the
  queue's time as free: absurd tokens/s and ETA).

  Args:
    tokens_per_step: global batch x seq_len.
    total_steps: the run's last step, for the ETA.
    clock: seconds, monotonic (`time.perf_counter`; tests pass their own).
  """

  def __init__(self, tokens_per_step: int, total_steps: int,
               clock: Callable[[], float] = time.perf_counter):
    self.tokens_per_step = tokens_per_step
    self.total_steps = total_steps
    self.clock = clock
    self._time, self._step = None, None
    self.timed_seconds, self.timed_steps = 0.0, 0  # summed over the run
    self.first_step_seconds = None  # compilation + the first step and batch
    self._first_began = None

  def begin(self) -> None:
    """Marks the dispatch of this start's first step: its time, compilation
    included, is `first_step_seconds` (`first_step_done`)."""
    self._first_began = self.clock()

  def first_step_done(self, step: int) -> None:
    """The first step (`step`) has finished: times it, then starts timing
    the rates from it (compilation is not training time)."""
    self.first_step_seconds = self.clock() - self._first_began
    self.start(step)

  def start(self, step: int) -> None:
    """Starts timing at `step` (after compilation, or after an evaluation)."""
    self._time, self._step = self.clock(), step

  @contextlib.contextmanager
  def paused(self, ready: Any = None) -> Iterator[None]:
    """Leaves the time spent inside the block (an evaluation) out of the
    rates: the clock restarts where it stood.

    Args:
      ready: the train state (any pytree of arrays) the block reads; the
        steps still computing it finish, on the clock, before the pause.
    """
    if ready is not None:
      jax.block_until_ready(ready)
    began = self.clock()
    try:
      yield
    finally:
      pause = self.clock() - began
      if self._time is not None:
        self._time += pause
      elif self._first_began is not None:
        self._first_began += pause

  def measure(self, step: int) -> dict[str, float]:
    """Rates since the last call; `{}` if no step has passed."""
    now = self.clock()
    if self._time is None or step <= self._step:
      return {}
    seconds = now - self._time
    self.timed_seconds += seconds
    self.timed_steps += step - self._step
    steps_per_sec = (step - self._step) / seconds
    self._time, self._step = now, step
    return {"steps_per_sec": steps_per_sec,
            "step_time_ms": 1e3 / steps_per_sec,
            "tokens_per_sec": steps_per_sec * self.tokens_per_step,
            "eta_seconds": (self.total_steps - step) / steps_per_sec}

  def summary(self, flops_per_token: float, peak: float | None,
              device: str) -> str:
    """The run's one-line performance summary (logged at its end).

    Args:
      flops_per_token: model FLOPs per trained token (`flops_per_token`).
      peak: summed peak FLOP/s of the devices (`peak_flops`), None if
        unknown (no MFU then).
      device: what ran it, e.g. "8 x cpu".
    """
    if not self.timed_steps:
      return "performance: no timed steps (the run did not train)"
    tokens_per_sec = self.timed_steps * self.tokens_per_step / (
        self.timed_seconds)
    step_ms = 1e3 * self.timed_seconds / self.timed_steps
    mfu = (f"MFU {tokens_per_sec * flops_per_token / peak:.1%} of "
           f"{peak / 1e12:,.0f} TFLOP/s" if peak else "MFU unknown (no "
           "peak FLOP/s for this device)")
    first = ("" if self.first_step_seconds is None else
             f"; first step (compilation) {self.first_step_seconds:.1f} s")
    return (f"performance: {self.timed_steps} steps on {device} in "
            f"{self.timed_seconds:.1f} s of training (compilation and "
            f"evaluation excluded): {step_ms:.1f} ms/step, "
            f"{tokens_per_sec:,.0f} tokens/s, "
            f"{flops_per_token / 1e9:.3g} GFLOP/token, {mfu}{first}")
