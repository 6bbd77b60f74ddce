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
  RoPE (`Attention.__call__(relations=True)`), and row t of R covers only
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

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

from bitnet_jax.storage import paths
from bitnet_jax.runs import reader
from bitnet_jax.model.attention import kv_heads
from bitnet_jax.config import ConfigError
from bitnet_jax.training.loss import outputs_from_hidden, split_batch
from bitnet_jax.model.transformer import quantization_blend

RELATION_TYPES = ("query", "key", "value")  # Q-Q, K-K, V-V


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen teacher model, read once.

  Attributes:
    config: the teacher run's config (its own `model`).
    graphdef: its model structure (static in the jitted step).
    params: its parameters, in the FSDP shardings of the student's mesh.
    step: the checkpoint read.
  """
  config: ml_collections.ConfigDict
  graphdef: nnx.GraphDef
  params: Any
  step: int

  @property
  def shardings(self) -> Any:
    return jax.tree.map(lambda x: x.sharding, self.params)

  @property
  def quant_blend(self) -> jax.Array | None:
    """The quantization blend of its config at `step` (None: its plain
    `model.quantization`)."""
    return quantization_blend(self.config, self.step)


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
      paths.join(workdir, "checkpoints", str(step)), shapes,
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


def teacher_outputs(teacher: Teacher, model: Any,
                    batch: Mapping[str, jax.Array],
                    config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The teacher's forward pass on a batch, without gradient.

  Args:
    teacher: the `Teacher` (its config and quantization blend).
    model: its `Transformer` (`nnx.merge(teacher.graphdef, params)`).
    batch: see `loss.split_batch`.
    config: the student's config (whether and where relations are needed).

  Returns:
    {"hidden": the final-norm output `[batch, seq_len, teacher d_model]`},
    plus "qkv" (the block's projections, `Attention.__call__`) with
    `train.distill_attention_weight` > 0.
  """
  inputs, _, features, _ = split_batch(batch)
  layer = None
  if config.train.distill_attention_weight > 0:
    layer = attention_layer(config.train, teacher.config.model, "teacher")
  hidden, stats = model.hidden_and_statistics(
      inputs, **features, quant_blend=teacher.quant_blend,
      capture_layer=layer)
  out = {"hidden": hidden}
  if layer is not None:
    out["qkv"] = stats["qkv"]
  return jax.lax.stop_gradient(out)


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


def distillation_sums(model: Any, teacher_model: Any,
                      teacher_out: Mapping[str, jax.Array],
                      batch: Mapping[str, jax.Array],
                      config: ml_collections.ConfigDict,
                      model_kwargs: Mapping[str, Any] | None = None
                      ) -> dict[str, jax.Array]:
  """The student's summed loss terms against the teacher on one batch.

  Sums over the counted positions (see `loss.next_token_sums`), so
  micro-batches add up: `loss` (ce_weight x the cross-entropy with its
  smoothing, z-loss and entropy terms + distill_logit_weight x KL +
  distill_attention_weight x the relation KL), `nll`, `entropy`, `hits`,
  `weight`, and the distillation terms `distill_kl`, `distill_attention`
  and `teacher_nll` (the teacher's own cross-entropy). float32 scalars.

  Args:
    model: the student `Transformer`.
    teacher_model: the teacher `Transformer` (its `logits`).
    teacher_out: `teacher_outputs` of this batch.
    batch: see `loss.split_batch`.
    config: the student's config (`train` weights, chunk size).
    model_kwargs: the student's `quant_blend`, `dropout_key`.
  """
  t = config.train
  inputs, targets, features, weights = split_batch(batch)
  if weights is None:
    weights = jnp.ones(targets.shape, jnp.float32)
  layer = attention_layer(t, config.model, "student") if (
      t.distill_attention_weight > 0) else None
  hidden, stats = model.hidden_and_statistics(
      inputs, **features, **(model_kwargs or {}), capture_layer=layer)
  outputs = outputs_from_hidden(
      model, hidden, targets, chunk_size=t.loss_chunk_size,
      teacher=(teacher_model, teacher_out["hidden"]),
      temperature=t.distill_temperature, label_smoothing=t.label_smoothing,
      z_loss_weight=t.z_loss_weight, entropy_weight=t.entropy_weight)
  relation = jnp.zeros(targets.shape, jnp.float32)
  if layer is not None:
    relation = attention_relation_distillation(
        teacher_out["qkv"], stats["qkv"], features.get("segment_ids"),
        t.loss_chunk_size)
  per_position = (t.ce_weight * outputs["loss"]
                  + t.distill_logit_weight * outputs["distill_kl"]
                  + t.distill_attention_weight * relation)

  def total(x):
    return jnp.sum(x * weights)

  return {"loss": total(per_position), "nll": total(outputs["nll"]),
          "entropy": total(outputs["entropy"]), "hits": total(outputs["hit"]),
          "weight": jnp.sum(weights),
          "distill_kl": total(outputs["distill_kl"]),
          "distill_attention": total(relation),
          "teacher_nll": total(outputs["teacher_nll"])}
