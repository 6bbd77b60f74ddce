"""Ahead-of-time TPU compilation (bitnet_jax.aot) without compiling: the
accelerator name table and the HLO reader. The compile report itself:
tests/integration/test_compile.py (it needs libtpu).
"""


import jax
import jax.numpy as jnp
import pytest

from bitnet_jax.aot import hlo, tpu
from bitnet_jax.metrics import throughput


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


def test_trip_count_reads_unsigned_loop_bounds():
  # the TPU compiler's windowed (collective) matmul loops count in u32
  condition = [
      "  %constant.1 = u32[]{:T(128)} constant(4), metadata={}",
      "  ROOT %compare.2 = pred[] compare(%gte.1, %constant.1), direction=LT"]
  assert hlo._trip_count(condition) == 4
