"""`Cadence`: the one rule for "every N steps" in the train loop.

Every periodic action (evaluation, lm-eval tasks, metric records,
checkpoints) and the multi-host preemption check decide whether a step is
theirs here, so "every N steps, and the last" means the same everywhere.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Cadence:
  """When a periodic action runs: every `every` steps (0: never by count),
  at the last step (`at_last`) and at the step-0 baseline (`at_start`)."""
  every: int
  at_last: bool = True
  at_start: bool = False

  def due(self, step: int, is_last: bool) -> bool:
    if step == 0:
      return self.at_start
    return (self.at_last and is_last) or bool(
        self.every and step % self.every == 0)
