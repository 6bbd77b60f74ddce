"""NVIDIA GPU targets: names, specs and compile-only devices on a CPU host.

A GPU target is named `<gpu>-<gpus>` (one host: "h100-1", "h100-8") or
`<gpu>-<hosts>x<gpus>` ("h100-2x8": two hosts of 8, 16 devices). JAX's CUDA
plugin builds compile-only devices for it from a
`stream_executor.GpuTargetConfigProto` (XLA's GPU spec in text form, kept as
data in `gpu_specs/`, see its README) with
`jax.experimental.topologies.get_topology_desc(platform="cuda",
topology="<slices>x<hosts>x<gpus>", target_config=TEXT)`; no GPU or NVIDIA
driver is needed, only the plugin, cuDNN (JAX asks for its version when it
traces cuDNN attention) and ptxas (`pip install -e '.[gpu_compile]'`).

Per GPU the spec gives device memory, SM count, clock and memory bandwidth;
the dense bf16 and int8 peaks are NVIDIA's datasheet figures (`Gpu.source`),
which a unit test checks against the spec's matrix-unit rates where XLA
records them (cores x units x ops per clock x clock x 2).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import os
import re

SPEC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                        "gpu_specs")
SPEC_JAXLIB = "0.10.2"  # the jaxlib the spec files were checked to parse with
# JAX preallocates this fraction of a GPU's memory for its arrays unless
# XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise (jax.readthedocs.io, "GPU
# memory allocation"): a step must fit in it, not in the whole device.
DEFAULT_MEMORY_FRACTION = 0.75
MEMORY_FRACTION_VARIABLE = "XLA_PYTHON_CLIENT_MEM_FRACTION"
_H100 = "https://www.nvidia.com/en-us/data-center/h100/ (datasheet, dense)"
_H200 = "https://www.nvidia.com/en-us/data-center/h200/ (datasheet, dense)"
_A100 = ("https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/"
         "a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf (dense)")
_B200 = "https://www.nvidia.com/en-us/data-center/hgx/ (HGX B200 per GPU, dense)"


@dataclasses.dataclass(frozen=True)
class Gpu:
  """One NVIDIA GPU model.

  Attributes:
    name: the prefix of its target names ("h100", "a100-80gb").
    spec_file: its `GpuTargetConfigProto` under `gpu_specs/`.
    peak_flops: dense bf16 tensor-core FLOP/s (datasheet).
    peak_int8_ops: dense int8 tensor-core OP/s (datasheet).
    source: where the peaks come from.
  """
  name: str
  spec_file: str
  peak_flops: float
  peak_int8_ops: float
  source: str

  @functools.cached_property
  def spec(self) -> str:
    """The spec's text."""
    with open(os.path.join(SPEC_DIR, self.spec_file)) as f:
      return f.read()

  def _field(self, name: str) -> str:
    found = re.search(rf"^\s*{name}: (\S+)", self.spec, re.MULTILINE)
    if not found:
      raise ValueError(f"{self.spec_file} has no {name}")
    return found.group(1)

  @property
  def device_kind(self) -> str:
    """The name JAX gives its devices ("NVIDIA H100 80GB HBM3")."""
    return self._field("device_description_str").strip('"')

  @property
  def memory_bytes(self) -> int:
    """Device memory, bytes (the spec's `device_memory_size`)."""
    return int(self._field("device_memory_size"))

  @property
  def memory_bandwidth(self) -> float:
    """Device memory bandwidth, bytes/s (the spec's)."""
    return float(self._field("memory_bandwidth"))

  @property
  def sm_count(self) -> int:
    """Streaming multiprocessors (the spec's `core_count`)."""
    return int(self._field("core_count"))

  @property
  def clock_ghz(self) -> float:
    """SM clock, GHz (the spec's `clock_rate_ghz`)."""
    return float(self._field("clock_rate_ghz"))

  def spec_peak(self, dtype: str) -> float | None:
    """Dense matrix-unit peak the spec implies for "bf16" or "s8"
    (cores x units per core x ops per clock x clock x 2, FLOP/s), or None
    where XLA's spec records no matrix-unit rates (the A100s)."""
    key = {"s8": 2, "bf16": 16}[dtype]  # xla.PrimitiveType numbers
    matrix = self.spec.split("matrix_unit_description", 1)
    if len(matrix) < 2:
      return None
    rate = re.search(rf"key: {key}\s+value \{{\s+clock_rate_ghz: ([\d.]+)\s+"
                     r"units_per_core: (\d+)\s+ops_per_clock: (\d+)",
                     matrix[1])
    if not rate:
      return None
    return (self.sm_count * float(rate.group(1)) * 1e9 * int(rate.group(2))
            * int(rate.group(3)) * 2)


GPUS = {g.name: g for g in (
    Gpu("h100", "h100_sxm.txtpb", 989e12, 1979e12, _H100),
    Gpu("h100-pcie", "h100_pcie.txtpb", 756e12, 1513e12, _H100),
    Gpu("h200", "h200_sxm.txtpb", 989e12, 1979e12, _H200),
    Gpu("a100-80gb", "a100_sxm_80gb.txtpb", 312e12, 624e12, _A100),
    Gpu("a100-40gb", "a100_sxm_40gb.txtpb", 312e12, 624e12, _A100),
    Gpu("b200", "b200.txtpb", 2250e12, 4500e12, _B200),
)}
_NAME = re.compile(r"(" + "|".join(sorted(GPUS, key=len, reverse=True))
                   + r")-(?:(\d+)x)?(\d+)")


@dataclasses.dataclass(frozen=True)
class GpuTarget:
  """GPU hosts to compile for.

  Attributes:
    name: as given ("h100-8", "h100-2x8").
    gpu: the GPU model.
    hosts: processes (hosts) in the job.
    gpus_per_host: devices per host.
  """
  name: str
  gpu: Gpu
  hosts: int
  gpus_per_host: int

  @property
  def devices_count(self) -> int:
    return self.hosts * self.gpus_per_host

  @property
  def topology(self) -> str:
    """The CUDA plugin's topology string: slices x hosts x GPUs per host."""
    return f"1x{self.hosts}x{self.gpus_per_host}"


def is_gpu_target(name: str) -> bool:
  """`name` has the form of a GPU target ("h100-8"), known GPU or not."""
  return bool(re.fullmatch(r"[a-z]\d{3}[\w-]*-(?:\d+x)?\d+", name)) and \
      not name.startswith(("v4", "v5", "v6"))


def known_names() -> list[str]:
  """Example target names, one per GPU model and host layout."""
  return [f"{g}-{n}" for g in GPUS for n in ("1", "8")] + ["h100-2x8"]


def resolve(name: str) -> GpuTarget:
  """The GPU target of a name ("h100-8", "a100-80gb-1", "h100-2x8").

  Raises:
    ValueError: naming `--topology`, the known GPUs and the form.
  """
  found = _NAME.fullmatch(name)
  if not found or int(found.group(3)) < 1 or (found.group(2) and
                                              int(found.group(2)) < 1):
    raise ValueError(
        f"--topology={name!r} is not a GPU target this tool knows: use "
        f"<gpu>-<gpus> or <gpu>-<hosts>x<gpus> with <gpu> one of "
        f"{', '.join(GPUS)} (e.g. {', '.join(known_names()[:3])}, h100-2x8)")
  return GpuTarget(name, GPUS[found.group(1)], int(found.group(2) or 1),
                   int(found.group(3)))


def memory_fraction() -> float:
  """The fraction of device memory JAX lets arrays use
  (`XLA_PYTHON_CLIENT_MEM_FRACTION`, default 0.75).

  Raises:
    ValueError: the variable is not a number in (0, 1].
  """
  text = os.environ.get(MEMORY_FRACTION_VARIABLE)
  if text is None:
    return DEFAULT_MEMORY_FRACTION
  try:
    value = float(text)
  except ValueError:
    value = -1.0
  if not 0 < value <= 1:
    raise ValueError(f"{MEMORY_FRACTION_VARIABLE}={text!r} must be a "
                     "fraction in (0, 1], e.g. 0.95")
  return value


def devices(target: GpuTarget) -> list:
  """Compile-only CUDA devices of `target`, from JAX's CUDA plugin on this
  host (no GPU needed). Device i lives on process i // gpus_per_host.

  Raises:
    RuntimeError: the plugin (or cuDNN) is not installed, with the pip
      command; or the spec file does not parse with the installed jaxlib
      (naming both versions).
  """
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if not any(importlib.util.find_spec(p) for p in
             ("jax_cuda12_plugin", "jax_cuda13_plugin")):
    raise RuntimeError(
        "compiling for NVIDIA GPUs needs JAX's CUDA plugin, cuDNN and ptxas "
        "on this host (no GPU): pip install -e '.[gpu_compile]'")
  try:
    topology = topologies.get_topology_desc(
        platform="cuda", topology_name="", topology=target.topology,
        target_config=target.gpu.spec)
  except (RuntimeError, NotImplementedError) as e:  # JaxRuntimeError is one
    jaxlib = importlib.metadata.version("jaxlib")
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "parse" in text.lower():
      raise RuntimeError(
          f"the GPU spec {target.gpu.spec_file} does not parse with jaxlib "
          f"{jaxlib} (it was checked with {SPEC_JAXLIB}): {text}") from None
    raise RuntimeError(
        f"JAX's CUDA plugin cannot describe {target.name} on this host "
        f"(jaxlib {jaxlib}): {text}; a host with an NVIDIA driver must "
        "start JAX with JAX_PLATFORMS=cpu to compile for other GPUs"
    ) from None
  return list(topology.devices)
