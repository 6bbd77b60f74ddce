"""Scanned vs unrolled layers, rematerialization and layout conversion."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from bitnet_jax.data.batch import Batch
from bitnet_jax.distributed import sharding
from bitnet_jax.interop import hf
from bitnet_jax.model.layout import stack_layers, unstack_layers
from bitnet_jax.model.transformer import Transformer, bind
from bitnet_jax.optim import optimizer
from bitnet_jax.runs import reader
from bitnet_jax.training import steps, train_state
from bitnet_jax.training.objectives import NextToken

from drivers import next_token_loss, params_of


def _params(model_config, scan_layers: bool, seed: int = 0):
  model_config = model_config.copy_and_resolve_references()
  model_config.scan_layers = scan_layers
  model = Transformer(model_config, rngs=nnx.Rngs(seed))
  return model, nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _batch(config, rows=4, seed=0):
  tokens = jax.random.randint(jax.random.key(seed),
                              (rows, config.train.seq_len + 1), 0,
                              config.model.vocab_size)
  return Batch.of_windows(tokens)


def _assert_trees_equal(a, b, what, **tolerance):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a),
                          jax.tree.leaves(b)):
    np.testing.assert_allclose(
        np.asarray(x), np.asarray(y), **tolerance,
        err_msg=f"{what}: {jax.tree_util.keystr(path)} differs")
  assert jax.tree.structure(a) == jax.tree.structure(b), what


def test_the_same_seed_gives_the_same_weights_in_both_layouts(tiny_config):
  _, scanned = _params(tiny_config.model, True)
  _, unrolled = _params(tiny_config.model, False)
  kernel = scanned["layers"]["self_attn"]["q_proj"]["kernel"]
  assert kernel.shape[0] == tiny_config.model.n_layers, (
      f"scanned kernel {kernel.shape} lacks the leading layers axis")
  assert not np.array_equal(kernel[0], kernel[1]), "layers share weights"
  _assert_trees_equal(stack_layers(unrolled), scanned,
                      "stacked unrolled init vs scanned init", rtol=0, atol=0)
  _assert_trees_equal(unstack_layers(scanned), unrolled,
                      "unstacked scanned init vs unrolled init", rtol=0, atol=0)


def _losses(config, scan_layers, n_steps=4):
  config = config.copy_and_resolve_references()
  config.model.scan_layers = scan_layers
  config.mesh.data = 1
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  tx = optimizer.make_optimizer(config)
  graphdef, state, shardings = train_state.create_train_state(config, mesh, tx)
  step = steps.make_train_step(config, graphdef, tx, shardings, mesh,
                               NextToken(config.train))
  losses = []
  for k in range(n_steps):
    state, out = step(state, _batch(config, config.train.batch_size, seed=k))
    losses.append(float(out["loss"]))
  return losses


def _equations(config, n_layers, scan_layers) -> int:
  model_config = config.model.copy_and_resolve_references()
  model_config.n_layers, model_config.scan_layers = n_layers, scan_layers
  model = Transformer(model_config, rngs=nnx.Rngs(0))
  graphdef, params = params_of(model)
  batch = _batch(config)

  def loss(params):
    return next_token_loss(bind(graphdef, params, 0), batch)[0]

  return len(jax.make_jaxpr(jax.grad(loss))(params).jaxpr.eqns)


def _loss_and_grads(config, policy):
  model_config = config.model.copy_and_resolve_references()
  model_config.remat_policy = policy
  model = Transformer(model_config, rngs=nnx.Rngs(0))
  graphdef, params = params_of(model)
  batch = _batch(config)

  def loss(params):
    return next_token_loss(bind(graphdef, params, 0), batch,
                           label_smoothing=0.1)[0]

  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params))
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  return value, grads, jaxpr


def test_hf_names_are_the_same_in_both_layouts(tiny_config):
  _, scanned = _params(tiny_config.model, True)
  _, unrolled = _params(tiny_config.model, False)
  from_scanned, from_unrolled = (hf.to_hf_tensors(scanned),
                                 hf.to_hf_tensors(unrolled))
  assert "model.layers.1.mlp.down_proj.weight" in from_scanned
  assert from_scanned.keys() == from_unrolled.keys()
  for name, tensor in from_scanned.items():
    np.testing.assert_array_equal(tensor, from_unrolled[name], err_msg=name)
  abstract = reader.abstract_params(tiny_config.model)  # scanned by default
  back = hf.from_hf_tensors(from_unrolled, abstract, "test")
  _assert_trees_equal(back, scanned, "HF import into the scanned layout",
                      rtol=0, atol=0)


def test_init_from_a_checkpoint_of_the_other_layout(tiny_config, tmp_path):
  _, unrolled = _params(tiny_config.model, False, seed=3)
  path = tmp_path / "run" / "checkpoints" / "0" / "state"
  with ocp.PyTreeCheckpointer() as checkpointer:
    checkpointer.save(path, {"params": unrolled})
  abstract = reader.abstract_params(tiny_config.model)
  loaded, step = reader.load_params(str(tmp_path / "run"), abstract)
  assert step == 0
  _assert_trees_equal(loaded, stack_layers(unrolled),
                      "unrolled checkpoint read into the scanned layout",
                      rtol=0, atol=0)
  kernel = loaded["layers"]["mlp"]["up_proj"]["kernel"]
  assert kernel.sharding == abstract["layers"]["mlp"]["up_proj"][
      "kernel"].sharding, "converted parameters are not in the target sharding"
  assert isinstance(kernel, jax.Array) and kernel.dtype == jnp.float32


