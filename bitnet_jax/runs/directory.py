"""The names of a run directory's files and folders, each named once here.

A run directory (`--workdir`, local or gs://) holds:

  config.json            the config of the first start
  config.py              an imported model's config (`convert import-hf`)
  config_history.jsonl   one line per start
  config.replaced-<UTC stamp>.json
                         a config.json a new run overwrote
  tokenizer.json         the run's tokenizer
  checkpoints/<step>/    orbax checkpoints: items `state`, `data`, `run`
  damaged_checkpoints/<step>-<unix time>/
                         checkpoints that failed to restore
  damaged_checkpoints/history-<unix time>/
                         metrics, samples and TensorBoard files of a run
                         started over when none restored
  metrics.jsonl          metric records
  samples.jsonl          greedy continuations at each evaluation
  tensorboard/           TensorBoard event files
  run.lock               the one-writer lock while a command writes
  hf_source/             the imported HF folder's config and tokenizer files

The names are on disk in every run written so far: changing one orphans
those runs' files (tests/unit/test_run_identity.py pins them).
"""

from __future__ import annotations

from bitnet_jax.storage import paths

# Written by runs.identity (process 0) at a run's first start; rewritten
# only by a start that finds no checkpoint (a new run).
CONFIG_JSON = "config.json"
# Written once by `convert import-hf`, before any training; read when the
# run has no config.json yet (runs.reader.load_run_config).
CONFIG_PY = "config.py"
# Appended by runs.identity at every start: time, host, argv, the config and
# what changed.
CONFIG_HISTORY = "config_history.jsonl"
# Written by runs.identity beside config.json when a new run overwrites a
# config.json the history does not hold; `{stamp}` is UTC %Y%m%dT%H%M%SZ.
REPLACED_CONFIG = "config.replaced-{stamp}.json"
# Copied by runs.identity at the first start (replaced, with a WARNING, by
# a start without checkpoints that loads another one), or by `convert
# import-hf` from the HF folder.
TOKENIZER_JSON = "tokenizer.json"
# The Checkpointer's directory (runs.checkpoint): one `<step>/` per save,
# every train.checkpoint_every steps and at the end; `convert import-hf`
# writes a weights-only `0/`.
CHECKPOINTS = "checkpoints"
# The orbax item of `checkpoints/<step>/` that holds the arrays (params,
# optimizer state, step), written by runs.checkpoint.Checkpointer; a step
# directory without it is not a complete checkpoint (runs.reader).
CHECKPOINT_STATE = "state"
# Beside checkpoints/: Checkpointer.restore moves a checkpoint it cannot read
# here, as `<step>-<unix time>`, with a WARNING; never deleted.
DAMAGED_CHECKPOINTS = "damaged_checkpoints"
# In DAMAGED_CHECKPOINTS: where a start with train.start_over_if_unrestorable
# moves METRICS, SAMPLES and TENSORBOARD when no checkpoint restored, before
# the run starts again at step 0; `{time}` is the unix time.
DAMAGED_HISTORY = "history-{time}"
# Appended by metrics.MetricWriter (process 0): a train record every
# train.log_every steps, an eval record at each evaluation; a restart drops
# the lines after its checkpoint's step (all of them at step 0).
METRICS = "metrics.jsonl"
# Appended by MetricWriter.write_samples at each evaluation (one line per
# prompt), truncated like metrics.jsonl.
SAMPLES = "samples.jsonl"
# MetricWriter's TensorBoard event files (process 0), the same scalars as
# metrics.jsonl and the samples' texts.
TENSORBOARD = "tensorboard"
# Held by runs.lock.WorkdirLock (runs.gcs_lock on gs://) while training
# runs (training.loop); `run.lock.tmp.<token>` and `run.lock.stale.<token>`
# exist
# for a moment while it is taken.
RUN_LOCK = "run.lock"
# Written by `convert import-hf`: the imported folder's config.json,
# generation / tokenizer configs and chat template, read back by export-hf
# and for the special tokens (runs.reader.hf_source_config).
HF_SOURCE = "hf_source"


def checkpoints_dir(workdir: str) -> str:
  """`WORKDIR/checkpoints`, the directory of the run's `Checkpointer`."""
  return paths.join(workdir, CHECKPOINTS)


def checkpoint_dir(workdir: str, step: int) -> str:
  """`WORKDIR/checkpoints/<step>`, one checkpoint."""
  return paths.join(workdir, CHECKPOINTS, str(step))


def damaged_checkpoint_dir(workdir: str, step: int, unix_time: int) -> str:
  """`WORKDIR/damaged_checkpoints/<step>-<unix time>`: where a checkpoint
  that failed to restore is moved (`DAMAGED_CHECKPOINTS`)."""
  return paths.join(workdir, DAMAGED_CHECKPOINTS, f"{step}-{unix_time}")


def damaged_steps(workdir: str) -> list[int]:
  """The steps of the checkpoints moved to damaged_checkpoints/ (each time
  one was moved: a step may repeat); [] when there is none."""
  names = paths.listdir(paths.join(workdir, DAMAGED_CHECKPOINTS))
  return [int(step) for step, _, unix_time in (n.partition("-") for n in names)
          if step.isdigit() and unix_time.isdigit()]


def damaged_history_dir(workdir: str, unix_time: int) -> str:
  """`WORKDIR/damaged_checkpoints/history-<unix time>` (`DAMAGED_HISTORY`)."""
  return paths.join(workdir, DAMAGED_CHECKPOINTS,
                    DAMAGED_HISTORY.format(time=unix_time))


def replaced_config_name(stamp: str) -> str:
  """The name a replaced config.json is kept under (`REPLACED_CONFIG`)."""
  return REPLACED_CONFIG.format(stamp=stamp)
