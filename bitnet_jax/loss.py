"""Next-token cross-entropy on windows of seq_len + 1 tokens.

The label shift lives here and only here: a window `[batch, seq_len + 1]` is
split into inputs `window[:, :-1]` and targets `window[:, 1:]`, so the logits
at position i are scored against token i + 1. (The seeds' first model was
scored against token i, a copy task whose loss fell "too fast".)
"""

from __future__ import annotations

from collections.abc import Callable

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


def next_token_loss(model: Callable[[jax.Array], jax.Array],
                    window: jax.Array, *, label_smoothing: float = 0.0,
                    z_loss_weight: float = 0.0
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean next-token loss of `model` on a batch of windows.

  Args:
    model: maps int32 tokens `[batch, seq_len]` to logits
      `[batch, seq_len, vocab_size]`.
    window: int32 `[batch, seq_len + 1]`.

  Returns:
    (loss, aux): loss is the float32 scalar mean over all positions (nats per
    token, smoothing and z-loss included); aux holds `nll`, the plain mean
    cross-entropy, and `accuracy`, the share of argmax hits.
  """
  inputs, targets = split_window(window)
  logits = model(inputs)
  losses = token_losses(logits, targets, label_smoothing=label_smoothing,
                        z_loss_weight=z_loss_weight)
  nll = token_losses(logits, targets) if (label_smoothing or z_loss_weight) \
      else losses
  accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == targets)
  return jnp.mean(losses), {"nll": jnp.mean(nll), "accuracy": accuracy}
