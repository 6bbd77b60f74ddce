"""The jitted train and eval steps (gradient accumulation, chunked loss).

The train step maps (`TrainState`, `Batch`) to (new `TrainState`, metrics);
the state is donated (replaced, its buffers reused), the batch is not (XLA
could reuse none of its int32 / float32 buffers). What it minimizes is an
objective handed to it (`bitnet_jax.training.objectives`): the step knows
the objective's summed terms and their weight, nothing else. The model's
structure (`graphdef`) is static; its parameters and step form the model
every consumer evaluates (`transformer.bind`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bitnet_jax.config import ConfigError
from bitnet_jax.data.batch import Batch
from bitnet_jax.distributed import sharding
from bitnet_jax.metrics import statistics
from bitnet_jax.model import attention, diagnostics
from bitnet_jax.model.transformer import bind
from bitnet_jax.optim import optimizer as optimizer_lib
from bitnet_jax.training.objectives import NextToken, Objective
from bitnet_jax.training.train_state import TrainState


def micro_batches(batch: Batch, steps: int, mesh: jax.sharding.Mesh) -> Batch:
  """Splits a global batch `[batch, ...]` into `[steps, batch / steps, ...]`.

  Micro-batch j takes rows j, j + steps, j + 2 steps, ...: every device's
  contiguous block of rows holds its share of every micro-batch, so each
  micro-batch stays split over all data-parallel devices (no data moves).
  """

  def split(x):
    x = x.reshape(x.shape[0] // steps, steps, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, P(None, sharding.BATCH_AXES)))

  return jax.tree.map(split, batch)


def sum_over_micro_batches(fn: Callable[[Batch, jax.Array], Any], batch: Batch,
                           steps: int, mesh: jax.sharding.Mesh) -> Any:
  """`fn(batch, 0)`, a pytree of sums, as the sum of `fn(micro_batch, j)`
  over `steps` micro-batches (`micro_batches`; j the int32 index) run one
  after another by `jax.lax.scan`; with `steps` 1, one call on the whole
  batch."""
  if steps == 1:
    return fn(batch, jnp.int32(0))
  micro = micro_batches(batch, steps, mesh)
  shapes = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], micro),
                          jnp.int32(0))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def add(totals, xs):
    return jax.tree.map(jnp.add, totals, fn(*xs)), None

  return jax.lax.scan(add, zeros,
                      (micro, jnp.arange(steps, dtype=jnp.int32)))[0]


def check_micro_batch(config: ml_collections.ConfigDict,
                      mesh: jax.sharding.Mesh) -> None:
  """Raises ConfigError naming `train.grad_accum_steps` when a micro-batch
  does not split evenly over the mesh's data-parallel devices."""
  t = config.train
  devices = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = t.batch_size // t.grad_accum_steps
  if micro % devices:
    raise ConfigError(
        f"config.train.grad_accum_steps={t.grad_accum_steps} makes "
        f"micro-batches of {micro} sequences (train.batch_size / "
        f"grad_accum_steps), which do not split over the {devices} "
        "data-parallel devices; pick grad_accum_steps so that batch_size / "
        "grad_accum_steps is a multiple of the device count")


class TrainStep:
  """The jitted train step with the objective's frozen inputs bound:
  (state, batch) -> (state, metrics); `lower(state, batch)` lowers it
  (ahead-of-time compilation)."""

  def __init__(self, jitted: Any, frozen: Any):
    self.jitted, self.frozen = jitted, frozen

  def __call__(self, state: TrainState, batch: Batch
               ) -> tuple[TrainState, dict]:
    return self.jitted(state, batch, self.frozen)

  def lower(self, state: Any, batch: Any) -> Any:
    return self.jitted.lower(state, batch, self.frozen)


def make_train_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                    tx: optax.GradientTransformation, shardings: Any,
                    mesh: jax.sharding.Mesh, objective: Objective
                    ) -> TrainStep:
  """Jits one optimizer step of `objective`; the state is donated.

  The step maps (state, `Batch`) to (new state, metrics). With
  `train.grad_accum_steps` k > 1 the batch runs as k micro-batches inside the
  step (`jax.lax.scan`), their gradients of the summed loss added and divided
  by the whole batch's summed loss mask once: the same update as one pass
  over the batch, up to float rounding. Metrics: each of the objective's
  summed terms divided by that weight (loss, nll, accuracy, ...), grad_norm
  (before clipping), learning_rate and weight_decay as applied in this step,
  and quantization_blend during a quantization warm-up. The objective's
  frozen inputs (`objective.frozen`, e.g. a teacher's parameters) are a
  third, undonated argument of the jitted function in their own shardings,
  bound by `TrainStep`.

  Backend-dependent choices (attention's "auto") follow the mesh's
  devices (`attention.compiling_for`), so a step built for GPUs on a CPU
  host is the step the GPUs would run.

  Raises:
    ConfigError: see `check_micro_batch`; `attention.check_cudnn` (cuDNN
      asked for where it would compile XLA attention).
  """
  t = config.train
  if t.grad_accum_steps > 1:
    check_micro_batch(config, mesh)
  target = sharding.platform(mesh)
  attention.check_cudnn(config.model, t.seq_len,
                        config.data.packing == "document", target)

  # its own stream: not the parameter init's key(seed)
  dropout_seed = jax.random.fold_in(jax.random.key(config.seed), 0x64726F70)

  def train_step(state: TrainState, batch: Batch, frozen: Any
                 ) -> tuple[TrainState, dict]:
    with attention.compiling_for(target, sharding.batch_sharding(mesh)):
      return traced_train_step(state, batch, frozen)

  def traced_train_step(state: TrainState, batch: Batch, frozen: Any
                        ) -> tuple[TrainState, dict]:
    params = state.params
    step_key = jax.random.fold_in(dropout_seed, state.step)

    def sums_and_grads(batch, index):  # gradients in the params' shardings
      forward = {}
      if config.model.dropout_rate > 0:
        forward["dropout_key"] = jax.random.fold_in(step_key, index)

      def summed_loss(params):
        sums = objective(bind(graphdef, params, state.step), batch, frozen,
                         **forward)
        return sums["loss"], sums
      grads, sums = jax.grad(summed_loss, has_aux=True)(params)
      return sums, jax.lax.with_sharding_constraint(grads,
                                                    shardings.params)

    sums, grads = sum_over_micro_batches(sums_and_grads, batch,
                                         t.grad_accum_steps, mesh)
    count = jnp.maximum(sums.pop("weight"), 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state.opt_state, params)
    step_metrics = {name: value / count for name, value in sums.items()}
    step_metrics["grad_norm"] = optax.global_norm(grads)
    step_metrics.update(optimizer_lib.current_hyperparams(opt_state))
    blend = bind(graphdef, params, state.step).quantization_blend()
    if blend is not None:
      step_metrics["quantization_blend"] = blend
    new_state = TrainState(step=state.step + 1,
                           params=optax.apply_updates(params, updates),
                           opt_state=opt_state)
    return new_state, step_metrics

  # The state keeps its shardings (parameters FSDP-sharded, see
  # `sharding.state_shardings`); the batch rows are split over the data
  # axes (`batch_sharding`); the metrics are replicated scalars.
  jitted = jax.jit(
      train_step,
      in_shardings=(shardings, sharding.batch_sharding(mesh),
                    objective.frozen_shardings),
      out_shardings=(shardings, sharding.replicated(mesh)),
      donate_argnums=(0,))
  return TrainStep(jitted, objective.frozen)


def make_eval_step(config: ml_collections.ConfigDict, graphdef: nnx.GraphDef,
                   param_shardings: Any, mesh: jax.sharding.Mesh,
                   objective: NextToken) -> Callable[[Any, Batch, Any], dict]:
  """Jits the per-batch eval statistics (summed, see `metrics`).

  The eval step maps (params, batch, step) to sums, each position weighted
  by the batch's loss mask: the cross-entropy (`objective.outputs`, the
  plain nll whatever the train objective adds), the prediction statistics
  (`statistics.prediction_statistics`), the predictive entropy and the
  blocks' output RMS (`Transformer.hidden_and_statistics`, one value per
  batch, with `batches` counting them). `step` (int32) is the model's step
  (`transformer.bind`), so the model is evaluated as it trains. As in
  training, the logits are made `train.loss_chunk_size` positions at a time
  and a batch runs as `train.grad_accum_steps` micro-batches (whose
  statistics add up), so evaluation fits wherever a train step does.
  """
  t = config.train
  if t.grad_accum_steps > 1:
    check_micro_batch(config, mesh)

  def batch_statistics(params: Any, batch: Batch, step: jax.Array) -> dict:
    outputs = objective.outputs(bind(graphdef, params, step), batch,
                                block_statistics=True)
    weights = batch.loss_mask
    stats = statistics.prediction_statistics(
        outputs["prediction"], batch.inputs, batch.targets,
        config.model.vocab_size, weights)
    stats["loss_sum"] = jnp.sum(outputs["nll"] * weights)
    stats["entropy_sum"] = jnp.sum(outputs["entropy"] * weights)
    stats["attention_rms"] = outputs["attention_rms"]
    stats["ffn_rms"] = outputs["ffn_rms"]
    stats["batches"] = jnp.float32(1.0)
    return stats

  def eval_step(params: Any, batch: Batch, step: jax.Array) -> dict:
    with attention.compiling_for(sharding.platform(mesh),
                                 sharding.batch_sharding(mesh)):
      return sum_over_micro_batches(
          lambda b, _: batch_statistics(params, b, step), batch,
          t.grad_accum_steps, mesh)

  return jax.jit(eval_step,
                 in_shardings=(param_shardings, sharding.batch_sharding(mesh),
                               None),
                 out_shardings=sharding.replicated(mesh))


def evaluate(eval_step: Callable, params: Any, batches: list[dict],
             step: int) -> dict[str, float]:
  """Runs the fixed eval set; sums stay on device until one final read.

  The result adds the weight statistics of every BitLinear kind
  (`diagnostics.weight_statistics`) to `statistics.summarize_eval`'s.

  Args:
    step: the train step the params come from (the quantization blend).
    eval_step: `make_eval_step`'s function (params, batch, step) -> sums.
    params: the model parameters (pure dict, sharded).
    batches: global `Batch`es, already placed on the mesh (they are the
      same at every evaluation).

  Returns:
    Python floats: `statistics.summarize_eval`'s keys (eval_loss nats,
    eval_accuracy, unique_predictions, copy_rate, top_token_share,
    prediction_entropy nats, attention_rms/i, ffn_rms/i) and
    `zero_share/<kind>`, `mean_abs_weight/<kind>` per BitLinear kind.
  """
  totals = None
  for batch in batches:
    stats = eval_step(params, batch, jnp.int32(step))
    totals = stats if totals is None else jax.tree.map(jnp.add, totals, stats)
  weights = diagnostics.weight_statistics(params)
  totals, weights = jax.device_get((totals, weights))
  return {**statistics.summarize_eval(totals),
          **{k: float(v) for k, v in weights.items()}}

