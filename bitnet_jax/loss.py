"""Next-token cross-entropy on windows of seq_len + 1 tokens.

A batch is a dict: "tokens" int32 `[batch, seq_len + 1]`, and with
`data.packing="document"` also "segment_ids" and "positions" (same shape):
then attention stays within a document, RoPE positions restart at each
document, and the position whose target starts a new document is left out of
the loss and the metrics (weight 0).

The label shift lives here and only here: a window `[batch, seq_len + 1]` is
split into inputs `window[:, :-1]` and targets `window[:, 1:]`, so the logits
at position i are scored against token i + 1. (The seeds' first model was
scored against token i, a copy task whose loss fell "too fast".)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp


def split_window(window: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Splits int32 `[batch, seq_len + 1]` into inputs and targets.

  Returns:
    (inputs, targets), each int32 `[batch, seq_len]`, targets[:, i] being the
    token that follows inputs[:, i].

  Raises:
    ValueError: if the window is not 2-D with at least two tokens.
  """
  if window.ndim != 2 or window.shape[1] < 2:
    raise ValueError(f"expected a window [batch, seq_len + 1] with at least "
                     f"2 tokens, got shape {window.shape}")
  return window[:, :-1], window[:, 1:]


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
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  log_probs = logits - log_z[..., None]
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  loss = nll
  if label_smoothing:
    uniform = -jnp.mean(log_probs, axis=-1)
    loss = (1.0 - label_smoothing) * nll + label_smoothing * uniform
  if z_loss_weight:
    loss = loss + z_loss_weight * jnp.square(log_z)
  return loss


def split_batch(batch: Mapping[str, jax.Array]
                ) -> tuple[jax.Array, jax.Array, dict, jax.Array | None]:
  """Splits a batch into the model's inputs, targets and per-target weights.

  Args:
    batch: "tokens" int32 `[batch, seq_len + 1]`, optionally "segment_ids"
      and "positions" of the same shape (document packing).

  Returns:
    (inputs, targets, features, weights): inputs and targets int32
    `[batch, seq_len]`; features the model's keyword arguments
    (`segment_ids`, `positions` of the inputs; empty without packing);
    weights float32 `[batch, seq_len]`, 0 where the target lies in another
    document than the input, or None (all positions count).
  """
  inputs, targets = split_window(batch["tokens"])
  if "segment_ids" not in batch:
    return inputs, targets, {}, None
  segments = batch["segment_ids"]
  features = {"segment_ids": segments[:, :-1],
              "positions": batch["positions"][:, :-1]}
  weights = (segments[:, 1:] == segments[:, :-1]).astype(jnp.float32)
  return inputs, targets, features, weights


def weighted_mean(values: jax.Array, weights: jax.Array | None) -> jax.Array:
  """Mean of `values` `[batch, seq]`, over positions of weight 1 if given."""
  if weights is None:
    return jnp.mean(values)
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def next_token_loss(model: Callable[..., jax.Array],
                    batch: Mapping[str, jax.Array], *,
                    label_smoothing: float = 0.0,
                    z_loss_weight: float = 0.0
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean next-token loss of `model` on a batch of windows.

  Args:
    model: maps int32 tokens `[batch, seq_len]` (and the `features` of
      `split_batch` as keyword arguments) to logits
      `[batch, seq_len, vocab_size]`.
    batch: see `split_batch`.

  Returns:
    (loss, aux): loss is the float32 scalar mean over the counted positions
    (nats per token, smoothing and z-loss included); aux holds `nll`, the
    plain mean cross-entropy, and `accuracy`, the share of argmax hits.
  """
  inputs, targets, features, weights = split_batch(batch)
  logits = model(inputs, **features)
  losses = token_losses(logits, targets, label_smoothing=label_smoothing,
                        z_loss_weight=z_loss_weight)
  nll = token_losses(logits, targets) if (label_smoothing or z_loss_weight) \
      else losses
  hits = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  return weighted_mean(losses, weights), {
      "nll": weighted_mean(nll, weights),
      "accuracy": weighted_mean(hits, weights)}
