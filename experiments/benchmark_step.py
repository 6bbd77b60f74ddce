r"""Times the jitted train step: ternary BitLinear vs full precision.

  python experiments/benchmark_step.py --config=configs/d20.py:cpu --steps=20

Prints ms/step and tokens/s for model.quantization = "ternary" and "none"
(same architecture) on random tokens, excluding compilation. Figures, not
pass/fail: the FAQ-era reports put fake-quant BitLinear at 1.2-1.8x the cost
of a plain linear layer.
"""

import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from bitnet_jax import config as config_lib
from bitnet_jax import optimizer, sharding, train, train_state

_CONFIG = config_flags.DEFINE_config_file("config", "configs/d20.py:cpu",
                                          "Config to benchmark.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per variant.")


def time_steps(config, steps: int) -> float:
  """Seconds per train step, after one compile-and-warm-up step."""
  mesh = sharding.make_mesh(config.mesh)
  tx = optimizer.make_optimizer(config)
  graphdef, state, shardings = train_state.create_train_state(config, mesh, tx)
  step = train.make_train_step(config, graphdef, tx, shardings, mesh)
  rng = np.random.default_rng(0)
  shape = (config.train.batch_size, config.train.seq_len + 1)
  batch = sharding.global_batch({"tokens": rng.integers(
      0, config.model.vocab_size, shape, dtype=np.int32)}, mesh)
  state, step_metrics = step(state, batch)
  jax.block_until_ready(step_metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, step_metrics = step(state, batch)
  jax.block_until_ready(step_metrics)
  return (time.perf_counter() - start) / steps


def main(argv):
  del argv
  config = _CONFIG.value
  config_lib.validate(config)
  tokens = config.train.batch_size * config.train.seq_len
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; "
        f"batch {config.train.batch_size} x seq_len {config.train.seq_len}")
  seconds = {}
  for quantization in ("ternary", "none"):
    config.model.quantization = quantization
    seconds[quantization] = time_steps(config, _STEPS.value)
    print(f"{quantization:8s} {1e3 * seconds[quantization]:8.1f} ms/step "
          f"{tokens / seconds[quantization]:10,.0f} tokens/s")
  ratio = seconds["ternary"] / seconds["none"]
  print(f"ternary / none step time: {ratio:.2f}x")


if __name__ == "__main__":
  app.run(main)
