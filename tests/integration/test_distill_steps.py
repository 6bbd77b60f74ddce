"""The distillation step compiled on several meshes and micro-batchings, and
its gradient against finite differences. (The loss itself:
tests/unit/test_distill.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.model.transformer import bind

from unit.test_distill import (
  _batch,
  _distill_config,
  _distill_step,
  _fp,
  _keys_like,
  _model,
  _params,
  _sums,
)


def test_the_distillation_gradient_matches_finite_differences(tiny_model_config):
  config = _fp(_distill_config(tiny_model_config, ce_weight=0.5))
  student, teacher = _model(config, 0), _model(config, 1)
  graphdef, params = _params(student)
  batch = _batch(config, packed=True)

  def loss(params):
    sums = _sums(config, bind(graphdef, params, 0), teacher, batch)
    return sums["loss"] / sums["weight"]

  grads = jax.grad(loss)(params)

  def unit(tree):
    norm = np.sqrt(sum(float(jnp.sum(x * x)) for x in jax.tree.leaves(tree)))
    return jax.tree.map(lambda x: x / norm, tree)

  noise = unit(jax.tree.map(lambda x, k: jax.random.normal(k, x.shape,
                                                           x.dtype),
                            params, _keys_like(params)))
  # half along the gradient (a measurable change), half at random (a
  # gradient with a wrong part off its own direction still shows)
  direction = unit(jax.tree.map(lambda g, r: g + r, unit(grads), noise))
  step = 1e-2
  shifted = [loss(jax.tree.map(lambda p, d, s=s: p + s * step * d, params,
                               direction)) for s in (1, -1)]
  numeric = (float(shifted[0]) - float(shifted[1])) / (2 * step)
  analytic = sum(float(jnp.sum(g * d)) for g, d in zip(
      jax.tree.leaves(grads), jax.tree.leaves(direction)))
  assert abs(numeric) > 1e-3, "the direction barely changes the loss"
  assert abs(analytic - numeric) < 0.02 * abs(numeric), (
      f"directional derivative {analytic} vs finite difference {numeric}")



@pytest.mark.slow
@pytest.mark.parametrize("accum,n_devices,fsdp", [(2, 4, 2)])
def test_the_distillation_step_on_devices_and_micro_batches_equals_one(
    tiny_model_config, accum, n_devices, fsdp):
  """Two micro-batches on 4 devices (2 data x 2 fsdp) against one device,
  one batch: the teacher's inputs split and summed as the student's. (Each
  alone for next-token: test_steps_compiled.py.)"""
  config = _distill_config(tiny_model_config, loss_chunk_size=16)
  config.optimizer.warmup_steps = 0
  config.optimizer.eps, config.optimizer.grad_clip_norm = 1.0, 0.0
  config.mesh.data, config.mesh.fsdp = 1, 1
  batch = _batch(config, packed=True)
  whole, whole_out = _distill_step(config, batch, jax.devices()[:1])
  config.mesh.data, config.mesh.fsdp = n_devices // fsdp, fsdp
  config.train.grad_accum_steps = accum
  split, out = _distill_step(config, batch, jax.devices()[:n_devices])
  for name in ("loss", "nll", "distill_kl", "distill_attention",
               "teacher_loss", "grad_norm"):
    np.testing.assert_allclose(out[name], whole_out[name], rtol=2e-5,
                               err_msg=f"{name} differs from one device")
  for (path, a), w in zip(jax.tree_util.tree_leaves_with_path(split),
                          jax.tree.leaves(whole)):
    np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-8, err_msg=(
        f"{jax.tree_util.keystr(path)} differs from one device"))
  assert whole_out["distill_kl"] > 0 and whole_out["distill_attention"] > 0

