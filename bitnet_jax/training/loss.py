"""Per-position loss terms of next-token prediction, and their masked sums.

The building blocks of the objectives (`bitnet_jax.training.objectives`) and
the eval step: the cross-entropy and its regularizers from one log-softmax
(`logit_outputs`), made `chunk_size` positions at a time so that no
`[batch, seq_len, vocab_size]` float32 logits are ever held (`chunked`), and
weighted sums over a batch by its loss mask (`masked_sums`). The label shift
lives in `bitnet_jax.data.batch.split_window`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp


def token_losses(logits: jax.Array, targets: jax.Array, *,
                 label_smoothing: float = 0.0,
                 z_loss_weight: float = 0.0) -> jax.Array:
  """Per-position cross-entropy in nats.

  loss_i = (1 - a) * (-log p(target_i)) + a * mean_v(-log p(v))
           + z * logsumexp(logits_i)**2
  with a = label_smoothing (Szegedy et al., arXiv 1512.00567) and z =
  z_loss_weight (PaLM, arXiv 2204.02311, sec. 5).

  Args:
    logits: float `[batch, seq, vocab_size]` (computed in float32).
    targets: int32 `[batch, seq]`.

  Returns:
    float32 `[batch, seq]`.
  """
  return logit_outputs(logits, targets, label_smoothing=label_smoothing,
                       z_loss_weight=z_loss_weight)["loss"]


def logit_outputs(logits: jax.Array, targets: jax.Array, *,
                  label_smoothing: float = 0.0, z_loss_weight: float = 0.0,
                  entropy_weight: float = 0.0) -> dict[str, jax.Array]:
  """Per-position loss terms and predictions from one log-softmax.

  loss = token_losses(...) - entropy_weight * entropy, where entropy =
  -sum_v p_v log p_v (nats) is the predictive distribution's: an
  "entropy regularization" (a bonus for spread-out predictions, against
  vocabulary collapse; Pereyra et al., "Regularizing Neural Networks by
  Penalizing Confident Output Distributions", arXiv 1701.06548).

  Args:
    logits: float `[..., vocab_size]` (computed in float32).
    targets: int32 `[...]`.

  Returns:
    float32 `[...]` arrays `loss`, `nll` (plain cross-entropy), `entropy`,
    `hit` (1 where argmax = target), and int32 `prediction` (the argmax).
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_probs = logits - log_z[..., None]
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
  loss = nll
  if label_smoothing:
    uniform = -jnp.mean(log_probs, axis=-1)
    loss = (1.0 - label_smoothing) * nll + label_smoothing * uniform
  if z_loss_weight:
    loss = loss + z_loss_weight * jnp.square(log_z)
  if entropy_weight:
    loss = loss - entropy_weight * entropy
  prediction = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  return {"loss": loss, "nll": nll, "entropy": entropy,
          "prediction": prediction,
          "hit": (prediction == targets).astype(jnp.float32)}


def chunked(fn: Callable[..., dict[str, jax.Array]], chunk_size: int,
            *arrays: jax.Array) -> dict[str, jax.Array]:
  """`fn(*arrays)` made `chunk_size` positions at a time.

  `fn` maps arrays `[batch, seq, ...]` to a dict of per-position arrays
  `[batch, seq]`. With 0 < chunk_size < seq the arrays are cut into
  `[batch, chunk_size, ...]` blocks along the position axis and `fn` runs on
  each in turn (`jax.lax.map`), under `jax.checkpoint`, so the backward pass
  recomputes a block instead of keeping it: peak memory holds one chunk's
  logits, never `[batch, seq_len, vocab_size]`. The results equal one call
  on the whole arrays to float rounding.

  Raises:
    ValueError: if `chunk_size` does not divide seq (naming
      `train.loss_chunk_size`).
  """
  seq_len = arrays[0].shape[1]
  if not chunk_size or chunk_size >= seq_len:
    return fn(*arrays)
  if seq_len % chunk_size:
    raise ValueError(f"train.loss_chunk_size={chunk_size} must divide "
                     f"seq_len={seq_len}")

  def chunks(x):  # [batch, seq, ...] -> [n_chunks, batch, chunk, ...]
    x = x.reshape(x.shape[0], seq_len // chunk_size, chunk_size,
                  *x.shape[2:])
    return jnp.swapaxes(x, 0, 1)

  chunk_outputs = jax.checkpoint(fn)
  stacked = jax.lax.map(lambda xs: chunk_outputs(*xs),
                        tuple(map(chunks, arrays)))
  batch = arrays[0].shape[0]
  return jax.tree.map(
      lambda x: jnp.swapaxes(x, 0, 1).reshape(batch, seq_len), stacked)


def masked_sums(per_position: Mapping[str, jax.Array],
                loss_mask: jax.Array) -> dict[str, jax.Array]:
  """{name: sum(per_position[name] * loss_mask)} plus "weight" =
  sum(loss_mask): float32 scalars.

  Sums, not means, so that micro-batches add up to exactly the whole
  batch's statistics (gradient accumulation); a mean is a sum / "weight".

  Args:
    per_position: float32 `[batch, seq_len]` arrays.
    loss_mask: float32 `[batch, seq_len]` (`Batch.loss_mask`).
  """
  sums = {name: jnp.sum(value * loss_mask)
          for name, value in per_position.items()}
  sums["weight"] = jnp.sum(loss_mask)
  return sums
