"""`python -m bitnet_jax.compile`: the batch search (`--find_batch`), which
compiles the train step for TPU at several batch sizes, and the command
line's errors. They need libtpu (`pip install 'jax[tpu]'`, in the test
extra) and skip with that reason where it is missing; the compile report
itself: tests/unit/test_aot.py.
"""

import dataclasses
import subprocess
import sys

import pytest

from bitnet_jax.aot import tpu
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
def test_find_batch_fits_the_headroom_and_the_next_size_does_not(monkeypatch):
  from bitnet_jax.aot import compile_step, find_batch
  config = _tiny(bitlinear_matmul="int8")
  config.train.batch_size = 256
  small = compile_step.compile_report(config, "v5e-4", eval_step=False)
  # a chip whose HBM holds about half of batch 256's step
  chip = dataclasses.replace(tpu.CHIPS["v5e"],
                             hbm_bytes=small["per_chip_bytes"] // 2)
  monkeypatch.setitem(tpu.CHIPS, "v5e", chip)
  found = find_batch.find_batch(config, "v5e-4")
  assert found["per_chip_bytes"] <= 0.9 * chip.hbm_bytes
  assert 4 <= found["largest_batch_size"] < 256
  bigger = config.copy_and_resolve_references()
  bigger.train.batch_size = (found["largest_batch_size"] * 5 // 4 + 3) // 4 * 4
  report = compile_step.compile_report(bigger, "v5e-4", eval_step=False)
  assert report["per_chip_bytes"] > 0.9 * chip.hbm_bytes, (
      f"batch {bigger.train.batch_size} (25% more) also fits: the search "
      "stopped well short of the largest batch")
  assert 256 // found["grad_accum_steps"] <= found["largest_batch_size"]


@needs_libtpu
@pytest.mark.slow
def test_cli_unknown_topology_is_one_line_without_traceback():
  result = subprocess.run(
      [sys.executable, "-m", "bitnet_jax.compile",
       "--config=configs/tiny.py", "--topology=v5p-7"],
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  assert "v5p-8" in result.stderr and "--topology" in result.stderr
