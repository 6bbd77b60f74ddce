"""The training loop: sharded state, jitted steps, evaluation, checkpoints.

The train state (`bitnet_jax.train_state`) is created already sharded and
donated to every step (`bitnet_jax.steps`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import parameter_overview
from jax.experimental import multihost_utils

from bitnet_jax import (checkpoint, data, guards, health, metrics, preemption,
                        run_identity, run_lock, runs, samples, sharding,
                        train_state)
from bitnet_jax import config as config_lib
from bitnet_jax import optimizer as optimizer_lib
from bitnet_jax.steps import (evaluate, make_eval_step, make_train_step,
                              matmul_params)

State = train_state.State


def _prepare_data(config: ml_collections.ConfigDict) -> data.PreparedData:
  """Process 0 prepares corpus, tokenizer and tokens first, then the rest."""
  if jax.process_count() == 1:
    return data.prepare(config)
  prepared = data.prepare(config) if jax.process_index() == 0 else None
  multihost_utils.sync_global_devices("bitnet_jax:data_prepared")
  return prepared or data.prepare(config)


def _on_process_zero(action: Callable[[], Any], what: str) -> Any:
  """Runs `action` on process 0 only; every process raises if it failed."""
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


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint.

  Writes `workdir/metrics.jsonl`, `workdir/tensorboard/`,
  `workdir/checkpoints/`, `workdir/config.json` (the first start's config),
  `workdir/config_history.jsonl` (every start), `workdir/tokenizer.json`
  and `workdir/samples.jsonl` (greedy continuations at each evaluation),
  and holds `workdir/run.lock` while it runs (one writer per workdir).
  SIGTERM or SIGINT ends the run after the step in flight, with a checkpoint
  of that step; a finished run started again returns its final metrics.

  Returns:
    The last metric record (train and eval scalars of the final step, or of
    the step a signal stopped the run at).

  Raises:
    ConfigError: on an invalid config value (before any work is done);
      `run_identity.RunIdentityError` when a resume would change the run.
    WorkdirLockedError: another live process writes to `workdir`.
    CheckpointMismatchError: the checkpoint's arrays do not fit the config.
    CheckpointSaveError: a checkpoint cannot be written (path and cause).
    FloatingPointError: the loss became NaN/inf (or `DivergenceError`:
      diverged); the newest checkpoint predates it.
    health.HealthAlarmError: a collapse alarm fired with
      `health.halt_on_alarm` (the evaluated step is checkpointed first).
  """
  config_lib.validate(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  lock = None
  if jax.process_index() == 0:  # one lock per run, held by process 0
    stale = config.train.lock_stale_seconds
    lock = run_lock.WorkdirLock(workdir, stale_seconds=stale,
                                heartbeat_seconds=min(30.0, stale / 4))
  _on_process_zero(lambda: lock.acquire(), "lock the workdir")
  try:
    return _run(config, workdir)
  finally:
    if lock is not None:
      lock.release()


def _close_all(*closables: Any, failing: bool) -> None:
  """Closes each; while an error is already propagating, only logs theirs."""
  for closable in closables:
    try:
      closable.close()
    except Exception:  # pylint: disable=broad-except
      if not failing:
        raise
      logging.exception("while stopping after an error, closing %s failed",
                        type(closable).__name__)


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """`train_and_evaluate` once the workdir is locked."""
  t = config.train
  checkpointer = checkpoint.Checkpointer(
      os.path.join(workdir, "checkpoints"), keep=t.keep_checkpoints)
  latest = checkpointer.latest_step()
  # a weights-only checkpoint (`convert import-hf`) starts a new run from it
  from_weights = checkpointer.newest_is_weights_only()
  resuming = latest is not None and not from_weights
  if from_weights and t.init_from:
    logging.warning("train.init_from=%r is ignored: %s holds imported "
                    "weights (checkpoint %d), which the run starts from",
                    t.init_from, workdir, latest)
  elif not resuming and t.init_from:  # a wrong path fails before data prep
    runs.resolve_checkpoint(t.init_from)
  _on_process_zero(lambda: run_identity.start_run(
      workdir, config, resuming=resuming, resume_step=latest or 0),
                   "accept this config for the run")
  if resuming and latest >= t.steps:
    checkpointer.close()
    final = metrics.final_metrics(workdir, latest)
    logging.info("the run in %s is finished: checkpoint %d, train.steps=%d "
                 "(raise train.steps to train on). Final metrics: %s",
                 workdir, latest, t.steps, json.dumps(final))
    return final

  saved_layout = checkpointer.saved_scan_layers() if resuming else None
  if saved_layout is not None and saved_layout != config.model.scan_layers:
    logging.warning("model.scan_layers=%s, but the checkpoints in %s hold %s "
                    "layers: resuming in their layout",
                    config.model.scan_layers, checkpointer.directory,
                    "scanned" if saved_layout else "unrolled")
    config = config.copy_and_resolve_references()
    config.model.scan_layers = saved_layout
  prepared = _prepare_data(config)
  _on_process_zero(lambda: run_identity.check_tokenizer(  # weights keep it
      workdir, prepared.tokenizer_path, t.allow_config_change,
      resuming=resuming or from_weights), "accept the tokenizer")
  if not resuming and not from_weights and t.init_from:
    _on_process_zero(lambda: runs.check_init_tokenizer(
        t.init_from, prepared.tokenizer_path, t.allow_config_change),
                     "accept the tokenizer of train.init_from")
  mesh = sharding.make_mesh(config.mesh)
  tx = optimizer_lib.make_optimizer(config)

  def new_iterator():
    return data.train_iterator(prepared, config, jax.process_index(),
                               jax.process_count())

  train_iter = new_iterator()
  eval_windows_local = data.eval_batches(
      prepared, config, jax.process_index(), jax.process_count())
  eval_windows = [sharding.global_batch(batch, mesh)
                  for batch in eval_windows_local]
  tokens_per_step = t.batch_size * t.seq_len
  graphdef, state, shardings = train_state.create_train_state(
      config, mesh, tx, initialize=False)
  run_at_start = {"tokens_seen": 0}  # the checkpoint's `run` facts
  restored = checkpointer.restore(state, train_iter) if resuming else None
  if restored is not None:  # (checkpoints older than `run` lack its facts)
    state = restored.state
    run_at_start = {"tokens_seen": restored.step * tokens_per_step,
                    **restored.run}
  else:
    if resuming:
      logging.warning("no checkpoint in %s could be restored: starting the "
                      "run from step 0", checkpointer.directory)
      train_iter = new_iterator()
    if checkpointer.newest_is_weights_only():  # (also after damaged ones)
      state = train_state.initial_state(
          config, tx, state, workdir, "the imported checkpoint of --workdir")
    else:
      state = train_state.initial_state(config, tx, state, t.init_from)
  start_step = int(jax.device_get(state["step"]))
  logging.info("%s at step %d in %s on %d devices, mesh %s",
               "resuming" if start_step else "starting", start_step, workdir,
               jax.device_count(), dict(mesh.shape))
  logging.info("parameters:\n%s",
               parameter_overview.get_parameter_overview(state["params"],
                                                         include_stats=False))

  train_step = make_train_step(config, graphdef, tx, shardings, mesh)
  eval_step = make_eval_step(config, graphdef, shardings["params"], mesh)
  writer = metrics.MetricWriter(workdir, resume_step=start_step)
  monitor = health.HealthMonitor(config.health,
                                 vocab_size=config.model.vocab_size,
                                 total_steps=t.steps)
  if start_step:  # the alarms' state survives resumes
    monitor.replay([r for r in metrics.read_records(workdir)
                    if r["step"] <= start_step])
  prompts = samples.sample_prompts(config, eval_windows_local)
  guard = guards.DivergenceGuard(t.divergence_factor, t.divergence_patience)
  guard.restore(run_at_start)  # the minimum survives resumes
  throughput = metrics.Throughput(tokens_per_step, t.steps)
  flops = metrics.flops_per_token(
      matmul_params(config, state["params"]), config.model.n_layers,
      config.model.d_model, t.seq_len)
  peak = metrics.peak_flops(jax.devices())

  def tokens_seen(step: int) -> int:
    return run_at_start["tokens_seen"] + (step - start_step) * tokens_per_step

  def kept() -> str:
    return f"checkpoint {checkpointer.latest_step()} (best eval: " \
        f"{checkpointer.best_step()})"

  def read(step: int, step_metrics: dict) -> dict:
    """Host copy of a step's metrics (blocks until that step is done)."""
    record = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    guards.check_finite(step, record, kept())
    guard.observe(step, record["nll"], kept())  # (loss - regularizers)
    record["tokens_seen"] = tokens_seen(step)
    record.update(throughput.measure(step))
    if peak and "tokens_per_sec" in record:
      record["mfu"] = record["tokens_per_sec"] * flops / peak
    return record

  def evaluation(step: int) -> dict:
    """Eval metrics, the alarms they raise, and the samples of `step`."""
    record = evaluate(eval_step, state["params"], eval_windows, step)
    writer.write_samples(step, samples.continue_prompts(
        config, graphdef, state["params"], prompts, prepared.tokenizer,
        step))
    return record

  def emit(step: int, record: dict) -> dict:
    alarms = monitor.observe(step, record)  # [] for a train-only record
    if "eval_loss" in record:
      record["health_alarms"] = alarms
    writer.write(step, record)
    metrics.log_console(step, t.steps, record)
    return record

  def save(step: int, record: dict | None, step_metrics: dict) -> bool:
    """Checkpoints `step` unless its loss is bad; True if a save started."""
    values = record  # read() checked it already
    if values is None:
      values = {k: float(v) for k, v in jax.device_get(
          {"loss": step_metrics["loss"], "nll": step_metrics["nll"],
           "grad_norm": step_metrics["grad_norm"]}).items()}
      guards.check_finite(step, values, kept())  # never save NaNs
    if guard.is_diverged(values["nll"]):
      logging.warning("not saving checkpoint %d: loss %.4g lies above %.4g "
                      "(train.divergence_factor x its running minimum)",
                      step, values["nll"], guard.threshold())
      return False
    run = {"tokens_seen": tokens_seen(step), **guard.state()}
    if record and "eval_loss" in record:
      run["eval_loss"] = record["eval_loss"]
    checkpointer.save(step, state, train_iter, run)
    return True

  last, failing = {}, True
  with preemption.PreemptionWatch() as watch:
    try:
      if start_step == 0:  # baseline of the collapse diagnostics
        last = emit(0, evaluation(0))
      unread = None  # (step, metrics) read after the next step's dispatch
      first_step_started = time.perf_counter()
      for step in range(start_step + 1, t.steps + 1):
        window = sharding.global_batch(next(train_iter), mesh)
        state, step_metrics = train_step(state, window)
        if step == start_step + 1:  # exclude compilation from tokens/s
          jax.block_until_ready(step_metrics)
          throughput.first_step_seconds = (time.perf_counter()
                                           - first_step_started)
          throughput.start(step)
        checkpointer.check()  # a failed background save stops the run here
        if unread is not None:
          last = emit(unread[0], read(*unread))
          unread = None
        preempted = watch.requested(step)
        is_last = step == t.steps
        saving = step % t.checkpoint_every == 0 or is_last or preempted
        record = None
        evaluating = step % t.eval_every == 0 or is_last  # same on all hosts
        if evaluating:
          record = read(step, step_metrics)
          record.update(evaluation(step))
          throughput.start(step)  # evaluation time is not training time
        elif step % t.log_every == 0:
          if saving:  # the line is on disk before the checkpoint is
            record = read(step, step_metrics)
          else:
            unread = (step, step_metrics)
        if record is not None:
          last = emit(step, record)
        halt = bool(record and record.get("health_alarms")
                    and config.health.halt_on_alarm)
        if (jax.process_count() > 1 and evaluating
            and config.health.halt_on_alarm):  # process 0's alarms decide
          halt = bool(multihost_utils.broadcast_one_to_all(np.int32(halt)))
        if saving or halt:
          saved = save(step, record, step_metrics)
        if halt:
          checkpointer.wait()
          raise health.HealthAlarmError(
              f"step {step}: {monitor.message(record['health_alarms'])} "
              f"(health.halt_on_alarm=True; checkpoint {step} "
              f"{'saved' if saved else 'not saved (diverged loss)'} in "
              f"{checkpointer.directory}; set --config.health.halt_on_alarm"
              "=False to train on)")
        if preempted:
          checkpointer.wait()
          logging.warning(
              "%s: stopped after step %d; %s. Rerun the same command to "
              "continue.", watch.signal_name, step,
              f"saved its checkpoint in {checkpointer.directory}/{step}"
              if saved else f"not saved (diverged loss), {kept()} kept")
          break
      if unread is not None:
        last = emit(unread[0], read(*unread))
      failing = False
    finally:  # a crash still completes the pending checkpoint saves
      _close_all(checkpointer, writer, failing=failing)
  if jax.process_index() == 0:
    logging.info("final metrics: %s", json.dumps(last))
    logging.info(throughput.summary(
        flops, peak, f"{jax.device_count()} x {jax.devices()[0].device_kind}"))
  return last
