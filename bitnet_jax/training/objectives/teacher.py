"""The frozen teacher of distillation: read once, checked against the student.

`train.teacher` names a run directory or one of its checkpoints
(`RUN/checkpoints/N`). Its parameters are read once, into the FSDP shardings
the student's parameters get on the same mesh, and never updated: the
distillation objective hands them to the jitted step as its frozen input.
`abstract_teacher` gives the same structure as shapes only, to lower a
distillation step ahead of time (`bitnet_jax.aot`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
from absl import logging
from flax import nnx

from bitnet_jax.config import ConfigError
from bitnet_jax.model.attention import kv_heads
from bitnet_jax.runs import directory, reader
from bitnet_jax.storage import paths


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen teacher model, read once.

  Attributes:
    config: the teacher run's config (its own `model`).
    graphdef: its model structure (static in the jitted step).
    params: its parameters, in the FSDP shardings of the student's mesh
      (`jax.ShapeDtypeStruct`s from `abstract_teacher`).
    step: the checkpoint read (its quantization blend, `transformer.bind`).
  """
  config: ml_collections.ConfigDict
  graphdef: nnx.GraphDef
  params: Any
  step: int


def attention_layer(train: ml_collections.ConfigDict,
                    model: ml_collections.ConfigDict, who: str) -> int:
  """`train.distill_attention_layer` as a block index of `model` (-1: the
  last block).

  Raises:
    ConfigError: naming `train.distill_attention_layer` when the index is
      outside the model `who` names (the student or the teacher).
  """
  layer, n_layers = train.distill_attention_layer, model.n_layers
  index = layer + n_layers if layer < 0 else layer
  if not 0 <= index < n_layers:
    raise ConfigError(
        f"config.train.distill_attention_layer={layer} is outside the "
        f"{who}'s {n_layers} blocks: use 0 .. {n_layers - 1}, or -1 for the "
        "last")
  return index


def check_teacher(config: ml_collections.ConfigDict,
                  teacher_config: ml_collections.ConfigDict) -> None:
  """Refuses a teacher the student cannot be distilled from.

  Raises:
    ConfigError: naming `train.teacher` and the field when the vocabularies
      differ (the logits' KL needs one vocabulary), or, with
      `train.distill_attention_weight` > 0, the attention heads differ (a
      relation head of the teacher per head of the student) or the layer
      is outside either model.
  """
  t, m, tm = config.train, config.model, teacher_config.model
  if tm.vocab_size != m.vocab_size:
    raise ConfigError(
        f"config.train.teacher={t.teacher!r} has model.vocab_size="
        f"{tm.vocab_size}, the student {m.vocab_size}: distillation needs "
        "one vocabulary (the teacher's tokenizer)")
  if t.distill_attention_weight > 0:
    for name, ours, theirs in (("n_heads", m.n_heads, tm.n_heads),
                               ("n_kv_heads", kv_heads(m), kv_heads(tm))):
      if ours != theirs:
        raise ConfigError(
            f"config.train.teacher={t.teacher!r} has model.{name}={theirs}, "
            f"the student {ours}: attention-relation distillation compares "
            "head by head; set train.distill_attention_weight=0 or use a "
            "teacher with the student's heads")
    attention_layer(t, m, "student")
    attention_layer(t, tm, "teacher")


def _teacher_run(config: ml_collections.ConfigDict
                 ) -> tuple[str, int, ml_collections.ConfigDict]:
  """(run directory, checkpoint step, run config) of `train.teacher`,
  checked against the student (`check_teacher`)."""
  directory, step = reader.resolve_checkpoint(config.train.teacher,
                                            "train.teacher")
  workdir = paths.parent(directory)
  teacher_config = reader.load_run_config(workdir)
  check_teacher(config, teacher_config)
  return workdir, step, teacher_config


def load_teacher(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                 tokenizer_json: str) -> Teacher | None:
  """Reads `train.teacher` into the student's parameter shardings (None
  without a teacher).

  Args:
    config: the student's config.
    mesh: the run's mesh; the teacher's parameters get the FSDP shardings
      the student's get (`sharding.state_shardings`).
    tokenizer_json: the student's tokenizer; the teacher run's must match
      (`reader.check_init_tokenizer`).

  Raises:
    ConfigError: naming `train.teacher` when no checkpoint is there or it
      does not fit (`check_teacher`).
    RunIdentityError: the teacher was trained with another tokenizer.
  """
  t = config.train
  if not t.teacher:
    return None
  workdir, step, teacher_config = _teacher_run(config)
  reader.check_init_tokenizer(t.teacher, tokenizer_json, t.allow_config_change,
                            key="train.teacher")
  graphdef, shapes = reader.sharded_abstract_model(teacher_config.model, mesh)
  params, _ = reader.load_params(
      directory.checkpoint_dir(workdir, step), shapes,
      key="train.teacher")
  logging.info("distilling from the teacher %s (checkpoint %d, "
               "model.quantization=%s)", workdir, step,
               teacher_config.model.quantization)
  if teacher_config.model.quantization != "none":
    logging.warning("train.teacher=%r is a %s model, not a full-precision "
                    "one: BitDistill distils from the full-precision "
                    "original (`convert import-hf --quantization=none`)",
                    t.teacher, teacher_config.model.quantization)
  return Teacher(config=teacher_config, graphdef=graphdef, params=params,
                 step=step)


def abstract_teacher(config: ml_collections.ConfigDict,
                     mesh: jax.sharding.Mesh) -> Teacher | None:
  """`train.teacher` as shapes only: its run's config and parameter
  `jax.ShapeDtypeStruct`s in the FSDP shardings of `mesh` (no weights are
  read), so a distillation step can be lowered and compiled ahead of time
  (`bitnet_jax.aot`). None without a teacher.

  Raises:
    ConfigError: as `load_teacher`, for the checkpoint and the fit.
  """
  if not config.train.teacher:
    return None
  _, step, teacher_config = _teacher_run(config)
  graphdef, shapes = reader.sharded_abstract_model(teacher_config.model, mesh)
  return Teacher(config=teacher_config, graphdef=graphdef, params=shapes,
                 step=step)


