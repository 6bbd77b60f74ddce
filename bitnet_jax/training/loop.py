"""`train_and_evaluate(config, workdir)`: the train loop.

Where each concern lives (bitnet_jax.training unless named):

  setup               how a run starts (fresh / resume / weights-only /
                      finished) and everything the loop uses, built once
  steps               the jitted train and eval steps
  objectives/         what the train step minimizes (cross-entropy,
                      distillation), handed to it as a value
  train_state         `TrainState(step, params, opt_state)`, created
                      already sharded
  actions             what runs after each step, each on its cadence, in an
                      explicit order: preemption, evaluation (+ samples),
                      lm-eval tasks, metric records (+ the divergence guard,
                      collapse alarms), checkpoints
  runs.lock           one writer per workdir (runs.gcs_lock: on gs://)
  runs.identity       a resume that would change the run is refused
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from absl import logging

from bitnet_jax import config as config_lib
from bitnet_jax.distributed import multihost
from bitnet_jax.runs import checkpoint, gcs_lock
from bitnet_jax.storage import deadline, paths
from bitnet_jax.training import summary
from bitnet_jax.training.actions import StepDone
from bitnet_jax.training.setup import Finished, Run, build_run

# where a run logs which kernels its compiled train step holds (`train`)
DESCRIBED_PLATFORMS = ("gpu", "tpu")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       describe_step: Callable[[str], str] | None = None
                       ) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint.

  Writes the run directory's files (`bitnet_jax.runs.directory` names each:
  metrics, TensorBoard events, checkpoints, the first start's config, the
  history of starts, the tokenizer, greedy samples at each evaluation) and
  holds its lock while it runs (one writer per workdir).
  `workdir` may be local or an object store (`gs://bucket/run`: every file
  goes through `bitnet_jax.storage.paths`, the lock through GCS preconditions).
  SIGTERM or SIGINT ends the run after the step in flight, with a checkpoint
  of that step; a finished run started again returns its final metrics.

  Args:
    config: the run config.
    workdir: the run directory (local path or gs:// URL).
    describe_step: on a GPU or TPU host, maps the compiled train step's
      optimized HLO text to one line naming its kernels (cuDNN or XLA
      attention, int8 GEMMs or not; `bitnet_jax.aot.compile_step`'s), which
      is logged before the first step. The step is compiled for it on the
      first batch (`TrainStep.lower(...).compile()`), and the first step
      reuses that executable: no second compile.

  Returns:
    The last metric record, `step` included (train and eval scalars of the
    final step, or of the step a signal stopped the run at).

  Raises:
    ConfigError: on an invalid config value (before any work is done);
      `run_identity.RunIdentityError` when a resume would change the run.
    WorkdirLockedError: another live process writes to `workdir`.
    CheckpointMismatchError: the checkpoint's arrays do not fit the config.
    CheckpointSaveError: a checkpoint cannot be written (path and cause),
      or `workdir` cannot be (a file, read-only, a full disk).
    FloatingPointError: the loss became NaN/inf (or `DivergenceError`:
      diverged); the newest checkpoint predates it.
    health.HealthAlarmError: a collapse alarm fired with
      `health.halt_on_alarm` (the evaluated step is checkpointed first).
  """
  config_lib.validate(config)
  deadline.configure(config.train.storage_timeout_seconds)
  workdir = paths.resolve(workdir)  # gs://… stays a URL
  lock = None
  if jax.process_index() == 0:  # one lock per run, held by process 0
    stale = config.train.lock_stale_seconds
    lock = gcs_lock.workdir_lock(workdir, stale_seconds=stale,
                                 heartbeat_seconds=min(30.0, stale / 4))
  try:  # the first writes into workdir: a file in the way, a read-only disk
    paths.makedirs(workdir)
    multihost.on_process_zero(lambda: lock.acquire(), "lock the workdir")
  except OSError as e:
    raise _unwritable(workdir, e) from e
  try:
    run = build_run(config, workdir)
    return run.metrics if isinstance(run, Finished) else train(run,
                                                               describe_step)
  finally:
    if lock is not None:
      lock.release()


def _unwritable(workdir: str, error: OSError) -> checkpoint.CheckpointSaveError:
  """The error for a workdir that cannot be created or locked (a regular
  file in the way, a read-only filesystem, no permission, a full disk);
  a full disk found later is the Checkpointer's probe's to report."""
  cause = (f"{error.strerror}: {error.filename}"
           if error.strerror and error.filename else str(error))
  return checkpoint.CheckpointSaveError(
      f"--workdir={workdir} cannot be written ({cause}); choose another "
      "--workdir, or make this one writable (free disk space); nothing in "
      "it was changed")


def _describe(run: Run, batch: Any,
              describe_step: Callable[[str], str] | None) -> None:
  """Logs `describe_step`'s line for the compiled train step (GPU, TPU)."""
  if describe_step is None or jax.default_backend() not in DESCRIBED_PLATFORMS:
    return
  text = run.train_step.lower(run.state, batch).compile().as_text()
  logging.info("compiled train step on %s: %s", jax.devices()[0].device_kind,
               describe_step(text))


def train(run: Run, describe_step: Callable[[str], str] | None = None
          ) -> dict[str, Any]:
  """Trains from `run.start_step` to `train.steps`, or until an action stops
  the run; returns the last metric record. `describe_step`: see
  `train_and_evaluate`."""
  failing = True
  with run.preemption:
    try:
      if run.start_step == 0:  # the collapse diagnostics' reference point
        run.after_step(StepDone(0, run.state, metrics=None))
      first = next(run.batches) if run.start_step < run.total_steps else None
      if first is not None:
        _describe(run, first, describe_step)
      batches = itertools.chain([first], run.batches)
      run.throughput.begin()
      for step in range(run.start_step + 1, run.total_steps + 1):
        run.state, step_metrics = run.train_step(run.state, next(batches))
        if run.after_step(StepDone(step, run.state, step_metrics,
                                   is_last=step == run.total_steps)):
          break
      run.after_step.end()
      failing = False
    finally:  # a crash still completes the pending checkpoint saves
      _close_all(reversed(run.after_step.actions), failing=failing)
  log = run.after_step.metric_log
  if jax.process_index() == 0:
    logging.info(summary.end_of_run(
        summary.shown_path(run.workdir), run.config.data.dataset,
        run.total_steps, log.last, log.alarms_seen, log.performance()))
  return log.last


def _close_all(closables: Any, *, failing: bool) -> None:
  """Closes each; while an error is already propagating, only logs theirs."""
  for closable in closables:
    try:
      closable.close()
    except Exception as e:  # pylint: disable=broad-except
      if not failing:
        raise
      # one line: the error already propagating is the report
      logging.warning("while stopping after an error, closing %s failed "
                      "too: %s", type(closable).__name__,
                      str(e).splitlines()[0] if str(e) else repr(e))
