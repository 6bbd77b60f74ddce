"""Distillation from a frozen full-precision teacher (the BitDistill recipe).

BitNet Distillation (Wu et al., arXiv 2510.13998, eq. 8-13) fine-tunes a
converted 1.58-bit student against its full-precision original:

  loss = ce_weight x CE + distill_logit_weight x L_LD
         + distill_attention_weight x L_AD

- L_LD, logits distillation: T^2 KL(softmax(z_T / T) || softmax(z_S / T))
  per position (`loss.logit_distillation`), averaged over the counted
  positions like the cross-entropy.
- L_AD, multi-head attention-relation distillation of one block
  (MiniLMv2, Wang et al., arXiv 2012.15828, sec. 3.1; BitDistill eq. 10-11):
  for each relation type X in {Q, K, V} the block's projection is split
  into heads x_a `[seq, head_dim]` and R_a = softmax(x_a x_a^T /
  sqrt(head_dim)) `[seq, seq]`; then

    L_AD = 1/3 sum_{X in Q,K,V} 1/(A_X |x|) sum_a sum_t
           KL(R^T_{X,a,t} || R^S_{X,a,t})

  with A_X the heads of X (n_heads for Q, n_kv_heads for K and V) and |x|
  the counted positions. Two choices the papers leave open for a decoder
  are made here: Q and K are the q_proj / k_proj outputs before QK-norm and
  RoPE (`Attention.__call__(capture=True)`), and row t of R covers only
  the keys position t's attention can see (causal, within its document in
  packed windows), so no relation crosses what the model reads.

The teacher (`train.teacher`) is read once, frozen (it is an argument of
the jitted step, never differentiated nor updated), placed in the same FSDP
shardings as the student's parameters, and runs in the same step, per
micro-batch. Its logits are made chunk by chunk with the student's
(`train.loss_chunk_size`), so no `[batch, seq_len, vocab_size]` pair of
float32 logits is held.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from bitnet_jax.data.batch import Batch
from bitnet_jax.model.transformer import bind
from bitnet_jax.training import loss
from bitnet_jax.training.objectives.base import Objective
from bitnet_jax.training.objectives.teacher import Teacher, attention_layer

RELATION_TYPES = ("query", "key", "value")  # Q-Q, K-K, V-V


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


def _allowed(rows: jax.Array, segment_ids: jax.Array | None,
             row_segments: jax.Array | None, seq: int) -> jax.Array:
  """bool `[batch or 1, 1, rows, seq]`: the keys each query row sees."""
  causal = jnp.arange(seq)[None, None, None, :] <= rows[None, None, :, None]
  if segment_ids is None:
    return causal
  return causal & (row_segments[:, None, :, None]
                   == segment_ids[:, None, None, :])


def _relation_rows(teacher_rows: jax.Array, teacher_all: jax.Array,
                   student_rows: jax.Array, student_all: jax.Array,
                   allowed: jax.Array) -> jax.Array:
  """Per query row, the heads' mean KL of the relation rows: float32
  `[batch, rows]`. Inputs `[batch, rows or seq, heads, head_dim]`."""

  def log_relation(rows, all_):
    scores = jnp.einsum("bqhd,bkhd->bhqk", rows.astype(jnp.float32),
                        all_.astype(jnp.float32))
    scores = scores / jnp.sqrt(jnp.float32(rows.shape[-1]))
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.log_softmax(scores, axis=-1)

  teacher = log_relation(teacher_rows, teacher_all)
  student = log_relation(student_rows, student_all)
  kl = jnp.sum(jnp.where(allowed, jnp.exp(teacher) * (teacher - student),
                         0.0), axis=-1)  # [batch, heads, rows]
  return jnp.mean(kl, axis=1)


def attention_relation_distillation(
    teacher_qkv: Mapping[str, jax.Array], student_qkv: Mapping[str, jax.Array],
    segment_ids: jax.Array | None = None, chunk_size: int = 0) -> jax.Array:
  """Per-position attention-relation KL (module docstring, L_AD before the
  mean over positions).

  Args:
    teacher_qkv, student_qkv: {"query" `[batch, seq, n_heads, head_dim]`,
      "key", "value" `[batch, seq, n_kv_heads, head_dim]`}; the teacher's
      and the student's head counts agree, their head_dim may differ.
    segment_ids: optional int32 `[batch, seq]` (packed documents).
    chunk_size: query rows at a time (`train.loss_chunk_size`; 0: all),
      each chunk under `jax.checkpoint`: peak memory holds `[batch, heads,
      chunk_size, seq]` relations, not `[batch, heads, seq, seq]`.

  Returns:
    float32 `[batch, seq]`: 1/3 sum over Q, K, V of the heads' mean
    KL(R^T_t || R^S_t) at each query position t (nats); 0 where the
    relations agree.
  """
  seq = teacher_qkv["query"].shape[1]
  if not chunk_size or chunk_size >= seq:
    chunk_size = seq

  def rows_kl(start):
    rows = start + jnp.arange(chunk_size)
    row_segments = None if segment_ids is None else (
        jax.lax.dynamic_slice_in_dim(segment_ids, start, chunk_size, axis=1))
    allowed = _allowed(rows, segment_ids, row_segments, seq)
    total = 0.0
    for name in RELATION_TYPES:
      t_all, s_all = teacher_qkv[name], student_qkv[name]
      total = total + _relation_rows(
          jax.lax.dynamic_slice_in_dim(t_all, start, chunk_size, axis=1),
          t_all,
          jax.lax.dynamic_slice_in_dim(s_all, start, chunk_size, axis=1),
          s_all, allowed)
    return total / len(RELATION_TYPES)

  if chunk_size == seq:
    return rows_kl(0)
  starts = jnp.arange(0, seq, chunk_size)
  per_chunk = jax.lax.map(jax.checkpoint(rows_kl), starts)  # [n, batch, c]
  return jnp.swapaxes(per_chunk, 0, 1).reshape(per_chunk.shape[1], seq)


class Distillation(Objective):
  """The BitDistill loss against a frozen teacher (module docstring).

  Summed terms: `loss` (ce_weight x the cross-entropy with its smoothing,
  z-loss and entropy terms + distill_logit_weight x KL +
  distill_attention_weight x the relation KL), `nll`, `accuracy`,
  `distill_kl`, `distill_attention` (nats per position) and `teacher_loss`
  (the teacher's own cross-entropy), with `weight`.

  Args:
    config: the student's config (`train` weights, temperature, layer,
      chunk size).
    teacher: the `Teacher` (`teacher.load_teacher`, or
      `teacher.abstract_teacher` to lower a step); its parameters are
      `frozen`.
  """

  def __init__(self, config: ml_collections.ConfigDict, teacher: Teacher):
    t = config.train
    self.teacher, self.frozen = teacher, teacher.params
    self.loss_weights = {"label_smoothing": t.label_smoothing,
                         "z_loss_weight": t.z_loss_weight,
                         "entropy_weight": t.entropy_weight}
    self.weights = (t.ce_weight, t.distill_logit_weight,
                    t.distill_attention_weight)
    self.temperature, self.chunk_size = t.distill_temperature, (
        t.loss_chunk_size)
    self.student_layer = self.teacher_layer = None
    if t.distill_attention_weight > 0:
      self.student_layer = attention_layer(t, config.model, "student")
      self.teacher_layer = attention_layer(t, teacher.config.model,
                                           "teacher")

  def __call__(self, model: Any, batch: Batch, frozen: Any,
               **forward: Any) -> dict[str, jax.Array]:
    inputs, targets, features = batch.inputs, batch.targets, batch.features
    teacher_model = bind(self.teacher.graphdef, frozen, self.teacher.step)
    teacher_hidden, teacher_stats = jax.lax.stop_gradient(
        teacher_model.hidden_and_statistics(
            inputs, **features, capture_layer=self.teacher_layer))
    hidden, stats = model.hidden_and_statistics(
        inputs, **features, **forward, capture_layer=self.student_layer)

    def per_position(hidden, teacher_hidden, targets):
      logits = model.logits(hidden)
      teacher_logits = jax.lax.stop_gradient(
          teacher_model.logits(teacher_hidden))
      outputs = loss.logit_outputs(logits, targets, **self.loss_weights)
      outputs["distill_kl"] = logit_distillation(teacher_logits, logits,
                                                 self.temperature)
      outputs["teacher_loss"] = loss.logit_outputs(teacher_logits,
                                                   targets)["nll"]
      return outputs

    outputs = loss.chunked(per_position, self.chunk_size, hidden,
                           teacher_hidden, targets)
    relation = jnp.zeros(targets.shape, jnp.float32)
    if self.student_layer is not None:
      relation = attention_relation_distillation(
          teacher_stats["captured"], stats["captured"],
          features.get("segment_ids"), self.chunk_size)
    ce, logit, attention = self.weights
    return loss.masked_sums(
        {"loss": (ce * outputs["loss"] + logit * outputs["distill_kl"]
                  + attention * relation),
         "nll": outputs["nll"], "accuracy": outputs["hit"],
         "distill_kl": outputs["distill_kl"], "distill_attention": relation,
         "teacher_loss": outputs["teacher_loss"]}, batch.loss_mask)
