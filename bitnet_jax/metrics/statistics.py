"""Prediction statistics of the eval set: accuracy and the collapse signals.

`prediction_statistics` runs inside the jitted eval step and returns sums
that add up over batches and micro-batches; `summarize_eval` turns the summed
totals into the eval metrics on the host. The collapse signals:
`unique_predictions` (distinct argmax tokens: a collapsing model predicts a
handful), `copy_rate` (argmax equal to the current input token: a model that
copies its input, as tied embeddings or unshifted labels make it) and
`top_token_share`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


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
