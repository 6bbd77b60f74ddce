r"""Where a train step's time goes: full precision, fake-quant, int8 BitLinear.

  python experiments/benchmark.py --config=configs/d20.py:cpu --steps=10
  python experiments/benchmark.py --config=configs/bitnet_700m.py \
      --config.train.batch_size=16 --steps=20 --profile=/tmp/trace
  python experiments/benchmark.py --config=configs/d20.py:cpu --compile_sweep

Prints a markdown table, one row per variant of the same architecture, batch
and seq_len, on random tokens: parameters, batch x seq, dtype, quantization
(none = `model.quantization="none"`; fake_quant and int8 =
`model.bitlinear_matmul` of the ternary model), ms/step and tokens/s over
`--steps` steps after one warm-up step, MFU, peak device memory and the
seconds `lower().compile()` took; then the ternary / none step-time ratios.
Figures, not pass/fail.

MFU = tokens/s x FLOPs per token / peak FLOP/s, with FLOPs per token =
6 N + 12 L d T (PaLM, arXiv 2204.02311, app. B; N = matmul parameters, L
layers, d = d_model, T = seq_len): model FLOPs, so rematerialization does not
raise it. Peak: the dense bf16 figure of `metrics.PEAK_FLOPS_PER_DEVICE`; on
a device not in that table (a CPU) the float32 matmul rate this script
measures on a 4096^3 product (the peak named in the output).

Peak memory: XLA's compiled estimate of each step (arguments + outputs +
temporaries - aliased bytes), comparable across variants; where the runtime
reports one (GPU, TPU), the process's high-water mark over all variants is
printed at the end as well.

`--profile=DIR` writes a `jax.profiler` trace of the timed steps of each
variant to DIR/<variant> (open with TensorBoard's profile plugin or Perfetto).
`--compile_sweep` prints the compile seconds of the train step at 6 and 24
layers, scanned and unrolled.
"""

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from bitnet_jax import config as config_lib
from bitnet_jax import metrics
from bitnet_jax.data.batch import Batch
from bitnet_jax.distributed import sharding
from bitnet_jax.optim import optimizer
from bitnet_jax.training import steps, train_state
from bitnet_jax.training.objectives import NextToken

_CONFIG = config_flags.DEFINE_config_file("config", "configs/d20.py:cpu",
                                          "Config to benchmark.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per variant.")
_VARIANTS = flags.DEFINE_list("variants", ["none", "fake_quant", "int8"],
                              "Rows: none, fake_quant, int8.")
_PROFILE = flags.DEFINE_string("profile", "", "Directory for jax.profiler "
                               "traces of the timed steps; '' = none.")
_COMPILE_SWEEP = flags.DEFINE_bool(
    "compile_sweep", False, "Also time compilation at 6 and 24 layers, "
    "scanned and unrolled.")

VARIANTS = {"none": ("none", "fake_quant"),
            "fake_quant": ("ternary", "fake_quant"),
            "int8": ("ternary", "int8")}


def measured_matmul_flops(size: int = 4096, repeats: int = 5) -> float:
  """FLOP/s of a float32 `[size, size] @ [size, size]` on the default
  device: the practical peak of a device with no spec-sheet entry."""
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    out = matmul(a)
  out.block_until_ready()
  return 2 * size**3 * repeats / (time.perf_counter() - start)


def _random_batch(config, mesh):
  rng = np.random.default_rng(0)
  shape = (config.train.batch_size, config_lib.window_length(config))
  return sharding.global_batch(Batch.of_windows(rng.integers(
      0, config.model.vocab_size, shape, dtype=np.int32)), mesh)


def compiled_step(config):
  """(compiled train step, state, batch, compile seconds, parameters)."""
  mesh = sharding.make_mesh(config.mesh)
  tx = optimizer.make_optimizer(config)
  graphdef, state, shardings = train_state.create_train_state(config, mesh, tx)
  step = steps.make_train_step(config, graphdef, tx, shardings, mesh,
                               NextToken(config.train))
  batch = _random_batch(config, mesh)
  start = time.perf_counter()
  compiled = step.lower(state, batch).compile()  # takes (state, batch, None)
  compile_seconds = time.perf_counter() - start
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  return compiled, state, batch, compile_seconds, n_params


def peak_memory_bytes(compiled) -> float:
  """XLA's compiled estimate of a step's device memory, in bytes."""
  analysis = compiled.memory_analysis()
  return float(analysis.argument_size_in_bytes
               + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
               - analysis.alias_size_in_bytes)


def run_variant(config, n_steps: int, profile_dir: str) -> dict:
  """Compiles and times one variant; returns its row's figures."""
  compiled, state, batch, compile_seconds, n_params = compiled_step(config)
  state, out = compiled(state, batch, None)  # warm-up
  jax.block_until_ready(out)
  if profile_dir:
    jax.profiler.start_trace(profile_dir)
  start = time.perf_counter()
  for _ in range(n_steps):
    state, out = compiled(state, batch, None)
  jax.block_until_ready(out)
  seconds = (time.perf_counter() - start) / n_steps
  if profile_dir:
    jax.profiler.stop_trace()
  return {"params": n_params, "seconds": seconds, "compile": compile_seconds,
          "memory": peak_memory_bytes(compiled),
          "matmul_params": metrics.matmul_params(state.params, config.model)}


def compile_sweep(config) -> None:
  """Prints train-step compile seconds at 6 and 24 layers in both layouts."""
  print("\n| layers | layout | compile s |\n|---|---|---|")
  for scan in (True, False):
    for n_layers in (6, 24):
      c = config.copy_and_resolve_references()
      c.model.n_layers, c.model.scan_layers = n_layers, scan
      seconds = compiled_step(c)[3]
      print(f"| {n_layers} | {'scanned' if scan else 'unrolled'} | "
            f"{seconds:.1f} |")


def main(argv):
  del argv
  config = _CONFIG.value
  config_lib.validate(config)
  t, m = config.train, config.model
  tokens = t.batch_size * t.seq_len
  device = jax.devices()[0]
  peak = metrics.peak_flops(jax.devices())
  peak_source = "dense bf16 spec sheet"
  if peak is None:
    peak = measured_matmul_flops() * jax.device_count()
    peak_source = "measured float32 4096^3 matmul"
  print(f"devices: {jax.device_count()} x {device.device_kind}; jax "
        f"{jax.__version__}; peak {peak / 1e12:.3g} TFLOP/s ({peak_source})")
  print(f"config: d_model {m.d_model}, {m.n_layers} layers, vocab "
        f"{m.vocab_size}, scan_layers {m.scan_layers}, remat "
        f"{m.remat_policy}, loss_chunk_size {t.loss_chunk_size}, "
        f"grad_accum_steps {t.grad_accum_steps}\n")
  print("| variant | params | batch x seq | dtype | ms/step | tokens/s | MFU "
        "| XLA memory GB | compile s |\n|---|---|---|---|---|---|---|---|---|")
  rows = {}
  for variant in _VARIANTS.value:
    m.quantization, m.bitlinear_matmul = VARIANTS[variant]
    profile_dir = (os.path.join(_PROFILE.value, variant) if _PROFILE.value
                   else "")
    row = rows[variant] = run_variant(config, _STEPS.value, profile_dir)
    flops = metrics.flops_per_token(row["matmul_params"], m.n_layers,
                                    m.d_model, t.seq_len)
    tokens_per_sec = tokens / row["seconds"]
    print(f"| {variant} | {row['params'] / 1e6:.1f}M | {t.batch_size} x "
          f"{t.seq_len} | {m.dtype} | {1e3 * row['seconds']:.1f} | "
          f"{tokens_per_sec:,.0f} | {tokens_per_sec * flops / peak:.1%} | "
          f"{row['memory'] / 1e9:.2f} | "
          f"{row['compile']:.1f} |", flush=True)
  if "none" in rows:
    for variant in ("fake_quant", "int8"):
      if variant in rows:
        ratio = rows[variant]["seconds"] / rows["none"]["seconds"]
        print(f"{variant} / none step time: {ratio:.2f}x")
  runtime = device.memory_stats() or {}
  if "peak_bytes_in_use" in runtime:
    print(f"runtime memory high-water mark over all variants: "
          f"{runtime['peak_bytes_in_use'] / 1e9:.2f} GB")
  if _COMPILE_SWEEP.value:
    compile_sweep(config)


if __name__ == "__main__":
  app.run(main)
