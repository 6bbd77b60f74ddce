"""TrainState: restores checkpoints of the earlier dict state; hyperparameters
are read by name."""

import grain
import jax
import numpy as np
import optax

from bitnet_jax.distributed import sharding
from bitnet_jax.model.tree_paths import path_name
from bitnet_jax.optim import optimizer
from bitnet_jax.runs import checkpoint
from bitnet_jax.training import train_state


def _tiny_state(config):
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  tx = optimizer.make_optimizer(config)
  _, state, _ = train_state.create_train_state(config, mesh, tx)
  _, abstract, _ = train_state.create_train_state(config, mesh, tx,
                                                  initialize=False)
  return state, abstract


def test_a_checkpoint_of_the_dict_state_restores_into_a_train_state(
    tiny_config, tmp_path):
  state, abstract = _tiny_state(tiny_config)
  # the layout checkpoints had before TrainState: a plain dict of the fields
  old_layout = {"step": state.step + 7, "params": state.params,
                "opt_state": state.opt_state}
  iterator = iter(grain.MapDataset.range(10).to_iter_dataset())
  saved = checkpoint.Checkpointer(str(tmp_path), keep=2)
  saved.save(7, old_layout, iterator, {"tokens_seen": 70})
  saved.close()

  reopened = checkpoint.Checkpointer(str(tmp_path), keep=2)
  restored = reopened.restore(abstract, iterator)
  reopened.close()
  assert isinstance(restored.state, train_state.TrainState), (
      f"restored a {type(restored.state).__name__}, not a TrainState")
  assert int(restored.state.step) == 7, restored.state.step
  def by_name(tree):
    return {path_name(path): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
  old, new = by_name(old_layout), by_name(restored.state)
  assert old.keys() == new.keys(), (
      f"leaves differ: {sorted(old.keys() ^ new.keys())[:5]}")
  for name, value in old.items():
    np.testing.assert_array_equal(new[name], value, err_msg=name)

def test_the_learning_rate_is_read_by_name_wherever_the_chain_keeps_it(
    tiny_config):
  tiny_config.optimizer.warmup_steps = 10
  tx = optimizer.make_optimizer(tiny_config)
  wrapped = optax.chain(tx, optax.identity())  # adamw no longer last
  params = {"w": np.ones((4, 4), np.float32)}
  grads = {"w": np.full((4, 4), 0.1, np.float32)}
  for chain in (tx, wrapped):
    opt_state = chain.init(params)
    for _ in range(3):
      _, opt_state = chain.update(grads, opt_state, params)
    read = optimizer.current_hyperparams(opt_state)
    expected = optimizer.learning_rate_schedule(tiny_config)(2)
    assert float(read["learning_rate"]) == float(expected), (
        f"read {read['learning_rate']}, the schedule at step 2 is {expected}")
    assert float(read["weight_decay"]) == np.float32(
        tiny_config.optimizer.weight_decay), read["weight_decay"]
