"""The train state: created already sharded, or from a checkpoint's weights.

`TrainState(step, params, opt_state)` is a pytree of arrays (params as the
nested dict of `nnx.to_pure_dict`); the model's structure (`graphdef`) is
static. Checkpoints store it under the names `step`, `params` and
`opt_state` (orbax reads a pytree by its keys), the layout of the plain dict
earlier versions saved, so their checkpoints restore into it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx, struct

from bitnet_jax.distributed import sharding
from bitnet_jax.model.transformer import Transformer
from bitnet_jax.runs import checkpoint, reader


@struct.dataclass
class TrainState:
  """What one optimizer step reads and replaces (donated to the train step).

  Attributes:
    step: int32 scalar, the optimizer updates applied so far (0 at the start
      of a run; checkpoint N holds step N).
    params: the model parameters, float32, a nested dict (`nnx.to_pure_dict`
      of the `Transformer`), sharded by `sharding.state_shardings`.
    opt_state: the optax state of `optimizer.make_optimizer` (Adam moments
      mirroring `params`, the injected learning rate and weight decay).
  """
  step: jax.Array
  params: Any
  opt_state: optax.OptState


def create_train_state(config: ml_collections.ConfigDict,
                       mesh: jax.sharding.Mesh,
                       tx: optax.GradientTransformation, *,
                       initialize: bool = True
                       ) -> tuple[nnx.GraphDef, TrainState, TrainState]:
  """Builds the model and optimizer state directly in their shardings.

  `jax.eval_shape` gives the state's shapes, `sharding.state_shardings` their
  placement, and `jax.jit(init, out_shardings=...)` materializes each shard on
  its own device: no full copy ever lives on one device.

  Returns:
    (graphdef, state, shardings): `shardings` is a `TrainState` of
    `NamedSharding`s. With `initialize=False`, `state` holds
    `jax.ShapeDtypeStruct`s carrying the shardings (a restore target).
  """
  graphdef, _ = nnx.split(nnx.eval_shape(
      lambda: Transformer(config.model, rngs=nnx.Rngs(0))))
  shapes = jax.eval_shape(_init_function(config, tx),
                          jax.random.key(config.seed))
  shardings = sharding.state_shardings(shapes, mesh)
  abstract = checkpoint.abstract_with_shardings(shapes, shardings)
  if not initialize:
    return graphdef, abstract, shardings
  return graphdef, initial_state(config, tx, abstract, ""), shardings


def _init_function(config: ml_collections.ConfigDict,
                   tx: optax.GradientTransformation):
  """key -> a freshly initialized train state (traced inside `jax.jit`)."""

  def init(key: jax.Array) -> TrainState:
    model = Transformer(config.model, rngs=nnx.Rngs(params=key))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params))

  return init


def initial_state(config: ml_collections.ConfigDict,
                  tx: optax.GradientTransformation,
                  abstract_state: TrainState, init_from: str,
                  key: str = "train.init_from") -> TrainState:
  """The step-0 state: random parameters, or those of checkpoint `init_from`.

  Args:
    abstract_state: `create_train_state(..., initialize=False)`'s state.
    init_from: "" (random init from `config.seed`) or a run directory or
      checkpoint (`reader.resolve_checkpoint`): its parameters, with a
      fresh optimizer state and step 0 (fine-tuning, imported weights).
      Its parameters are read alone (`reader.load_params`).
    key: what gave `init_from`, for error messages.

  Raises:
    ConfigError: naming `train.init_from` when no checkpoint is there.
    CheckpointMismatchError: its parameters do not fit `config.model`.
  """
  shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
  if not init_from:  # the shardings are known: no second eval_shape
    return jax.jit(_init_function(config, tx), out_shardings=shardings)(
        jax.random.key(config.seed))
  params, step = reader.load_params(init_from, abstract_state.params, key)
  logging.info("initialized the parameters from %s (checkpoint %d)",
               init_from, step)
  zero = jax.jit(lambda: jnp.zeros((), jnp.int32),  # also multi-host
                 out_shardings=shardings.step)
  return TrainState(
      step=zero(), params=params,
      opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(params))
