"""Runs with a teacher: a full-precision tiny teacher run (its own, trained
for the module), a streamed student distilling from it, configs/distill.py's
stages built from it, its train step lowered from shapes (the losses and the
step alone: tests/unit/test_distill.py)."""

import json
import os

import jax
import pytest

from bitnet_jax.config import ConfigError
from bitnet_jax.data.batch import Batch
from bitnet_jax.distributed import sharding
from bitnet_jax.optim import optimizer
from bitnet_jax.training import loop, steps, train_state
from bitnet_jax.training.objectives import distillation
from bitnet_jax.training.objectives import teacher as teacher_lib

from drivers import stream_config


def _short(config, steps):
  config.train.steps = steps
  config.train.log_every = steps // 2
  config.train.eval_every = config.train.checkpoint_every = steps
  config.optimizer.warmup_steps = 2
  return config


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, data_dir):
  from drivers import load_config
  config = _short(load_config("configs/tiny.py"), 10)
  config.data.data_dir = data_dir
  config.model.quantization = "none"
  workdir = str(tmp_path_factory.mktemp("teacher"))
  loop.train_and_evaluate(config, workdir)
  return workdir


@pytest.mark.slow
def test_a_streamed_run_distils_from_its_teacher(teacher_run, tiny_config,
                                                 tmp_path):
  config = stream_config(_short(tiny_config, 6), str(tmp_path / "corpus"))
  config.data.tokenizer_path = os.path.join(teacher_run, "tokenizer.json")
  config.train.init_from = config.train.teacher = teacher_run
  config.train.distill_logit_weight = 1.0
  config.train.distill_attention_weight = 100.0
  config.train.loss_chunk_size = 16
  config.mesh.fsdp = 2  # 4 x 2 devices: both models' parameters sharded
  config.model.remat_policy = "full"
  workdir = str(tmp_path / "student")
  loop.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  logged = [r for r in records if "loss" in r]
  assert [r["step"] for r in logged] == [3, 6], "log steps"
  for record in logged:
    for name in ("distill_kl", "distill_attention", "teacher_loss"):
      assert record[name] > 0, f"step {record['step']}: {name} missing or 0"
    total = (record["nll"] + record["distill_kl"]
             + 100.0 * record["distill_attention"])
    assert abs(record["loss"] - total) < 1e-4 * total, (
        "loss is not CE + KL + 100 x attention")


def test_a_missing_teacher_names_the_key(tiny_config, tmp_path):
  config = _short(tiny_config, 6)
  config.train.teacher = str(tmp_path / "nowhere")
  config.train.distill_logit_weight = 1.0
  with pytest.raises(ConfigError, match="train.teacher"):
    loop.train_and_evaluate(config, str(tmp_path / "student"))


def test_the_distill_config_builds_both_stages_from_the_runs(teacher_run):
  from bitnet_jax import config as config_lib

  from drivers import load_config
  student = load_config(f"configs/distill.py:continue,{teacher_run}")
  assert student.train.init_from == teacher_run
  assert student.model.quantization == "ternary"
  assert student.model.quantization_warmup_steps > 0, "no warm-up in stage 2"
  assert student.model.d_model == 64, "not the student run's model"
  distilled = load_config(
      f"configs/distill.py:distill,{teacher_run},{teacher_run}")
  assert distilled.train.teacher == teacher_run
  assert distilled.train.distill_logit_weight > 0
  assert distilled.train.distill_attention_weight > 0
  for config in (student, distilled):
    config_lib.validate(config)
  for bad in ("distill," + teacher_run, "pretrain," + teacher_run):
    with pytest.raises(ConfigError, match="configs/distill.py"):
      load_config(f"configs/distill.py:{bad}")


def test_a_distillation_step_lowers_ahead_of_time_from_shapes(teacher_run,
                                                              tiny_config):
  config = _short(tiny_config, 6)
  config.train.teacher = teacher_run
  config.train.distill_logit_weight = 1.0
  config.train.distill_attention_weight = 1.0
  mesh = sharding.make_mesh(config.mesh)
  teacher = teacher_lib.abstract_teacher(config, mesh)
  assert all(isinstance(x, jax.ShapeDtypeStruct)
             for x in jax.tree.leaves(teacher.params)), "weights were read"
  tx = optimizer.make_optimizer(config)
  graphdef, state, shardings = train_state.create_train_state(
      config, mesh, tx, initialize=False)
  batch = Batch.shapes(config.train.batch_size, config.train.seq_len,
                       packed=False, sharding=sharding.batch_sharding(mesh))
  lowered = steps.make_train_step(
      config, graphdef, tx, shardings, mesh,
      distillation.Distillation(config, teacher)).lower(state, batch)
  arguments = len(jax.tree.leaves(lowered.args_info))
  expected = (len(jax.tree.leaves(state)) + len(jax.tree.leaves(batch))
              + len(jax.tree.leaves(teacher.params)))
  assert arguments == expected, (
      f"{arguments} arguments, not state + batch + the teacher's {expected}")
  lowered.compile()
