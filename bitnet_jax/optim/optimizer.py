"""The BitNet b1.58 two-stage optimizer as one optax chain.

Source: Microsoft, "The Era of 1-bit LLMs: Training Tips, Code and FAQ"
(microsoft/unilm, bitnet/): Adam beta (0.9, 0.95), linear warmup of 375 steps,
linear decay, and at 50% of training a drop of the peak learning rate
(1.5e-3 -> 1e-3 at 700M) with weight decay switched from 0.1 to 0.

  lr(step) = stage_peak(step) * decay(step)
  decay    = step / warmup during warmup, then linear from 1 at the end of
             warmup to final_learning_rate_fraction at the last step
  stage_peak = learning_rate before the boundary, stage2_learning_rate after

So the drop at the boundary is stage2_learning_rate / learning_rate, read on
the same decay line (the FAQ's figure: ~0.51x peak -> ~0.35x peak at 50%).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from bitnet_jax.model.tree_paths import bitlinear_kind, path_keys


def stage_boundary_step(config: ml_collections.ConfigDict) -> int:
  """The first step of stage 2: round(stage_boundary x train.steps)."""
  return round(config.optimizer.stage_boundary * config.train.steps)


def learning_rate_schedule(config: ml_collections.ConfigDict
                           ) -> optax.Schedule:
  """Warmup -> stage-1 linear decay -> drop -> stage-2 linear decay.

  Returns:
    An optax schedule, step (int) -> learning rate (float32, per step).
  """
  o, steps = config.optimizer, config.train.steps
  warmup, boundary = o.warmup_steps, stage_boundary_step(config)
  decay_steps = max(steps - 1 - warmup, 1)
  final = o.final_learning_rate_fraction

  def decay(step: int) -> float:  # the shared line, 1 at warmup's end
    return 1.0 - (1.0 - final) * min(max(step - warmup, 0) / decay_steps, 1.0)

  stage1 = optax.linear_schedule(
      o.learning_rate * decay(warmup), o.learning_rate * decay(boundary),
      transition_steps=boundary - warmup)
  stage2 = optax.linear_schedule(
      o.stage2_learning_rate * decay(boundary),
      o.stage2_learning_rate * decay(steps - 1),
      transition_steps=max(steps - 1 - boundary, 1))
  schedules = [stage1, stage2]
  boundaries = [boundary]
  if warmup > 0:
    schedules.insert(0, optax.linear_schedule(0.0, o.learning_rate, warmup))
    boundaries.insert(0, warmup)
  return optax.join_schedules(schedules, boundaries)


def weight_decay_schedule(config: ml_collections.ConfigDict
                          ) -> optax.Schedule:
  """weight_decay until the stage boundary, stage2_weight_decay from it on."""
  o = config.optimizer
  return optax.join_schedules(
      [optax.constant_schedule(o.weight_decay),
       optax.constant_schedule(o.stage2_weight_decay)],
      [stage_boundary_step(config)])


def weight_decay_mask(params: Any, decay_embeddings: bool = False) -> Any:
  """True for the leaves that get weight decay, False elsewhere.

  Decayed: the `kernel` of every BitLinear (q/k/v/o, gate/up/down; `[in,
  out]`, or `[n_layers, in, out]` when scanned), and
  with `decay_embeddings` also embed_tokens and lm_head. Never norms, nor
  the mHC-lite logits (decay would pull them to a uniform mix).

  Args:
    params: the parameter pytree (a nested dict of arrays, as from
      `nnx.to_pure_dict`), or its abstract shapes.

  Returns:
    A pytree of bools with the structure of `params`.
  """

  def decays(path, leaf) -> bool:
    del leaf  # by name: a scanned kernel is [n_layers, in, out]
    if bitlinear_kind(path):
      return True
    keys = path_keys(path)
    return decay_embeddings and keys[0] in ("embed_tokens", "lm_head") and (
        keys[-1] in ("embedding", "kernel"))

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: ml_collections.ConfigDict
                   ) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW with scheduled learning rate and decay.

  Adam's first moment is kept in `optimizer.mu_dtype` (optax's `mu_dtype`;
  bfloat16 halves its memory), the second in float32.

  The AdamW hyperparameters are injected (`optax.inject_hyperparams`), so the
  optimizer state holds the learning rate and weight decay of the latest step
  (`current_hyperparams` reads them by name for the metrics).
  """
  o = config.optimizer
  adamw = optax.inject_hyperparams(optax.adamw, static_args="mask")(
      learning_rate=learning_rate_schedule(config),
      b1=o.b1, b2=o.b2, eps=o.eps, mu_dtype=jnp.dtype(o.mu_dtype),
      weight_decay=weight_decay_schedule(config),
      mask=lambda params: weight_decay_mask(params, o.decay_embeddings))
  clip = (optax.clip_by_global_norm(o.grad_clip_norm) if o.grad_clip_norm
          else optax.identity())
  return optax.chain(clip, adamw)


def current_hyperparams(opt_state: Any) -> dict[str, jax.Array]:
  """The learning rate and weight decay the latest update applied.

  Read by name (`optax.tree_utils.tree_get`) wherever the chain holds them,
  so wrapping or reordering the chain cannot silently read another value.
  `inject_hyperparams` also keeps each schedule's own state under the same
  name (a `WrappedScheduleState`); the value is the array leaf.

  Returns:
    float32 scalars `learning_rate` and `weight_decay` (per step).
  """
  def is_value(_, value) -> bool:
    return isinstance(value, jax.Array)
  return {name: optax.tree_utils.tree_get(opt_state, name, filtering=is_value)
          for name in ("learning_rate", "weight_decay")}


def schedule_change_effect(old: ml_collections.ConfigDict,
                           new: ml_collections.ConfigDict, step: int) -> str:
  """Says what changing the run length does to the schedules at `step`.

  Both schedules scale with `train.steps` (the stage boundary sits at
  `stage_boundary` x steps), so a resumed run with another length jumps to
  another learning rate and maybe another stage.

  Returns:
    e.g. "moves the stage boundary from step 20 to 30: the learning rate at
    step 40 goes from 1.20e-07 to 3.10e-04"; a sentence saying the effect
    cannot be computed when a config lacks a needed field.
  """
  try:
    boundaries = [stage_boundary_step(c) for c in (old, new)]
    rates = [float(learning_rate_schedule(c)(step)) for c in (old, new)]
    decays = [float(weight_decay_schedule(c)(step)) for c in (old, new)]
  except (AttributeError, KeyError, TypeError, ValueError,
          ZeroDivisionError) as e:
    return f"its effect on the learning rate cannot be computed ({e!r})"
  if boundaries[0] != boundaries[1]:
    text = (f"moves the stage boundary from step {boundaries[0]} to "
            f"{boundaries[1]}")
  else:
    text = f"keeps the stage boundary at step {boundaries[0]} but changes " \
        "the decay"
  text += (f": the learning rate at step {step} goes from {rates[0]:.2e} to "
           f"{rates[1]:.2e}")
  if decays[0] != decays[1]:
    text += f" and the weight decay from {decays[0]:g} to {decays[1]:g}"
  if step >= new.train.steps:
    text += f"; the run is already at step {step}: nothing trains"
  return text
