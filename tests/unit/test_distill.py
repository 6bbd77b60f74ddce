"""Distillation from a frozen teacher: the losses, their gradients, the train
step on several devices and micro-batches (runs with a teacher:
tests/integration/test_distill_runs.py)."""

import jax
import numpy as np
import pytest
from flax import nnx

from bitnet_jax.config import ConfigError
from bitnet_jax.data.batch import Batch
from bitnet_jax.distributed import sharding
from bitnet_jax.model.transformer import Transformer
from bitnet_jax.optim import optimizer
from bitnet_jax.training import steps, train_state
from bitnet_jax.training.objectives import distillation
from bitnet_jax.training.objectives import teacher as teacher_lib
from bitnet_jax.training.objectives.distillation import logit_distillation


def _distill_config(config, **train_fields):
  config.model.n_layers = 3
  config.model.n_heads, config.model.n_kv_heads = 4, 2  # GQA relations
  config.train.distill_logit_weight = 1.0
  config.train.distill_attention_weight = 1.0
  config.train.distill_temperature = 2.0
  config.train.distill_attention_layer = 1
  config.train.teacher = "in memory"
  for key, value in train_fields.items():
    config.train[key] = value
  return config


def _fp(config):
  config = config.copy_and_resolve_references()
  config.model.quantization = "none"
  return config


def _batch(config, packed=False, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, config.model.vocab_size,
                        (config.train.batch_size, config.train.seq_len + 1),
                        dtype=np.int32)
  if not packed:
    return Batch.of_windows(tokens)
  for row in range(0, tokens.shape[0], 3):
    tokens[row, 5 + row] = 0  # document breaks (id 0 ends a document)
  return Batch.packed(tokens, 0)


def _model(config, seed):
  return Transformer(config.model, rngs=nnx.Rngs(params=seed))


def _params(model):
  """(graphdef, the `nnx.Param`s as a pure dict) of a Transformer."""
  return nnx.split(model)[0], nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _sums(config, student, teacher_model, batch):
  """The distillation objective's summed terms of `student` against the
  teacher `teacher_model` (in memory, step 0)."""
  graphdef, params = _params(teacher_model)
  teacher = teacher_lib.Teacher(config=_fp(config), graphdef=graphdef,
                                params=params, step=0)
  objective = distillation.Distillation(config, teacher)
  return objective(student, batch, objective.frozen)


def test_logit_distillation_is_the_tempered_kl_times_t_squared():
  rng = np.random.default_rng(0)
  teacher, student = rng.normal(size=(2, 3, 7, 11)).astype(np.float32) * 3
  temperature = 2.5
  p = jax.nn.softmax(teacher / temperature)
  expected = temperature ** 2 * np.sum(
      p * (jax.nn.log_softmax(teacher / temperature)
           - jax.nn.log_softmax(student / temperature)), axis=-1)
  ours = logit_distillation(teacher, student, temperature)
  np.testing.assert_allclose(ours, expected, rtol=1e-5,
                             err_msg="not T^2 KL(teacher || student)")
  assert np.all(np.asarray(ours) > 0), "a KL of different logits is > 0"
  np.testing.assert_allclose(logit_distillation(teacher, teacher, 2.0), 0.0,
                             atol=1e-6, err_msg="KL(p || p) must be 0")


def test_the_distillation_loss_is_zero_when_teacher_and_student_agree(
    tiny_config):
  config = _fp(_distill_config(tiny_config, ce_weight=0.0))
  model = _model(config, 0)
  sums = _sums(config, model, model, _batch(config, packed=True))
  for name in ("loss", "distill_kl", "distill_attention"):
    assert abs(float(sums[name])) < 1e-5 * float(sums["weight"]), (
        f"{name} of a model against itself is {float(sums[name])}, not 0")
  np.testing.assert_allclose(sums["teacher_loss"], sums["nll"], rtol=1e-6,
                             err_msg="the teacher's loss is not its CE")
  other = _sums(config, model, _model(config, 1), _batch(config, packed=True))
  assert float(other["distill_kl"]) > 1e-3 and float(
      other["distill_attention"]) > 1e-6, "another teacher gave no loss"


def _keys_like(tree):
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(treedef, list(jax.random.split(
      jax.random.key(7), len(leaves))))


@pytest.mark.parametrize("change", ["chunks", "unrolled", "remat"])
def test_chunks_layouts_and_remat_give_the_same_distillation_loss(
    tiny_config, change):
  config = _distill_config(tiny_config)
  student, teacher = _model(config, 0), _model(_fp(config), 1)
  batch = _batch(config, packed=True)
  reference = _sums(config, student, teacher, batch)
  if change == "chunks":
    config.train.loss_chunk_size = 8
  else:
    config.model.scan_layers = change != "unrolled"
    config.model.remat_policy = "full" if change == "remat" else "none"
  changed = _sums(config, _model(config, 0), _model(_fp(config), 1), batch)
  for name in ("loss", "distill_kl", "distill_attention", "teacher_loss"):
    np.testing.assert_allclose(changed[name], reference[name], rtol=2e-5,
                               err_msg=f"{change} changed {name}")


def _distill_step(config, batch, devices):
  mesh = sharding.make_mesh(config.mesh, devices)
  tx = optimizer.make_optimizer(config)
  graphdef, state, shardings = train_state.create_train_state(config, mesh, tx)
  teacher_config = _fp(config)
  teacher_config.seed = 1
  t_graphdef, t_state, _ = train_state.create_train_state(teacher_config,
                                                          mesh, tx)
  teacher = teacher_lib.Teacher(config=teacher_config, graphdef=t_graphdef,
                                params=t_state.params, step=0)
  step = steps.make_train_step(config, graphdef, tx, shardings, mesh,
                               distillation.Distillation(config, teacher))
  before = jax.device_get(t_state.params)
  state, out = step(state, sharding.global_batch(batch, mesh))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(
      jax.device_get(t_state.params)), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b, err_msg=(
        f"the step changed the teacher's {jax.tree_util.keystr(path)}"))
  return jax.device_get(state.params), jax.device_get(out)


def test_the_attention_layer_must_exist_in_both_models(tiny_config):
  config = _distill_config(tiny_config, distill_attention_layer=3)
  with pytest.raises(ConfigError, match="distill_attention_layer=3"):
    teacher_lib.check_teacher(config, _fp(config))
  config.train.distill_attention_layer = -1
  assert teacher_lib.attention_layer(config.train, config.model, "student") == 2
  teacher = _fp(config)
  teacher.model.n_kv_heads = 4
  with pytest.raises(ConfigError, match="n_kv_heads=4"):
    teacher_lib.check_teacher(config, teacher)
  teacher = _fp(config)
  teacher.model.vocab_size = 1024
  with pytest.raises(ConfigError, match="vocab_size=1024"):
    teacher_lib.check_teacher(config, teacher)


def test_distillation_weights_without_a_teacher_are_refused(tiny_config):
  from bitnet_jax import config as config_lib
  tiny_config.train.distill_logit_weight = 1.0
  with pytest.raises(ConfigError, match="train.teacher"):
    config_lib.validate(tiny_config)
  tiny_config.train.distill_logit_weight = 0.0
  tiny_config.train.ce_weight = 0.0
  with pytest.raises(ConfigError, match="train.ce_weight"):
    config_lib.validate(tiny_config)


