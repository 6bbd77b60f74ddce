"""Ahead-of-time compiles of the train step for NVIDIA GPUs on this CPU host
(`bitnet_jax.aot` with JAX's CUDA plugin and XLA's GPU specs): the tiny step
for one H100 and for two hosts of 8 holds cuDNN fused attention forward and
backward and int8 GEMMs, its memory report is sane, attention's "auto"
follows the mesh's devices rather than the CPU host, and cuDNN asked for
where it cannot run is refused before compiling.

They need the CUDA plugin and cuDNN (`pip install -e '.[gpu_compile]'`, in
the test extra) and skip with that reason where they are missing. The spec
table and the HLO reader: tests/unit/test_aot.py.
"""

import subprocess
import sys

import jax
import numpy as np
import pytest

from bitnet_jax.aot import compile_step, gpu
from bitnet_jax.config import ConfigError
from configs import tiny

from drivers import needs_cuda_plugin

pytestmark = [
    needs_cuda_plugin(None),
    # conftest's persistent compilation cache cannot load GPU executables on
    # this CPU host: JAX warns and compiles again (the result is the same)
    pytest.mark.filterwarnings(
        "ignore:Error reading persistent compilation cache entry:UserWarning")]


def _tiny(batch_size: int, **model):
  config = tiny.get_config()
  config.model.dtype = "bfloat16"
  config.model.bitlinear_matmul = "int8"
  config.train.batch_size = batch_size
  for key, value in model.items():
    config.model[key] = value
  return config


@pytest.fixture(scope="module")
def one_h100():
  return compile_step.compile_report(_tiny(8), "h100-1", eval_step=False)


@pytest.fixture(scope="module")
def two_hosts():
  return compile_step.compile_report(_tiny(16), "h100-2x8", eval_step=False)


def test_auto_attention_follows_the_gpus_not_the_cpu_host(one_h100):
  assert jax.default_backend() == "cpu", "this test needs a CPU host"
  layers = tiny.get_config().model.n_layers
  assert one_h100["attention_kernel"] == "cudnn", one_h100["kernels"]
  assert one_h100["cudnn_attention_forward"] >= layers, (
      f"one cuDNN forward per scanned layer expected: {one_h100['kernels']}")
  assert one_h100["cudnn_attention_backward"] == layers, one_h100["kernels"]


def test_every_forward_bitlinear_is_an_int8_gemm_on_h100(one_h100):
  assert one_h100["platform"] == "gpu"
  assert "H100" in one_h100["device_kind"], one_h100["device_kind"]
  assert one_h100["bitlinear_not_int8"] == [], one_h100["bitlinear_not_int8"]
  assert one_h100["int8_dots"] > 0 and one_h100["int8_dot_executions"] >= (
      2 * one_h100["int8_dots"]), (
      "the int8 dots sit in the scanned layer body and run once per layer: "
      f"{one_h100['kernels']}")


def test_memory_report_is_sane(one_h100):
  config = _tiny(8)
  params = one_h100["parameters"]
  # float32 parameters and two float32 Adam moments are arguments
  assert one_h100["argument_bytes"] >= 3 * 4 * params, one_h100
  assert 0 < one_h100["per_chip_bytes"] < one_h100["memory_limit_bytes"]
  spec = gpu.GPUS["h100"]
  assert one_h100["hbm_bytes"] == spec.memory_bytes
  assert one_h100["memory_limit_bytes"] == int(
      gpu.memory_fraction() * spec.memory_bytes)
  assert one_h100["fits"] and one_h100["headroom"] == pytest.approx(
      1 - one_h100["per_chip_bytes"] / one_h100["memory_limit_bytes"])
  ratio = one_h100["flops_per_chip"] / one_h100["model_flops_per_chip"]
  assert 0.9 < ratio < 1.6, (
      f"HLO FLOPs {one_h100['flops_per_chip']:.3e} vs the model's 6N + 12LdT "
      f"{one_h100['model_flops_per_chip']:.3e}: loop trip counts missed?")
  assert config.train.batch_size * config.train.seq_len == one_h100[
      "tokens_per_step"]
  assert one_h100["estimated_step_seconds"] == max(
      one_h100["roofline_compute_seconds"],
      one_h100["roofline_memory_seconds"]) > 0


def test_two_hosts_of_eight_h100s(two_hosts):
  assert (two_hosts["chips"], two_hosts["hosts"]) == (16, 2), two_hosts
  assert two_hosts["attention_kernel"] == "cudnn", two_hosts["kernels"]
  assert two_hosts["int8_dots"] > 0 and not two_hosts["bitlinear_not_int8"]
  devices = gpu.devices(gpu.resolve("h100-2x8"))
  assert sorted({d.process_index for d in devices}) == [0, 1]
  assert np.prod(list(two_hosts["mesh"].values())) == 16


@pytest.mark.parametrize("model,reason", [
    ({"dtype": "float32"}, "bfloat16 or float16"),
    ({"head_dim": 132}, "head dim 132"),  # cuDNN's limit is 128 here
])
def test_cudnn_that_cannot_run_is_refused_before_compiling(model, reason):
  config = _tiny(8, attention_implementation="cudnn", **model)
  with pytest.raises(ConfigError,
                     match=r"config\.model\.attention_implementation=cudnn.*"
                     + reason):
    compile_step.compile_report(config, "h100-1", eval_step=False)


def test_xla_attention_names_why_not_cudnn():
  report = compile_step.compile_report(
      _tiny(8, attention_implementation="xla"), "h100-1", eval_step=False)
  assert report["attention_kernel"] == "xla"
  assert report["cudnn_attention_forward"] == 0
  assert "attention_implementation=xla" in report["kernels"], report["kernels"]


@pytest.mark.slow
def test_cli_prints_the_kernels_and_refuses_an_unknown_gpu_in_one_line():
  base = [sys.executable, "-m", "bitnet_jax.compile",
          "--config=configs/tiny.py", "--config.model.dtype=bfloat16",
          "--config.model.bitlinear_matmul=int8"]
  result = subprocess.run(base + ["--topology=h100-1"], check=False,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "cuDNN fused attention" in result.stdout, result.stdout
  assert "int8 dots in fusions" in result.stdout, result.stdout
  assert "FITS" in result.stdout, result.stdout
  bad = subprocess.run(base + ["--topology=h300-8"], check=False,
                       capture_output=True, text=True, timeout=300)
  lines = bad.stderr.strip().splitlines()
  assert bad.returncode == 2 and len(lines) == 1, bad.stderr
  assert "h100" in lines[0] and "--topology" in lines[0], lines


def test_fsdp_over_eight_gpus_gives_cudnn_one_qkv_sharding():
  """With FSDP, XLA may shard the queries by heads and the keys by batch;
  cuDNN's partitioner refuses that ("Query, key and value should have same
  sharding", which failed the 1.3B config on 8 GPUs), so the step pins
  them to the batch sharding (`attention.compiling_for`)."""
  # 8 heads over 8 GPUs, and an FFN width that 8 does not divide (the 1.3B
  # config's 5460): FSDP shards those weights on d_model instead
  config = _tiny(8, n_heads=8, ffn_dim=132)
  config.mesh.data, config.mesh.fsdp = 1, -1
  report = compile_step.compile_report(config, "h100-8", eval_step=False)
  assert report["mesh"] == {"data": 1, "fsdp": 8}, report["mesh"]
  assert report["attention_kernel"] == "cudnn", report["kernels"]
