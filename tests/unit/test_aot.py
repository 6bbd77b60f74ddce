"""Ahead-of-time TPU compilation (bitnet_jax.aot) without compiling: the
accelerator name table and the HLO reader. The compile report itself:
tests/integration/test_compile.py (it needs libtpu).
"""


import jax
import jax.numpy as jnp
import pytest

from bitnet_jax.aot import gpu, hlo, tpu
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


# -- NVIDIA GPU targets (bitnet_jax.aot.gpu) ---------------------------------


@pytest.mark.parametrize("name,gpu_name,hosts,per_host", [
    ("h100-1", "h100", 1, 1), ("h100-8", "h100", 1, 8),
    ("h100-2x8", "h100", 2, 8), ("h200-8", "h200", 1, 8),
    ("a100-80gb-8", "a100-80gb", 1, 8), ("h100-pcie-4", "h100-pcie", 1, 4)])
def test_gpu_target_names(name, gpu_name, hosts, per_host):
  target = gpu.resolve(name)
  assert (target.gpu.name, target.hosts, target.gpus_per_host) == (
      gpu_name, hosts, per_host), target
  assert target.topology == f"1x{hosts}x{per_host}"
  assert gpu.is_gpu_target(name) and not gpu.is_gpu_target("v5p-8")


def test_unknown_gpu_names_the_known_ones():
  with pytest.raises(ValueError, match=r"--topology='h300-8'.*h100.*a100-80gb"):
    gpu.resolve("h300-8")


@pytest.mark.parametrize("name", sorted(gpu.GPUS))
def test_datasheet_peaks_match_the_specs_matrix_units(name):
  """The bf16 / int8 peaks the MFU and roofline divide by are NVIDIA's
  dense figures; where XLA's spec records matrix-unit rates they must
  imply the same peaks (a typo in either breaks this)."""
  spec = gpu.GPUS[name]
  assert spec.memory_bytes > 30 * 2**30 and spec.memory_bandwidth > 1e12
  assert spec.peak_int8_ops == pytest.approx(2 * spec.peak_flops, rel=0.01)
  for dtype, peak in (("bf16", spec.peak_flops), ("s8", spec.peak_int8_ops)):
    implied = spec.spec_peak(dtype)
    if implied is not None:
      assert implied == pytest.approx(peak, rel=0.02), (
          f"{name}: the spec implies {implied:.4g} {dtype} FLOP/s, the "
          f"datasheet {peak:.4g}")


def test_memory_fraction_reads_jaxs_variable(monkeypatch):
  monkeypatch.delenv(gpu.MEMORY_FRACTION_VARIABLE, raising=False)
  assert gpu.memory_fraction() == gpu.DEFAULT_MEMORY_FRACTION
  monkeypatch.setenv(gpu.MEMORY_FRACTION_VARIABLE, "0.9")
  assert gpu.memory_fraction() == 0.9
  monkeypatch.setenv(gpu.MEMORY_FRACTION_VARIABLE, "90")
  with pytest.raises(ValueError, match="XLA_PYTHON_CLIENT_MEM_FRACTION"):
    gpu.memory_fraction()


# -- the GPU compiler's HLO forms (synthetic modules in its syntax) ----------

_GPU_LOOP = """\
HloModule m

%body (p: (s32[], f32[8,16])) -> (s32[], f32[8,16]) {
  %p = (s32[], f32[8,16]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %h = f32[8,16]{1,0} get-tuple-element(%p), index=1
  %w = f32[16,16]{1,0} constant({...})
  %d = f32[8,16]{1,0} dot(%h, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %t = (s32[], f32[8,16]{1,0}) tuple(%i, %d)
}

%cond_fusion (q: s32[]) -> pred[] {
  %q = s32[] parameter(0)
  %n = s32[] constant(7)
  ROOT %lt = pred[] compare(%q, %n), direction=LT
}

%cond (c: (s32[], f32[8,16])) -> pred[] {
  %c = (s32[], f32[8,16]{1,0}) parameter(0)
  %ci = s32[] get-tuple-element(%c), index=0
  ROOT %f = pred[] fusion(%ci), kind=kLoop, calls=%cond_fusion
}

ENTRY %main (x: f32[8,16]) -> f32[8,16] {
  %x = f32[8,16]{1,0} parameter(0)
  %z = s32[] constant(0)
  %init = (s32[], f32[8,16]{1,0}) tuple(%z, %x)
  %loop = (s32[], f32[8,16]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %out = f32[8,16]{1,0} get-tuple-element(%loop), index=1
}
"""


def test_known_trip_count_beats_a_bound_hidden_in_a_fusion():
  """XLA's GPU compiler writes the count on the loop and moves the bound into
  a fusion (here 7, a decoy): the count is the loop's 5."""
  counts = hlo.multiplicities(_GPU_LOOP)
  assert counts["body"] == 5, counts
  [dot] = hlo.matmuls(_GPU_LOOP)
  assert dot.count == 5 and dot.flops == 2 * 8 * 16 * 16


_CUBLAS = """\
HloModule m

ENTRY %main (a: s8[64,128], b: s8[128,32]) -> s32[64,32] {
  %a = s8[64,128]{1,0} parameter(0)
  %b = s8[128,32]{1,0} parameter(1)
  %g = (s32[64,32]{1,0}, s8[4194304]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(f)/dot_general"}, backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  ROOT %r = s32[64,32]{1,0} get-tuple-element(%g), index=0
}
"""


def test_a_cublas_int8_gemm_is_an_int8_matmul_with_its_flops():
  [gemm] = hlo.matmuls(_CUBLAS)
  assert gemm.kind == "cublas" and gemm.is_int8, gemm
  assert gemm.flops == 2 * 64 * 32 * 128 and gemm.count == 1
  # its bytes: both operands and the result, not the 4 MiB workspace
  assert hlo.kernel_bytes(_CUBLAS) == 64 * 128 + 128 * 32 + 4 * 64 * 32


_SLICED = """\
HloModule m

%fused (p0: f32[30,64,64], p1: s32[]) -> f32[1,64,64] {
  %p0 = f32[30,64,64]{2,1,0} parameter(0)
  %bc = f32[30,64,64]{2,1,0} bitcast(%p0)
  %p1 = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %ds = f32[1,64,64]{2,1,0} dynamic-slice(%bc, %p1, %z, %z), dynamic_slice_sizes={1,64,64}
}

ENTRY %main (w: f32[30,64,64], i: s32[]) -> f32[1,64,64] {
  %w = f32[30,64,64]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  ROOT %f = f32[1,64,64]{2,1,0} fusion(%w, %i), kind=kLoop, calls=%fused
}
"""


def test_a_kernel_that_slices_a_stacked_weight_reads_only_the_slice():
  layer = 64 * 64 * 4
  assert hlo.kernel_bytes(_SLICED) == 2 * layer + 4, (
      "reads one layer's slice and the index, writes one layer; reading "
      "all 30 layers would be "
      f"{30 * layer + 4 + layer}")


def test_auto_attention_follows_the_platform_being_traced_for():
  from bitnet_jax.model import attention
  args = (jnp.bfloat16, 64, 128, False)
  assert jax.default_backend() == "cpu"
  assert attention.attention_implementation("auto", *args) == "xla"
  with attention.compiling_for("gpu"):
    assert attention.attention_implementation("auto", *args) == "cudnn"
    # float32 cannot run cuDNN: auto falls back, an explicit ask is refused
    assert attention.attention_implementation(
        "auto", jnp.float32, 64, 128, False) == "xla"
    with pytest.raises(ValueError, match="bfloat16 or float16"):
      attention.attention_implementation("cudnn", jnp.float32, 64, 128,
                                         False)
  assert attention.target_platform() == "cpu"


class _Lowered:
  """A lowered step whose first compile fails as XLA's deviceless Triton
  tiling does for some GEMM shapes."""

  def __init__(self):
    self.options = []

  def compile(self, compiler_options=None):
    self.options.append(compiler_options)
    if compiler_options is None:
      raise RuntimeError("INTERNAL: Couldn't find output tile sizes that "
                         "satisfy hlo: %dot.85 = bf16[16384,3200]{1,0} dot()")
    return "compiled"


def test_a_failed_triton_tiling_compiles_again_with_cublas_and_says_so():
  from types import SimpleNamespace

  from bitnet_jax.aot import compile_step
  lowered = _Lowered()
  gpus = SimpleNamespace(platform="gpu", name="h100-1", devices=[])
  compiled, note = compile_step._compile(lowered, "train", gpus)
  assert compiled == "compiled" and note == compile_step.NO_TRITON_NOTE
  assert lowered.options == [None, {"xla_gpu_enable_triton_gemm": False}]
  tpus = SimpleNamespace(platform="tpu", name="v5p-8", devices=[])
  with pytest.raises(compile_step.CompileError, match="output tile sizes"):
    compile_step._compile(_Lowered(), "train", tpus)
