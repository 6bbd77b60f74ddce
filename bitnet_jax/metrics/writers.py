"""Metric files: `metrics.jsonl` (JSON lines), TensorBoard events (no
TensorFlow), `samples.jsonl`, and the console line.

Every step appears once across restarts (`MetricWriter`); a line cut short by
a kill is repaired (`read_records`).
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from bitnet_jax.runs.directory import METRICS, SAMPLES, TENSORBOARD
from bitnet_jax.storage import paths
from bitnet_jax.storage.files import write_atomically

_SHOWN_CHARS = 80  # characters of a dropped or corrupt line put in messages


def _import_tensorboardx():
  """Imports tensorboardX without importing torch.

  `tensorboardX.writer` imports torch at module level when it is installed
  (as with the `test` extra, for transformers), only to accept torch tensors;
  that costs every run's start about 3 s on 2 cores. This writer logs Python
  numbers and strings, so torch is hidden during that one import (an entry
  of None in `sys.modules` makes `import torch` raise ImportError, which
  tensorboardX catches) and restored right after; a torch imported later,
  or already, is untouched.
  """
  if "torch" in sys.modules or "tensorboardX" in sys.modules:
    import tensorboardX  # pylint: disable=g-import-not-at-top
    return tensorboardX
  sys.modules["torch"] = None  # type: ignore[assignment]
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]
  return tensorboardX


class RunFileError(ValueError):
  """A run directory's record file (metrics.jsonl, samples.jsonl) has a
  malformed line before its last; the message names the file, the line and
  the fix."""


def _parse_lines(text: str, path: str) -> tuple[list[str], list[dict]]:
  """Parses metrics.jsonl `text` (read from `path`): lines and records.

  Blank lines are skipped. A last line that is not a JSON object with an
  integer "step" (a write cut short by a kill) is dropped with a warning
  naming `path` and its text; the kept lines all end with a newline.

  Raises:
    RunFileError: naming `path`, the line number and the fix when a line
      other than the last is not such a record (the file was damaged or
      edited).
  """
  numbered = [(n, line) for n, line in
              enumerate(io.StringIO(text), start=1)
              if line.strip()]
  lines, records = [], []
  for i, (number, line) in enumerate(numbered):
    record = _parse_record(line)
    if record is None:
      shown = line.rstrip("\n")[:_SHOWN_CHARS]
      if i == len(numbered) - 1:
        logging.warning("Dropping the half-written last line %d of %s "
                        "(cut off by a kill?): %r", number, path, shown)
        break
      raise RunFileError(
          f"{path}, line {number}, is not a JSON metrics record: {shown!r}. "
          f"Only a cut-off last line is repaired automatically; fix or delete"
          f" line {number}, or move the file aside to start it afresh.")
    lines.append(line if line.endswith("\n") else line + "\n")
    records.append(record)
  return lines, records


def _parse_record(line: str) -> dict | None:
  """The record of one line, or None unless a JSON object with int "step"."""
  try:
    record = json.loads(line)
  except ValueError:
    return None
  if not isinstance(record, dict) or not isinstance(record.get("step"), int):
    return None
  return record


def read_records(workdir: str) -> list[dict]:
  """Returns the records of `WORKDIR/metrics.jsonl`, in file order.

  Each record is a dict `{"step": int, name: float | int, ...}` as written
  by `MetricWriter.write`; several records may share a step (train and eval
  lines). A half-written last line is skipped with a warning.

  Returns:
    The parsed records; `[]` when the file does not exist.

  Raises:
    ValueError: naming the file, the line number and the fix when a line
      other than the last is corrupt.
  """
  path = paths.join(workdir, METRICS)
  try:
    text = paths.read_bytes(path).decode("utf-8", errors="replace")
  except FileNotFoundError:
    return []
  return _parse_lines(text, path)[1]


def final_metrics(workdir: str, step: int) -> dict:
  """Returns every record of `step` in metrics.jsonl merged into one dict.

  Later records win where names repeat; the dict includes "step". Used to
  report the results of a finished run that is started again.

  Returns:
    `{"step": step, name: value, ...}`, or `{}` when no record has `step`.

  Raises:
    ValueError: as `read_records`.
  """
  merged = {}
  for record in read_records(workdir):
    if record["step"] == step:
      merged.update(record)
  return merged


def _truncate_after(path: str, step: int) -> None:
  """Keeps the lines of the JSON-lines file `path` whose steps are <= `step`,
  none when `step` is 0."""
  try:
    original = paths.read_bytes(path)
  except FileNotFoundError:
    return
  if step > 0:
    lines, records = _parse_lines(
        original.decode("utf-8", errors="replace"), path)
    kept = [line for line, record in zip(lines, records)
            if record["step"] <= step]
  else:
    kept = []
  text = "".join(kept)
  if text.encode("utf-8") == original:
    return
  if step > 0:
    logging.info("Resuming at step %d: kept %d lines of %s (steps <= %d)",
                 step, len(kept), path, step)
  else:
    logging.info("Starting at step 0 (no checkpoint): cleared the earlier "
                 "lines of %s", path)
  write_atomically(path, text.encode("utf-8"))


class MetricWriter:
  """Appends metrics to `WORKDIR/metrics.jsonl` and TensorBoard event files
  (and eval samples to `WORKDIR/samples.jsonl`, see `write_samples`).

  Only process 0 writes. Every step appears once across restarts:

  * resume_step == 0 (no checkpoint): every existing line is dropped, since
    the run starts over (a run killed before its first checkpoint would
    otherwise log step 0 twice); TensorBoard purges every earlier point.
  * resume_step > 0: lines of steps after it (written after the restored
    checkpoint, about to be recomputed) are dropped, and TensorBoard purges
    points of steps >= resume_step + 1.

  A half-written last line (the process was killed mid-write) is dropped
  with a warning.

  Args:
    workdir: the run's directory.
    resume_step: the step training restarts from (0 for a fresh run).

  Raises:
    ValueError: naming the file, the line number and the fix when a line of
      metrics.jsonl other than the last is corrupt (only when resuming).
  """

  def __init__(self, workdir: str, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = paths.join(workdir, METRICS)
    self.samples_path = paths.join(workdir, SAMPLES)
    self._tensorboard = None
    if not self.enabled:
      return
    for path in (self.path, self.samples_path):
      _truncate_after(path, resume_step)
    tensorboardx = _import_tensorboardx()  # only process 0 needs it
    if paths.is_url(workdir):
      tensorboardx.record_writer.register_writer_factory(
          workdir.partition(":")[0], _AppendingEventsFactory())
    # A SessionLog START at purge_step makes TensorBoard drop the points of
    # earlier event files at steps >= purge_step.
    purge_step = resume_step + 1 if resume_step > 0 else 0
    self._tensorboard = tensorboardx.SummaryWriter(
        paths.join(workdir, TENSORBOARD), purge_step=purge_step)

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes one JSON object `{"step": step, **scalars}` and TB scalars.

    Lists of names (`health_alarms`) go to the JSON line only.
    """
    if not self.enabled:
      return
    record = {"step": int(step), **{
        k: list(v) if isinstance(v, (list, tuple)) else _plain(v)
        for k, v in scalars.items()}}
    paths.append(self.path, (json.dumps(record) + "\n").encode("utf-8"))
    for name, value in record.items():
      if name != "step" and not isinstance(value, list):
        self._tensorboard.add_scalar(name, value, int(step))
    self._tensorboard.flush()

  def write_samples(self, step: int, samples: list[dict[str, str]]) -> None:
    """Appends one JSON line `{"step", **sample}` per sample to
    `WORKDIR/samples.jsonl` and the texts to TensorBoard (`samples/<i>`)."""
    if not self.enabled or not samples:
      return
    paths.append(self.samples_path, "".join(
        json.dumps({"step": int(step), **sample}) + "\n"
        for sample in samples).encode("utf-8"))
    for i, sample in enumerate(samples):
      self._tensorboard.add_text(
          f"samples/{i}", f"{sample['prompt']} ‖ {sample['continuation']}",
          int(step))
    self._tensorboard.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


class _AppendingEvents:
  """A tensorboardX record writer for object stores: each flush appends the
  bytes written since (`paths.append`: GCS compose), where tensorboardX's
  own GCS writer uploads the whole event file at every flush and again,
  retrying for minutes, from `__del__` at interpreter exit."""

  def __init__(self, path: str):
    self.path, self._pending = path, bytearray()

  def write(self, data: bytes) -> None:
    self._pending += data

  def flush(self) -> None:
    if self._pending:
      paths.append(self.path, bytes(self._pending))
      self._pending.clear()

  def close(self) -> None:
    self.flush()


class _AppendingEventsFactory:
  """What tensorboardX's `register_writer_factory` takes, for gs://."""

  def open(self, path: str) -> _AppendingEvents:
    return _AppendingEvents(path)

  def directory_check(self, path: str) -> None:
    del path  # object stores have no directories to create


def _plain(value: Any) -> float | int:
  value = np.asarray(value).item()
  return value if isinstance(value, int) else float(value)


# The console line's metrics, in order, with their formats: a short line
# per log step and evaluation. Every metric of a record (collapse
# diagnostics, attention statistics, lm-eval scores) is in metrics.jsonl and
# TensorBoard.
CONSOLE_FORMATS = {
    "loss": ".4f", "eval_loss": ".4f", "unique_predictions": "d",
    "learning_rate": ".2e", "grad_norm": ".3f", "tokens_per_sec": ",.0f",
    "mfu": ".1%",
}


def console_line(step: int, total_steps: int, scalars: Mapping[str, Any]
                 ) -> str:
  """'step 50/1100 | loss 7.6754 | ... | ETA 32m51s': the record's
  `CONSOLE_FORMATS` metrics, the alarms firing and the ETA (one line of
  about 150 characters whatever the record holds)."""
  parts = [f"step {step}/{total_steps}"]
  for name, fmt in CONSOLE_FORMATS.items():
    if name in scalars:
      value = scalars[name]
      parts.append(f"{name} {format(int(value) if fmt == 'd' else value, fmt)}")
  if scalars.get("health_alarms"):
    parts.append(f"ALARMS {','.join(scalars['health_alarms'])}")
  if "eta_seconds" in scalars:
    minutes, seconds = divmod(int(scalars["eta_seconds"]), 60)
    parts.append(f"ETA {minutes}m{seconds:02d}s")
  return " | ".join(parts)


def log_console(step: int, total_steps: int, scalars: Mapping[str, Any]
                ) -> None:
  """Logs `console_line` at INFO."""
  logging.info(console_line(step, total_steps, scalars))
