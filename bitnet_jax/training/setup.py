"""One training run, built once: how it starts, and everything its loop uses.

`build_run(config, workdir)` decides how the run starts (`Start`), checks
the config and tokenizer against the run's history, prepares the data,
creates or restores the sharded state, jits the steps and builds the
periodic actions (`bitnet_jax.training.actions`). The loop itself is
`bitnet_jax.training.loop.train`.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
from absl import logging
from clu import parameter_overview

from bitnet_jax import data, metrics
from bitnet_jax.distributed import multihost, sharding
from bitnet_jax.metrics import health
from bitnet_jax.optim import optimizer as optimizer_lib
from bitnet_jax.runs import checkpoint, directory, identity, reader
from bitnet_jax.storage import paths
from bitnet_jax.training import (
  actions,
  guards,
  objectives,
  records,
  samples,
  steps,
  summary,
  train_state,
)
from bitnet_jax.training import checkpointing as checkpointing_lib


class Start(enum.Enum):
  """How a run starts, from what its checkpoint directory holds."""
  FRESH = "fresh"  # no checkpoint: step 0, random or `train.init_from` params
  RESUME = "resume"  # the newest checkpoint: state, data position, run facts
  WEIGHTS_ONLY = "weights_only"  # imported weights (`convert import-hf`):
  # step 0 from them, with a fresh optimizer and data order
  FINISHED = "finished"  # the newest checkpoint is at `train.steps`


@dataclasses.dataclass(frozen=True)
class Finished:
  """A run that has nothing left to train: its final metrics."""
  step: int
  metrics: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class TokensSeen:
  """Tokens trained on by the end of a step, counted from the start step."""
  start_step: int
  at_start: int
  per_step: int

  def __call__(self, step: int) -> int:
    return self.at_start + (step - self.start_step) * self.per_step


@dataclasses.dataclass
class Run:
  """Everything the train loop uses, built by `build_run`.

  Attributes:
    config: the run's config (with the checkpoints' layer layout).
    workdir: the run directory (absolute).
    start: how this start began (FRESH, RESUME or WEIGHTS_ONLY).
    start_step: the step the state holds (0 unless resuming).
    state: the sharded `TrainState`, replaced by every step.
    train_step: the jitted (state, batch) -> (state, metrics), both
      arguments donated.
    batches: global batches placed on the mesh, never exhausted.
    preemption: the signal watch (a context manager around the loop).
    after_step: the periodic actions, run after each step (and at the
      step-0 baseline) in their order (`actions.AfterStep`).
    throughput: the run's clock (`begin` before the first step).
  """
  config: ml_collections.ConfigDict
  workdir: str
  start: Start
  start_step: int
  state: train_state.TrainState
  train_step: Callable[[train_state.TrainState, dict], tuple[Any, dict]]
  batches: Iterator[dict]
  preemption: actions.Preemption
  after_step: actions.AfterStep
  throughput: metrics.Throughput

  @property
  def total_steps(self) -> int:
    return self.config.train.steps


def build_run(config: ml_collections.ConfigDict, workdir: str
              ) -> Run | Finished:
  """Builds the run of `config` in `workdir` (locked by the caller).

  Raises:
    See `bitnet_jax.training.loop.train_and_evaluate`.
  """
  t = config.train
  checkpointer = checkpoint.Checkpointer(
      directory.checkpoints_dir(workdir), keep=t.keep_checkpoints)
  try:
    start, latest = _plan_start(config, workdir, checkpointer)
    if start is Start.FINISHED:
      final = metrics.final_metrics(workdir, latest)
      logging.info("the run in %s is finished: checkpoint %d, train.steps=%d "
                   "(raise train.steps to train on).\n%s", workdir, latest,
                   t.steps, summary.end_of_run(
                       summary.shown_path(workdir), config.data.dataset,
                       t.steps, {"step": latest, **final}, [], None))
      checkpointer.close()
      return Finished(step=latest, metrics=final)
    return _build(_checkpoint_layout(config, checkpointer, start), workdir,
                  checkpointer, start)
  except BaseException:
    checkpointer.close()
    raise


def _plan_start(config: ml_collections.ConfigDict, workdir: str,
                checkpointer: checkpoint.Checkpointer
                ) -> tuple[Start, int | None]:
  """(how the run starts, its newest checkpoint step); records the start
  in the run's history (`identity.start_run`, process 0)."""
  t = config.train
  latest = checkpointer.latest_step()
  if latest is None and _lost_its_checkpoints(workdir):
    _start_over(config, workdir, checkpointer)  # or refuse
  if latest is None:
    start = Start.FRESH
  elif checkpointer.newest_is_weights_only():
    start = Start.WEIGHTS_ONLY
  else:
    start = Start.FINISHED if latest >= t.steps else Start.RESUME
  if start is Start.WEIGHTS_ONLY and t.init_from:
    logging.warning("train.init_from=%r is ignored: %s holds imported "
                    "weights (checkpoint %d), which the run starts from",
                    t.init_from, workdir, latest)
  elif start is Start.FRESH and t.init_from:  # a wrong path fails early
    reader.resolve_checkpoint(t.init_from)
  if t.teacher:  # read at every start (frozen, not in the checkpoints)
    reader.resolve_checkpoint(t.teacher, "train.teacher")
  resuming = start in (Start.RESUME, Start.FINISHED)
  multihost.on_process_zero(lambda: identity.start_run(
      workdir, config, resuming=resuming, resume_step=latest or 0),
                            "accept this config for the run")
  return start, latest


def _checkpoint_layout(config: ml_collections.ConfigDict,
                       checkpointer: checkpoint.Checkpointer,
                       start: Start) -> ml_collections.ConfigDict:
  """`config` with the layer layout of the checkpoints a resume reads."""
  saved = checkpointer.saved_scan_layers() if start is Start.RESUME else None
  if saved is None or saved == config.model.scan_layers:
    return config
  logging.warning("model.scan_layers=%s, but the checkpoints in %s hold %s "
                  "layers: resuming in their layout", config.model.scan_layers,
                  checkpointer.directory, "scanned" if saved else "unrolled")
  config = config.copy_and_resolve_references()
  config.model.scan_layers = saved
  return config


def _build(config: ml_collections.ConfigDict, workdir: str,
           checkpointer: checkpoint.Checkpointer, start: Start) -> Run:
  """`build_run` once the start is decided."""
  t = config.train
  tokens_per_step = t.batch_size * t.seq_len
  # the tokenizer is checked against the run before the corpus is tokenized
  tokenizer = multihost.process_zero_first(
      lambda: data.prepare_tokenizer(config), "tokenizer_prepared")
  _check_tokenizers(config, workdir, tokenizer[1], start)
  prepared = multihost.process_zero_first(
      lambda: data.prepare(config, tokenizer), "data_prepared")
  mesh = sharding.make_mesh(config.mesh)
  tx = optimizer_lib.make_optimizer(config)

  def new_iterator():
    return data.train_iterator(prepared, config, jax.process_index(),
                               jax.process_count())

  iterator = new_iterator()
  graphdef, state, shardings = train_state.create_train_state(
      config, mesh, tx, initialize=False)
  facts = {"tokens_seen": 0}  # the checkpoint's `run` item
  restored = checkpointer.restore(state, iterator) if (
      start is Start.RESUME) else None
  if restored is not None:  # (checkpoints older than `run` lack its facts)
    state = restored.state
    facts = {"tokens_seen": restored.step * tokens_per_step,
             **restored.run}
  else:
    if start is Start.RESUME:
      _start_over(config, workdir, checkpointer)
      iterator = new_iterator()
    if checkpointer.newest_is_weights_only():  # (also behind damaged ones)
      start = Start.WEIGHTS_ONLY
      state = train_state.initial_state(
          config, tx, state, workdir, "the imported checkpoint of --workdir")
    else:
      start = Start.FRESH if start is Start.RESUME else start
      state = train_state.initial_state(config, tx, state, t.init_from)
  start_step = int(jax.device_get(state.step))
  logging.info("%s at step %d in %s on %d devices, mesh %s",
               "resuming" if start_step else "starting", start_step, workdir,
               jax.device_count(), dict(mesh.shape))
  logging.info("parameters:\n%s", parameter_overview.get_parameter_overview(
      state.params, include_stats=False))

  eval_local = data.eval_batches(prepared, config, jax.process_index(),
                                 jax.process_count())
  eval_global = [sharding.global_batch(b, mesh) for b in eval_local]
  eval_step = steps.make_eval_step(config, graphdef, shardings.params, mesh,
                                   objectives.NextToken(t))
  prompts = samples.sample_prompts(config, eval_local)
  tokens_seen = TokensSeen(start_step, facts["tokens_seen"], tokens_per_step)
  throughput = metrics.Throughput(tokens_per_step, t.steps)
  writer = metrics.MetricWriter(workdir, resume_step=start_step)
  monitor = health.HealthMonitor(config.health,
                                 vocab_size=config.model.vocab_size,
                                 total_steps=t.steps)
  if start_step:  # the alarms' state survives resumes
    monitor.replay([r for r in metrics.read_records(workdir)
                    if r["step"] <= start_step])
  guard = guards.DivergenceGuard(t.divergence_factor, t.divergence_patience)
  guard.restore(facts)  # the running minimum survives resumes

  checkpointing = checkpointing_lib.Checkpointing(
      t.checkpoint_every, checkpointer, guard, iterator, tokens_seen)
  alarms = records.HealthAlarms(config.health, monitor)
  evaluation = actions.Evaluation(
      t.eval_every,
      evaluate=lambda params, step: steps.evaluate(eval_step, params,
                                                   eval_global, step),
      sample=lambda params, step: samples.continue_prompts(
          config, graphdef, params, prompts, prepared.tokenizer, step),
      write_samples=writer.write_samples, throughput=throughput)
  harness_evaluation = _harness_evaluation(config, workdir, graphdef, mesh,
                                           prepared.tokenizer, throughput)
  metric_log = records.MetricLog(
      t.log_every, t.steps, writer, throughput, tokens_seen,
      flops_per_token=metrics.flops_per_token(
          metrics.matmul_params(state.params, config.model),
          config.model.n_layers, config.model.d_model, t.seq_len),
      peak_flops=metrics.peak_flops(jax.devices()),
      # in this order: a NaN or diverged loss stops the run before its
      # record feeds the collapse alarms
      checks=[checkpointing.check_record, alarms.check_record])
  preemption = actions.Preemption()
  return Run(
      config=config, workdir=workdir, start=start, start_step=start_step,
      state=state,
      train_step=steps.make_train_step(
          config, graphdef, tx, shardings, mesh,
          objectives.make_objective(config, mesh, prepared.tokenizer_path)),
      batches=(sharding.global_batch(b, mesh) for b in iterator),
      preemption=preemption,
      after_step=actions.AfterStep(
          [preemption, evaluation, *harness_evaluation], metric_log, alarms,
          checkpointing),
      throughput=throughput)


def _lost_its_checkpoints(workdir: str) -> bool:
  """Whether a run without checkpoints had some, all moved aside as damaged
  (`<step>-<unix time>` in damaged_checkpoints/), and has a history that a
  start from step 0 would overwrite (metric records)."""
  return bool(directory.damaged_steps(workdir)) and bool(
      metrics.read_records(workdir))


def _start_over(config: ml_collections.ConfigDict, workdir: str,
                checkpointer: checkpoint.Checkpointer) -> None:
  """A run whose checkpoints all failed to restore (each was moved to
  damaged_checkpoints/ with a WARNING, at this start or an earlier refused
  one): refuses, unless
  `train.start_over_if_unrestorable`; then moves the run's metrics, samples
  and TensorBoard files to `damaged_checkpoints/history-<unix time>/`, so
  that training again from step 0 overwrites none of its history.

  Raises:
    UnrestorableRunError: without `train.start_over_if_unrestorable`,
      naming the directories and the two ways on; nothing is changed.
  """
  damaged = paths.join(workdir, directory.DAMAGED_CHECKPOINTS)
  history = (directory.METRICS, directory.SAMPLES, directory.TENSORBOARD)
  if not config.train.start_over_if_unrestorable:
    raise checkpoint.UnrestorableRunError(
        f"no checkpoint in {checkpointer.directory} could be restored (each "
        f"was moved to {damaged}/; the WARNINGs above say why); "
        f"{', '.join(history)} are untouched. Rerun with "
        "--config.train.start_over_if_unrestorable=true to train the run "
        f"again from step 0 (those files are then kept in {damaged}/"
        "history-<unix time>/), or start a new run with another --workdir")
  kept = directory.damaged_history_dir(workdir, int(time.time()))

  def keep() -> None:
    for name in history:
      source = paths.join(workdir, name)
      if paths.isfile(source) or paths.isdir(source):
        paths.move(source, paths.join(kept, name))
  multihost.on_process_zero(keep, "keep the run's history aside")
  logging.warning("no checkpoint in %s could be restored: training the run "
                  "again from step 0 (train.start_over_if_unrestorable); "
                  "its %s are in %s", checkpointer.directory,
                  ", ".join(history), kept)


def _harness_evaluation(config: ml_collections.ConfigDict, workdir: str,
                        graphdef, mesh, tokenizer, throughput
                        ) -> list[actions.PeriodicAction]:
  """[the lm-eval tasks' action] with `eval.harness_tasks`, else [] (and
  lm-eval is not imported)."""
  if not config.eval.harness_tasks.strip():
    return []
  from bitnet_jax.training import harness  # pylint: disable=g-import-not-at-top
  return [harness.HarnessEvaluation(config, workdir, graphdef, mesh,
                                    tokenizer, throughput)]


def _check_tokenizers(config: ml_collections.ConfigDict, workdir: str,
                      tokenizer_path: str, start: Start) -> None:
  """The run keeps its tokenizer; `train.init_from`'s must match too."""
  t = config.train
  multihost.on_process_zero(lambda: identity.check_tokenizer(
      workdir, tokenizer_path, t.allow_config_change,
      resuming=start is not Start.FRESH), "accept the tokenizer")
  if start is Start.FRESH and t.init_from:
    multihost.on_process_zero(lambda: reader.check_init_tokenizer(
        t.init_from, tokenizer_path, t.allow_config_change),
                              "accept the tokenizer of train.init_from")
