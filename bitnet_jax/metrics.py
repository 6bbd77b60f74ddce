"""Metric writing (JSON lines + TensorBoard, no TensorFlow) and diagnostics.

The collapse diagnostics are the ones the seeds needed and did not have:
`unique_predictions` fell from 20 to 2 while the loss improved, and argmax
equal to the input token (`copy_rate`) was the signature of the tied-embedding
copying model.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from bitnet_jax.data.tokenizer import write_atomically

# Dense (no sparsity) bf16 peak FLOP/s per JAX device, from the vendors' spec
# sheets; `mfu` divides by it whatever model.dtype is (MaxText's convention).
# Keys are `device_kind` prefixes; the longest matching one wins.
PEAK_FLOPS_PER_DEVICE = {
    "TPU v4": 275e12,  # one chip (megacore) per device
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "NVIDIA H100": 989e12,  # SXM (device_kind "NVIDIA H100 80GB HBM3")
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,  # same tensor cores as H100 SXM, more memory
    "NVIDIA GH200": 989e12,
    "NVIDIA A100": 312e12,  # SXM4 and PCIe, 40 and 80 GB
}


def prediction_statistics(predictions: jax.Array, inputs: jax.Array,
                          targets: jax.Array, vocab_size: int,
                          weights: jax.Array | None = None
                          ) -> dict[str, jax.Array]:
  """Sums over one eval batch, to be added across batches on device.

  Args:
    predictions: int32 `[batch, seq]`, the argmax token at each position
      (`loss.position_outputs`).
    inputs: int32 `[batch, seq]`, the tokens the model saw.
    targets: int32 `[batch, seq]`, the next tokens.
    vocab_size: the model's logits width (the histogram's length).
    weights: optional float32 `[batch, seq]`, 1 for counted positions, 0 for
      those left out (a target in the next packed document).

  Returns:
    `correct` (argmax == target), `copies` (argmax == input token), `count`
    (positions) as float32 scalars, and `histogram`, float32 `[vocab_size]`
    counts of each argmax token.
  """
  if weights is None:
    weights = jnp.ones(predictions.shape, jnp.float32)
  histogram = jnp.zeros((vocab_size,), jnp.float32).at[
      predictions.reshape(-1)].add(weights.reshape(-1))
  return {
      "correct": jnp.sum((predictions == targets) * weights),
      "copies": jnp.sum((predictions == inputs) * weights),
      "count": jnp.sum(weights),
      "histogram": histogram,
  }


def summarize_eval(totals: Mapping[str, Any]) -> dict[str, float]:
  """Turns summed eval statistics (host numpy) into eval metrics.

  Args:
    totals: `loss_sum` (nats) and the sums of `prediction_statistics`;
      optionally `entropy_sum` (nats) and, summed over `batches` batches,
      float32 `[n_layers]` `attention_rms` and `ffn_rms`.

  Returns:
    eval_loss (nats/token), eval_accuracy, unique_predictions (distinct argmax
    tokens over the whole eval set), copy_rate (share of positions whose
    argmax is the current input token), top_token_share (share of positions
    predicting the single most-predicted token); with the optional sums,
    prediction_entropy (mean entropy of the predictive distribution, nats)
    and per block i `attention_rms/i` and `ffn_rms/i` (RMS of the attention
    and FFN outputs added to the residual stream, mean over batches).
  """
  count = float(totals["count"])
  histogram = np.asarray(totals["histogram"])
  extra = {}
  if "entropy_sum" in totals:
    extra["prediction_entropy"] = float(totals["entropy_sum"]) / count
  for name in ("attention_rms", "ffn_rms"):
    if name in totals:
      values = np.asarray(totals[name]) / float(totals["batches"])
      extra.update({f"{name}/{i}": float(v) for i, v in enumerate(values)})
  return {
      "eval_loss": float(totals["loss_sum"]) / count,
      "eval_accuracy": float(totals["correct"]) / count,
      "unique_predictions": int(np.count_nonzero(histogram)),
      "copy_rate": float(totals["copies"]) / count,
      "top_token_share": float(histogram.max()) / count,
      **extra,
  }


def flops_per_token(n_matmul_params: int, n_layers: int, d_model: int,
                    seq_len: int) -> float:
  """Training FLOPs per token: 6N + 12 L d T (PaLM, arXiv 2204.02311, B)."""
  return 6.0 * n_matmul_params + 12.0 * n_layers * d_model * seq_len


def device_peak_flops(device_kind: str) -> float | None:
  """Peak dense bf16 FLOP/s of one device of `device_kind`, None if unknown
  (then no `mfu` is reported)."""
  matches = [k for k in PEAK_FLOPS_PER_DEVICE if device_kind.startswith(k)]
  return PEAK_FLOPS_PER_DEVICE[max(matches, key=len)] if matches else None


def peak_flops(devices: list[jax.Device]) -> float | None:
  """Summed peak FLOP/s of `devices`, or None where a kind is unknown."""
  peaks = [device_peak_flops(d.device_kind) for d in devices]
  return None if None in peaks else float(sum(peaks))


_SHOWN_CHARS = 80  # characters of a dropped or corrupt line put in messages


def _parse_lines(text: str, path: str) -> tuple[list[str], list[dict]]:
  """Parses metrics.jsonl `text` (read from `path`): lines and records.

  Blank lines are skipped. A last line that is not a JSON object with an
  integer "step" (a write cut short by a kill) is dropped with a warning
  naming `path` and its text; the kept lines all end with a newline.

  Raises:
    ValueError: naming `path`, the line number and the fix when a line other
      than the last is not such a record (the file was damaged or edited).
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
      raise ValueError(
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
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8", errors="replace") as f:
    return _parse_lines(f.read(), path)[1]


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
  if not os.path.exists(path):
    return
  with open(path, "rb") as f:
    original = f.read()
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
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.samples_path = os.path.join(workdir, "samples.jsonl")
    self._tensorboard = None
    if not self.enabled:
      return
    for path in (self.path, self.samples_path):
      _truncate_after(path, resume_step)
    from tensorboardX import SummaryWriter  # only process 0 needs it
    # A SessionLog START at purge_step makes TensorBoard drop the points of
    # earlier event files at steps >= purge_step.
    purge_step = resume_step + 1 if resume_step > 0 else 0
    self._tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                      purge_step=purge_step)

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Writes one JSON object `{"step": step, **scalars}` and TB scalars.

    Lists of names (`health_alarms`) go to the JSON line only.
    """
    if not self.enabled:
      return
    record = {"step": int(step), **{
        k: list(v) if isinstance(v, (list, tuple)) else _plain(v)
        for k, v in scalars.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for name, value in record.items():
      if name != "step" and not isinstance(value, list):
        self._tensorboard.add_scalar(name, value, int(step))
    self._tensorboard.flush()

  def write_samples(self, step: int, samples: list[dict[str, str]]) -> None:
    """Appends one JSON line `{"step", **sample}` per sample to
    `WORKDIR/samples.jsonl` and the texts to TensorBoard (`samples/<i>`)."""
    if not self.enabled or not samples:
      return
    with open(self.samples_path, "a", encoding="utf-8") as f:
      for sample in samples:
        f.write(json.dumps({"step": int(step), **sample}) + "\n")
    for i, sample in enumerate(samples):
      self._tensorboard.add_text(
          f"samples/{i}", f"{sample['prompt']} ‖ {sample['continuation']}",
          int(step))
    self._tensorboard.flush()

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()


def _plain(value: Any) -> float | int:
  value = np.asarray(value).item()
  return value if isinstance(value, int) else float(value)


class Throughput:
  """Wall-clock rates between log lines: steps/s, tokens/s and the ETA.

  Args:
    tokens_per_step: global batch x seq_len.
    total_steps: the run's last step, for the ETA.
  """

  def __init__(self, tokens_per_step: int, total_steps: int):
    self.tokens_per_step = tokens_per_step
    self.total_steps = total_steps
    self._time, self._step = None, None
    self.timed_seconds, self.timed_steps = 0.0, 0  # summed over the run
    self.first_step_seconds = None  # compilation + the first step and batch

  def start(self, step: int) -> None:
    """Starts timing at `step` (after compilation, or after an evaluation)."""
    self._time, self._step = time.perf_counter(), step

  def measure(self, step: int) -> dict[str, float]:
    """Rates since the last call; `{}` if no step has passed."""
    now = time.perf_counter()
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


def log_console(step: int, total_steps: int, scalars: Mapping[str, Any]
                ) -> None:
  """One human-readable line: loss, learning rate, steps/s, tokens/s, ETA."""
  parts = [f"step {step}/{total_steps}"]
  for name, fmt in (("loss", ".4f"), ("eval_loss", ".4f"),
                    ("learning_rate", ".2e"), ("weight_decay", ".2f"),
                    ("grad_norm", ".3f"), ("step_time_ms", ".1f"),
                    ("tokens_per_sec", ",.0f"), ("mfu", ".1%"),
                    ("unique_predictions", "d"), ("copy_rate", ".3f"),
                    ("top_token_share", ".3f"), ("prediction_entropy", ".3f")):
    if name in scalars:
      parts.append(f"{name} {format(scalars[name], fmt)}")
  if scalars.get("health_alarms"):
    parts.append(f"ALARMS {','.join(scalars['health_alarms'])}")
  if "eta_seconds" in scalars:
    minutes, seconds = divmod(int(scalars["eta_seconds"]), 60)
    parts.append(f"ETA {minutes}m{seconds:02d}s")
  logging.info(" | ".join(parts))
