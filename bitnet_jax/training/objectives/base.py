"""The objective interface the train and eval steps are handed.

An objective maps (model, batch, frozen inputs) to summed terms: float32
scalars summed over the batch's target positions, each weighted by
`Batch.loss_mask` (`loss.masked_sums`), among them

  "loss"    what the gradient descends;
  "weight"  the sum of the loss mask, the count every other term is divided
            by (over the whole global batch, so micro-batches add up);

and any other term, logged under its name as a mean per counted position
("nll", "accuracy", "distill_kl", ...). `frozen` is a pytree of arrays the
objective reads but never trains (a teacher's parameters): the jitted step
takes it as an undonated argument in its own shardings. The step knows
nothing else about the objective (nanodo's loss factory, Levanter's
`Trainer(loss_fn=...)`).
"""

from __future__ import annotations

import abc
from typing import Any

import jax

from bitnet_jax.data.batch import Batch


class Objective(abc.ABC):
  """What a train step minimizes (module docstring).

  Attributes:
    frozen: a pytree of arrays handed to every step call (None: none).
  """

  frozen: Any = None

  @property
  def frozen_shardings(self) -> Any:
    """The shardings of `frozen` (the jitted step's third argument)."""
    return jax.tree.map(lambda x: x.sharding, self.frozen)

  @abc.abstractmethod
  def __call__(self, model: Any, batch: Batch, frozen: Any,
               **forward: Any) -> dict[str, jax.Array]:
    """Summed terms of `model` on `batch` (module docstring).

    Args:
      model: the trained `Transformer` (`transformer.bind`: parameters and
        step).
      batch: a `Batch` (one micro-batch).
      frozen: `self.frozen` as the jitted step sees it.
      **forward: keywords of the trained model's forward pass
        (`dropout_key`).
    """
