"""What the console says when a run ends: the outcome, where its files are,
and the commands that use them next (generate, evaluate, export), with the
run's workdir filled in."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from bitnet_jax.runs import directory


def python_command() -> str:
  """How to start this interpreter again from the current directory:
  `.venv/bin/python` inside a virtual environment below it, else `python`."""
  in_venv = sys.prefix != sys.base_prefix
  relative = os.path.relpath(sys.executable)
  if in_venv and not relative.startswith(".."):
    return relative
  return "python"


def shown_path(workdir: str) -> str:
  """`workdir` as the console shows it: relative to the current directory
  when it lies below it, else as given (absolute paths, gs:// URLs)."""
  if "://" in workdir or not os.path.isabs(workdir):
    return workdir
  relative = os.path.relpath(workdir)
  return workdir if relative.startswith("..") else relative


def next_commands(workdir: str, dataset: str) -> list[str]:
  """The commands a researcher runs on a trained run's directory.

  Args:
    workdir: the run directory, as given on the command line (local or
      gs://).
    dataset: `config.data.dataset` (the corpus `--perplexity` scores).
  """
  python, run = python_command(), shlex.quote(workdir)
  out = shlex.quote(workdir.rstrip("/") + "_hf")
  events = os.path.join(workdir, directory.TENSORBOARD)
  return [
      f"{python} -m bitnet_jax.generate --workdir={run} --prompt='def '",
      (f"{python} -m bitnet_jax.evaluate --workdir={run} "
      f"--perplexity={shlex.quote(dataset)}"),
      (f"{python} -m bitnet_jax.convert export-hf --workdir={run} "
      f"--out={out}"),
      f"tensorboard --logdir={shlex.quote(events)}",
  ]


def end_of_run(workdir: str, dataset: str, total_steps: int,
               record: Mapping[str, Any], alarms_seen: Sequence[str],
               performance: str | None) -> str:
  """The end-of-run summary (several lines, logged once by process 0).

  Args:
    workdir: the run directory.
    dataset: `config.data.dataset`.
    total_steps: `train.steps`.
    record: the last metric record, `step` included (`MetricLog.last`).
    alarms_seen: the collapse alarms that fired during this start, in
      order of first firing.
    performance: `Throughput.summary`, or None for a finished run started
      again (nothing trained).
  """
  step = record.get("step", 0)
  status = ("finished" if step >= total_steps else
            f"stopped at step {step} (rerun the same command to continue)")
  finals = [f"{name} {record[name]:.4f}" for name in ("loss", "eval_loss")
            if name in record]
  if "unique_predictions" in record:
    finals.append(f"unique_predictions {int(record['unique_predictions'])}")
  lines = [
      f"run {status}: step {step}/{total_steps} in {workdir}",
      "  final: " + (" | ".join(finals) or "no metrics recorded"),
      "  alarms: " + (", ".join(alarms_seen) if alarms_seen else "none"),
  ]
  if performance:
    lines.append("  " + performance)
  lines += [
      (f"  checkpoints: {directory.checkpoints_dir(workdir)}; every metric: "
      f"{os.path.join(workdir, directory.METRICS)}; samples: "
      f"{os.path.join(workdir, directory.SAMPLES)}"),
      "next:",
      *("  " + command for command in next_commands(workdir, dataset)),
  ]
  return "\n".join(lines)
