"""Ahead-of-time TPU compilation (bitnet_jax.aot, python -m bitnet_jax.compile).

The compile tests need libtpu (`pip install 'jax[tpu]'`, in the test extra)
and skip with that reason where it is missing; the name table and the HLO
reader run everywhere.
"""


import jax
import jax.numpy as jnp
import pytest

from bitnet_jax.aot import hlo, tpu
from bitnet_jax.config import ConfigError
from bitnet_jax.metrics import throughput
from configs import tiny

from drivers import needs_libtpu

# conftest turns on JAX's persistent compilation cache; an executable compiled
# for a TPU topology cannot be loaded back on this CPU host, so JAX warns and
# compiles again (the result is the same).
pytestmark = pytest.mark.filterwarnings(
    "ignore:Error reading persistent compilation cache entry:UserWarning")



@pytest.mark.parametrize("name,generation,shape", [
    ("v5p-8", "v5p", (2, 2, 1)), ("v5p-16", "v5p", (2, 2, 2)),
    ("v4-8", "v4", (2, 2, 1)), ("v5litepod-16", "v5e", (4, 4)),
    ("v5e-8", "v5e", (2, 4)), ("v6e-8", "v6e", (2, 4)),
    ("v5p:2x2x2", "v5p", (2, 2, 2))])
def test_resolve_maps_cloud_accelerator_types(name, generation, shape):
  s = tpu.resolve(name)
  assert (s.chip.generation, s.shape) == (generation, shape), (
      f"{name} should be {generation} {shape} chips, got {s}")


def test_resolve_unknown_name_lists_the_known_ones():
  with pytest.raises(ValueError, match=r"--topology.*v5p-8.*v6e-8"):
    tpu.resolve("v5p-7")


def test_v5p_device_kind_has_its_peak():
  # v5p devices report "TPU v5"; v5e "TPU v5 lite" must keep its own peak
  assert throughput.device_peak_flops("TPU v5") == tpu.CHIPS["v5p"].peak_flops
  assert throughput.device_peak_flops("TPU v5 lite") == (
      tpu.CHIPS["v5e"].peak_flops)


def test_hlo_counts_scanned_matmuls_by_trip_count():
  layers, m, k = 5, 8, 16

  def stack(x, weights):  # [m, k] through `layers` [k, k] matmuls
    return jax.lax.scan(lambda h, w: (h @ w, None), x, weights)[0]

  text = jax.jit(stack).lower(jnp.ones((m, k)), jnp.ones((layers, k, k))
                              ).compile().as_text()
  found = [d for d in hlo.matmuls(text) if d.flops == 2 * m * k * k]
  assert found, f"no [{m},{k}]x[{k},{k}] dot found in the HLO"
  total = sum(d.flops * d.count for d in hlo.matmuls(text))
  assert total == layers * 2 * m * k * k, (
      f"scan of {layers} matmuls counted as {total} FLOPs, expected "
      f"{layers * 2 * m * k * k}: the loop's trip count was not applied")


def _tiny(**model):
  config = tiny.get_config()
  config.model.dtype = "bfloat16"
  for key, value in model.items():
    config.model[key] = value
  return config


@pytest.fixture(scope="module")
def int8_report():
  from bitnet_jax.aot import compile_step
  return compile_step.compile_report(_tiny(bitlinear_matmul="int8"), "v5e-4")


@needs_libtpu
def test_report_has_the_documented_keys(int8_report):
  keys = {"topology", "chips", "per_chip_bytes", "hbm_bytes", "fits",
          "compile_seconds", "int8_dots", "flops_per_chip",
          "estimated_step_seconds", "eval_per_chip_bytes"}
  assert keys <= set(int8_report), f"missing {keys - set(int8_report)}"
  assert int8_report["chips"] == 4 and int8_report["fits"]
  assert int8_report["hbm_bytes"] == tpu.CHIPS["v5e"].hbm_bytes


@needs_libtpu
def test_every_forward_bitlinear_reaches_the_int8_matmul(int8_report):
  n_layers = tiny.get_config().model.n_layers
  assert int8_report["bitlinear_not_int8"] == [], (
      f"BitLinears off the int8 path: {int8_report['bitlinear_not_int8']}")
  assert int8_report["bitlinear_forward_executions"] == 7 * n_layers, (
      "expected q, k, v, o, gate, up, down per layer in the forward")
  assert int8_report["int8_dot_executions"] == 7 * n_layers


@needs_libtpu
def test_loop_corrected_flops_match_the_model_count(int8_report):
  # no remat: the HLO's matmuls are the 6N + 12LdT of the model, per chip
  ratio = int8_report["flops_per_chip"] / int8_report["model_flops_per_chip"]
  assert abs(ratio - 1) < 0.05, (
      f"HLO FLOPs / (6N + 12LdT) = {ratio:.3f}: the trip-count or "
      "convolution FLOP count is off")
  assert int8_report["flops_per_chip"] > int8_report["xla_flops"], (
      "XLA's count (loop bodies once) should be below the corrected one")


@needs_libtpu
def test_fake_quant_has_no_int8_dots():
  from bitnet_jax.aot import compile_step
  report = compile_step.compile_report(_tiny(bitlinear_matmul="fake_quant"),
                                       "v5e-4", eval_step=False)
  assert report["int8_dots"] == 0 and report["bf16_dots"] > 0


@needs_libtpu
def test_multi_slice_mesh_spans_the_slices_on_the_data_axis():
  from bitnet_jax.aot import compile_step
  devices = tpu.devices(tpu.resolve("v5e-4"), num_slices=2)
  mesh = compile_step.make_mesh(tiny.get_config(), devices, num_slices=2)
  slices = [[d.slice_index for d in row] for row in mesh.devices]
  assert mesh.shape == {"data": 8, "fsdp": 1}
  assert [row[0] for row in slices] == [0] * 4 + [1] * 4, (
      f"data axis should run over slice 0 then slice 1, got {slices}")


@needs_libtpu
@pytest.mark.parametrize("key,value,named", [
    ("mesh.fsdp", 3, "config.mesh"), ("train.batch_size", 6,
                                      "config.train.batch_size"),
    ("model.attention_implementation", "cudnn",
     "config.model.attention_implementation")])
def test_launch_errors_name_the_key(key, value, named):
  from bitnet_jax.aot import compile_step
  config = tiny.get_config()
  section, field = key.split(".")
  config[section][field] = value
  with pytest.raises(ConfigError, match=named):
    compile_step.compile_report(config, "v5e-4", eval_step=False)


@needs_libtpu
def test_out_of_memory_is_one_line_naming_the_batch():
  from bitnet_jax.aot import compile_step
  config = tiny.get_config()
  config.train.batch_size, config.train.seq_len = 16384, 2048
  config.train.loss_chunk_size = 0  # float32 logits: 17 GB per v5e chip
  with pytest.raises(compile_step.OutOfMemoryError) as error:
    compile_step.compile_report(config, "v5e-4", eval_step=False)
  assert "\n" not in str(error.value)
  assert "config.train.batch_size" in str(error.value)


def test_trip_count_reads_unsigned_loop_bounds():
  # the TPU compiler's windowed (collective) matmul loops count in u32
  condition = [
      "  %constant.1 = u32[]{:T(128)} constant(4), metadata={}",
      "  ROOT %compare.2 = pred[] compare(%gte.1, %constant.1), direction=LT"]
  assert hlo._trip_count(condition) == 4
