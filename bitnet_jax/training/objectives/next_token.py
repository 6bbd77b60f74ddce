"""Next-token cross-entropy: the pretraining and fine-tuning objective.

loss = cross-entropy with label smoothing (`train.label_smoothing`), z-loss
(`train.z_loss_weight`) and the entropy bonus (`train.entropy_weight`), per
target position (`loss.logit_outputs`), summed over the positions the batch's
loss mask counts. Logged means: loss, nll (the plain cross-entropy, nats per
token), accuracy (argmax hits).
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from bitnet_jax.data.batch import Batch
from bitnet_jax.training import loss
from bitnet_jax.training.objectives.base import Objective


class NextToken(Objective):
  """Next-token cross-entropy (module docstring).

  Args:
    train: `config.train` (label_smoothing, z_loss_weight, entropy_weight,
      loss_chunk_size).
  """

  def __init__(self, train: ml_collections.ConfigDict):
    self.loss_weights = {"label_smoothing": train.label_smoothing,
                         "z_loss_weight": train.z_loss_weight,
                         "entropy_weight": train.entropy_weight}
    self.chunk_size = train.loss_chunk_size

  def outputs(self, model: Any, batch: Batch, *,
              block_statistics: bool = False, **forward: Any
              ) -> dict[str, jax.Array]:
    """Per-position outputs of `model` on `batch`.

    The logits are made `chunk_size` positions at a time (`loss.chunked`).

    Args:
      model: a `Transformer`; without chunks or block statistics, any
        callable mapping int32 tokens `[batch, seq_len]` (and
        `batch.features` as keywords) to logits `[batch, seq_len,
        vocab_size]`.
      batch: a `Batch`.
      block_statistics: also return the blocks' float32 `[n_layers]`
        `attention_rms` and `ffn_rms` (`Transformer.hidden_and_statistics`).
      **forward: `dropout_key` (training).

    Returns:
      float32 `[batch, seq_len]` `loss` (nats, with its regularizers), `nll`,
      `entropy` (of the predictive distribution, nats), `hit` (1 where the
      argmax is the target) and int32 `prediction` (the argmax).

    Raises:
      ValueError: if `train.loss_chunk_size` does not divide seq_len.
    """
    inputs, targets = batch.inputs, batch.targets
    features = {**batch.features, **forward}
    if not block_statistics and not 0 < self.chunk_size < targets.shape[1]:
      return loss.logit_outputs(model(inputs, **features), targets,
                                **self.loss_weights)
    hidden, blocks = model.hidden_and_statistics(inputs, **features)
    outputs = loss.chunked(
        lambda h, t: loss.logit_outputs(model.logits(h), t,
                                        **self.loss_weights),
        self.chunk_size, hidden, targets)
    return {**outputs, **blocks} if block_statistics else outputs

  def __call__(self, model: Any, batch: Batch, frozen: Any = None,
               **forward: Any) -> dict[str, jax.Array]:
    """Summed `loss`, `nll`, `accuracy` (hits) and `weight` (base.py)."""
    del frozen  # none
    outputs = self.outputs(model, batch, **forward)
    return loss.masked_sums({"loss": outputs["loss"], "nll": outputs["nll"],
                             "accuracy": outputs["hit"]}, batch.loss_mask)


def mean_loss(objective: Objective, model: Any, batch: Batch,
              frozen: Any = None, **forward: Any
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(mean loss, {term: mean}) of `objective` on one batch: every summed
  term divided by the counted positions (at least 1); float32 scalars."""
  sums = objective(model, batch, frozen, **forward)
  count = jax.numpy.maximum(sums.pop("weight"), 1.0)
  means = {name: value / count for name, value in sums.items()}
  return means.pop("loss"), means
