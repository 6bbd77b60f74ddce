"""Next-token cross-entropy on windows of seq_len + 1 tokens.

A batch is a dict: "tokens" int32 `[batch, seq_len + 1]`, and with
`data.packing="document"` also "segment_ids" and "positions" (same shape):
then attention stays within a document, RoPE positions restart at each
document, and the position whose target starts a new document is left out of
the loss and the metrics (weight 0).

The label shift lives here and only here: a window `[batch, seq_len + 1]` is
split into inputs `window[:, :-1]` and targets `window[:, 1:]`, so the logits
at position i are scored against token i + 1. (Scored against token i, the
task is copying, and the loss falls "too fast": measured in the lab notes of
../shared/seeds, reproduced by experiments/copy_bug.py.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

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
  return logit_outputs(logits, targets, label_smoothing=label_smoothing,
                       z_loss_weight=z_loss_weight)["loss"]


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


def logit_distillation(teacher_logits: jax.Array, student_logits: jax.Array,
                       temperature: float = 1.0) -> jax.Array:
  """Per-position KL(teacher || student) of the softened distributions, x T^2.

  kl_i = T^2 * sum_v p_v (log p_v - log q_v), p = softmax(teacher / T),
  q = softmax(student / T): Hinton et al., "Distilling the Knowledge in a
  Neural Network" (arXiv 1503.02531, sec. 2; the T^2 keeps the gradient's
  scale as T changes), BitDistill's logits distillation (arXiv 2510.13998,
  eq. 8-9).

  Args:
    teacher_logits, student_logits: float `[..., vocab_size]` (computed in
      float32); the teacher's get no gradient.
    temperature: T > 0.

  Returns:
    float32 `[...]`, nats (x T^2); 0 where the two logits agree.
  """
  teacher = jax.nn.log_softmax(
      jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature)
  student = jax.nn.log_softmax(student_logits.astype(jnp.float32)
                               / temperature)
  return temperature ** 2 * jnp.sum(jnp.exp(teacher) * (teacher - student),
                                    axis=-1)


def _with_teacher(outputs: dict, student_logits: jax.Array,
                  teacher_logits: jax.Array, targets: jax.Array,
                  temperature: float) -> dict:
  """`outputs` plus `distill_kl` and the teacher's own `teacher_nll`."""
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  log_probs = jax.nn.log_softmax(teacher_logits.astype(jnp.float32))
  return {**outputs,
          "distill_kl": logit_distillation(teacher_logits, student_logits,
                                           temperature),
          "teacher_nll": -jnp.take_along_axis(
              log_probs, targets[..., None], axis=-1)[..., 0]}


def outputs_from_hidden(model: Any, hidden: jax.Array, targets: jax.Array,
                        *, chunk_size: int = 0,
                        teacher: tuple[Any, jax.Array] | None = None,
                        temperature: float = 1.0, **loss_weights: float
                        ) -> dict[str, jax.Array]:
  """`logit_outputs` of `model.logits(hidden)`, `chunk_size` positions at a
  time when > 0 (see `position_outputs`).

  Args:
    model: a `bitnet_jax.model.transformer.Transformer` (its `logits`).
    hidden: `[batch, seq_len, d_model]`, the model's final-norm output.
    targets: int32 `[batch, seq_len]`.
    teacher: None, or (teacher Transformer, its final-norm output `[batch,
      seq_len, teacher d_model]`): the outputs add float32 `[batch,
      seq_len]` `distill_kl` (`logit_distillation` at `temperature`) and
      `teacher_nll`, the teacher's cross-entropy; the teacher's logits are
      made chunk by chunk too, so no `[batch, seq_len, vocab_size]` pair is
      ever held.
    **loss_weights: `label_smoothing`, `z_loss_weight`, `entropy_weight`.

  Raises:
    ValueError: if `chunk_size` does not divide seq_len.
  """
  seq_len = targets.shape[1]

  def outputs_of(hidden, targets, teacher_hidden=None):
    logits = model.logits(hidden)
    outputs = logit_outputs(logits, targets, **loss_weights)
    if teacher is None:
      return outputs
    return _with_teacher(outputs, logits, teacher[0].logits(teacher_hidden),
                         targets, temperature)

  teacher_hidden = () if teacher is None else (teacher[1],)
  if not chunk_size or chunk_size >= seq_len:
    return outputs_of(hidden, targets, *teacher_hidden)
  if seq_len % chunk_size:
    raise ValueError(f"train.loss_chunk_size={chunk_size} must divide "
                     f"seq_len={seq_len}")

  def chunks(x):  # [batch, seq, ...] -> [n_chunks, batch, chunk, ...]
    x = x.reshape(x.shape[0], seq_len // chunk_size, chunk_size,
                  *x.shape[2:])
    return jnp.swapaxes(x, 0, 1)

  chunk_outputs = jax.checkpoint(outputs_of)
  stacked = jax.lax.map(
      lambda xs: chunk_outputs(*xs),
      (chunks(hidden), chunks(targets), *map(chunks, teacher_hidden)))
  return jax.tree.map(
      lambda x: jnp.swapaxes(x, 0, 1).reshape(targets.shape), stacked)


def position_outputs(model: Any, batch: Mapping[str, jax.Array], *,
                     label_smoothing: float = 0.0, z_loss_weight: float = 0.0,
                     entropy_weight: float = 0.0, chunk_size: int = 0,
                     model_kwargs: Mapping[str, Any] | None = None,
                     block_statistics: bool = False
                     ) -> dict[str, jax.Array]:
  """Per-position losses and predictions of `model` on a batch of windows.

  With `chunk_size` > 0 the logits are made `chunk_size` positions at a time
  (`jax.lax.map` over `[batch, chunk_size, vocab_size]` blocks, each under
  `jax.checkpoint`, so the backward pass recomputes a block instead of keeping
  it): peak memory holds one chunk's logits, never `[batch, seq_len,
  vocab_size]`. The results equal the unchunked ones to float rounding.

  Args:
    model: with `chunk_size` 0, a callable mapping int32 tokens
      `[batch, seq_len]` (and the `features` of `split_batch` as keywords) to
      logits `[batch, seq_len, vocab_size]`; with chunks, a
      `bitnet_jax.model.transformer.Transformer` (its `hidden` and `logits`).
    batch: see `split_batch`.
    label_smoothing, z_loss_weight, entropy_weight: see `logit_outputs`.
    chunk_size: positions per chunk; must divide seq_len (0: no chunks).
    model_kwargs: extra keywords of the forward pass (`quant_blend`,
      `dropout_key`).
    block_statistics: also return the blocks' float32 `[n_layers]`
      `attention_rms` and `ffn_rms` (`Transformer.hidden_and_statistics`;
      needs a Transformer).

  Returns:
    float32 `[batch, seq_len]` arrays: `loss` (nats, with label smoothing,
    z-loss and the entropy bonus), `nll` (plain cross-entropy), `entropy`
    (of the predictive distribution, nats), `hit` (1 where argmax =
    target), and int32 `prediction` (the argmax token), plus `weight`
    (float32, 0 where a target lies in another document, see
    `split_batch`).

  Raises:
    ValueError: if `chunk_size` does not divide seq_len.
  """
  inputs, targets, features, weights = split_batch(batch)
  if weights is None:
    weights = jnp.ones(targets.shape, jnp.float32)
  loss_weights = {"label_smoothing": label_smoothing,
                  "z_loss_weight": z_loss_weight,
                  "entropy_weight": entropy_weight}
  features = {**features, **(model_kwargs or {})}
  blocks = {}
  if block_statistics or 0 < chunk_size < targets.shape[1]:
    hidden, blocks = model.hidden_and_statistics(inputs, **features)
    outputs = outputs_from_hidden(model, hidden, targets,
                                  chunk_size=chunk_size, **loss_weights)
  else:
    outputs = logit_outputs(model(inputs, **features), targets,
                            **loss_weights)
  return {**outputs, "weight": weights,
          **(blocks if block_statistics else {})}


def next_token_sums(model: Any, batch: Mapping[str, jax.Array],
                    **kwargs: Any) -> dict[str, jax.Array]:
  """Weighted sums over a batch: `loss`, `nll`, `entropy`, `hits` and
  `weight`.

  Sums (not means) so that micro-batches add up to exactly the whole batch's
  statistics (gradient accumulation): the mean loss is loss / weight.
  Keyword arguments as for `position_outputs`; float32 scalars.
  """
  outputs = position_outputs(model, batch, **kwargs)
  weight = outputs["weight"]
  return {"loss": jnp.sum(outputs["loss"] * weight),
          "nll": jnp.sum(outputs["nll"] * weight),
          "entropy": jnp.sum(outputs["entropy"] * weight),
          "hits": jnp.sum(outputs["hit"] * weight),
          "weight": jnp.sum(weight)}


def next_token_loss(model: Any, batch: Mapping[str, jax.Array],
                    **kwargs: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean next-token loss of `model` on a batch of windows.

  Args:
    model, batch, **kwargs: see `position_outputs`.

  Returns:
    (loss, aux): loss is the float32 scalar mean over the counted positions
    (nats per token, smoothing and z-loss included); aux holds `nll`, the
    plain mean cross-entropy, and `accuracy`, the share of argmax hits.
  """
  sums = next_token_sums(model, batch, **kwargs)
  count = jnp.maximum(sums["weight"], 1.0)
  return sums["loss"] / count, {"nll": sums["nll"] / count,
                                "accuracy": sums["hits"] / count}
