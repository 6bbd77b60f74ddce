"""Golden values: the first three train steps of the tiny config.

This test detects unintended numeric change: a refactor of the model, the
quantizers, the loss, the optimizer or the train step that should leave the
numbers alone must keep these losses and gradient norms to 1e-6. A change
that means to move them (a new initializer, a fixed formula) updates them:
run this file's `_first_steps(tiny_config)` on the new code, paste the
printed values into GOLDEN, and say in the commit why they moved.

Recorded on CPU (float32 model, XLA:CPU) with the code of commit 66828ab.
"""

import jax
import numpy as np

from bitnet_jax.data.batch import Batch
from bitnet_jax.distributed import sharding
from bitnet_jax.optim import optimizer
from bitnet_jax.training import steps, train_state
from bitnet_jax.training.objectives import NextToken

# (loss in nats/token, global gradient norm before clipping) of steps 1..3.
GOLDEN = [(6.267305374145508, 2.5244617462158203),
          (6.237071514129639, 2.263415813446045),
          (6.242384910583496, 2.309926986694336)]


def _first_steps(config, count=3):
  """(loss, grad_norm) of `count` steps on one device, fixed seed and data:
  uniform random tokens from np.random.default_rng(0), one draw per step."""
  config.mesh.data = 1
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  tx = optimizer.make_optimizer(config)
  graphdef, state, shardings = train_state.create_train_state(config, mesh,
                                                              tx)
  step = steps.make_train_step(config, graphdef, tx, shardings, mesh,
                               NextToken(config.train))
  rng = np.random.default_rng(0)
  values = []
  for _ in range(count):
    tokens = rng.integers(
        1, config.model.vocab_size,
        (config.train.batch_size, config.train.seq_len + 1), dtype=np.int32)
    state, out = step(state,
                      sharding.global_batch(Batch.packed(tokens, 0),
                                            mesh))
    out = jax.device_get(out)
    values.append((float(out["loss"]), float(out["grad_norm"])))
  return values


def test_the_first_three_steps_keep_their_losses_and_gradient_norms(
    tiny_config):
  values = _first_steps(tiny_config)
  print(values)  # the new GOLDEN, when a change means to move it
  for number, (got, expected) in enumerate(zip(values, GOLDEN), start=1):
    np.testing.assert_allclose(
        got, expected, rtol=1e-6,
        err_msg=f"step {number}'s (loss, grad_norm) moved: an unintended "
        "numeric change, or update GOLDEN (module docstring)")
