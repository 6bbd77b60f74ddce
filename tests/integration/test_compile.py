"""Ahead-of-time TPU compiles of the train step (`bitnet_jax.aot`): the
compile report (its keys, the int8 matmuls in the HLO, loop-corrected FLOPs,
multi-slice meshes, errors naming the key), the batch search
(`--find_batch`) through the real compiler, and the command line's errors.

They need libtpu (`pip install 'jax[tpu]'`, in the test extra) and skip with
that reason where it is missing. The name table and the HLO reader:
tests/unit/test_aot.py; the search on a known memory curve:
tests/unit/test_find_batch.py.
"""

import subprocess
import sys

import pytest

from bitnet_jax.aot import tpu
from bitnet_jax.config import ConfigError
from configs import tiny

from drivers import needs_libtpu

# conftest turns on JAX's persistent compilation cache; an executable compiled
# for a TPU topology cannot be loaded back on this CPU host, so JAX warns and
# compiles again (the result is the same).
pytestmark = pytest.mark.filterwarnings(
    "ignore:Error reading persistent compilation cache entry:UserWarning")


def _tiny(**model):
  config = tiny.get_config()
  config.model.dtype = "bfloat16"
  for key, value in model.items():
    config.model[key] = value
  return config


@needs_libtpu
@pytest.mark.slow
def test_find_batch_compiles_for_the_slice_with_the_real_compiler():
  """One real compile through the search (the target batch is one sequence
  per chip); the search itself: tests/unit/test_find_batch.py."""
  from bitnet_jax.aot import find_batch
  config = _tiny(bitlinear_matmul="int8")
  config.train.batch_size = 4
  found = find_batch.find_batch(config, "v5e-4", policies=("none",))
  assert (found["largest_batch_size"], found["grad_accum_steps"],
          found["compiles"]) == (4, 1, 1), found
  hbm = tpu.CHIPS["v5e"].hbm_bytes
  assert 0 < found["per_chip_bytes"] < hbm and found["headroom"] == (
      pytest.approx(1 - found["per_chip_bytes"] / hbm)), found


@needs_libtpu
@pytest.mark.slow
def test_cli_unknown_topology_is_one_line_without_traceback():
  result = subprocess.run(
      [sys.executable, "-m", "bitnet_jax.compile",
       "--config=configs/tiny.py", "--topology=v5p-7"],
      check=False, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  assert "v5p-8" in result.stderr and "--topology" in result.stderr


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
