"""Objectives: what a train step minimizes, handed to the step as a value.

  base.py          the interface: (model, batch, frozen) -> summed terms
  next_token.py    `NextToken`, next-token cross-entropy (+ smoothing,
                   z-loss, entropy bonus)
  distillation.py  `Distillation`, BitDistill's CE + logit KL + attention-
                   relation KL against a frozen teacher
  teacher.py       the teacher: read once, checked against the student

`make_objective(config, ...)` picks the row of `OBJECTIVES` a config trains
with; a new objective is a module here and a row there, and the train step,
the loss utilities and the model stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import ml_collections

from bitnet_jax.training.objectives.base import Objective
from bitnet_jax.training.objectives.distillation import Distillation
from bitnet_jax.training.objectives.next_token import NextToken
from bitnet_jax.training.objectives.teacher import (
  abstract_teacher,
  load_teacher,
)


def objective_name(config: ml_collections.ConfigDict) -> str:
  """"distillation" when `train.teacher` names a teacher, else
  "next_token"."""
  return "distillation" if config.train.teacher else "next_token"


# name -> (config, mesh, tokenizer_json or None for shapes only) -> objective
OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "next_token": lambda config, mesh, tokenizer_json: NextToken(
        config.train),
    "distillation": lambda config, mesh, tokenizer_json: Distillation(
        config, load_teacher(config, mesh, tokenizer_json)
        if tokenizer_json is not None else abstract_teacher(config, mesh)),
}


def make_objective(config: ml_collections.ConfigDict,
                   mesh: jax.sharding.Mesh,
                   tokenizer_json: str | None) -> Objective:
  """The objective `config` trains with (`OBJECTIVES`).

  Args:
    config: the run's config.
    mesh: the run's mesh (where frozen inputs such as a teacher live).
    tokenizer_json: the run's tokenizer (a teacher's must match), or None
      to build the objective from shapes only (ahead-of-time lowering: no
      weights are read).

  Raises:
    ConfigError, RunIdentityError: see `teacher.load_teacher`.
  """
  return OBJECTIVES[objective_name(config)](config, mesh, tokenizer_json)


__all__ = ["OBJECTIVES", "Distillation", "NextToken", "Objective",
           "make_objective", "objective_name"]
