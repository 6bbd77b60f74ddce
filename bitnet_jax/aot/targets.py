"""What a step is compiled for: a TPU slice (`tpu`) or NVIDIA GPU hosts
(`gpu`), as one `Target` the compile report and the batch search read.

`resolve("v5p-8")` and `resolve("h100-8")` give the devices (compile-only
descriptions, no accelerator needed), the memory a step must fit in per
device and the peaks the roofline estimate divides by.
"""

from __future__ import annotations

import dataclasses
import math

from bitnet_jax.aot import gpu, tpu


@dataclasses.dataclass(frozen=True)
class Target:
  """Devices to compile for, with the figures the report needs.

  Attributes:
    name: as given ("v5p-8", "h100-2x8").
    platform: "tpu" or "gpu" (`jax.Device.platform` of the devices).
    description: the topology in words ("v5p:2x2x1, 1 slice(s)",
      "2 host(s) x 8 GPU(s), CUDA topology 1x2x8").
    devices: compile-only `jax.Device`s.
    hosts: processes (hosts) the job runs as.
    memory_bytes: device memory (HBM), bytes per device.
    memory_limit_bytes: what a step may use per device: HBM on TPU; on GPU
      the fraction JAX preallocates (`gpu.memory_fraction`).
    memory_limit_why: how the limit was set, in words.
    peak_flops: dense bf16 FLOP/s per device.
    peak_int8_ops: dense int8 OP/s per device.
    memory_bandwidth: bytes/s per device.
  """
  name: str
  platform: str
  description: str
  devices: list
  hosts: int
  memory_bytes: int
  memory_limit_bytes: int
  memory_limit_why: str
  peak_flops: float
  peak_int8_ops: float
  memory_bandwidth: float


def known_names() -> list[str]:
  """Examples of every kind of target name, for messages."""
  return tpu.known_names() + gpu.known_names()


def resolve(name: str, num_slices: int = 1) -> Target:
  """The target of `--topology` (and `--num_slices`, TPU only).

  Raises:
    ValueError: an unknown name (listing the known ones), or num_slices > 1
      for GPUs.
    RuntimeError: libtpu, or JAX's CUDA plugin, is not installed (with the
      pip command), or a GPU spec does not parse with this jaxlib.
  """
  if gpu.is_gpu_target(name):
    if num_slices != 1:
      raise ValueError(f"--num_slices={num_slices} is for TPU slices; "
                       "write GPU hosts into the name (h100-2x8)")
    target = gpu.resolve(name)
    fraction = gpu.memory_fraction()
    return Target(
        name=name, platform="gpu",
        description=(f"{target.hosts} host(s) x {target.gpus_per_host} "
                     f"GPU(s), CUDA topology {target.topology}"),
        devices=gpu.devices(target), hosts=target.hosts,
        memory_bytes=target.gpu.memory_bytes,
        memory_limit_bytes=int(fraction * target.gpu.memory_bytes),
        memory_limit_why=(
            f"{fraction:.0%} of device memory, the part JAX preallocates "
            f"({gpu.MEMORY_FRACTION_VARIABLE}"
            f"{'' if fraction == gpu.DEFAULT_MEMORY_FRACTION else ' as set'})"
        ),
        peak_flops=target.gpu.peak_flops,
        peak_int8_ops=target.gpu.peak_int8_ops,
        memory_bandwidth=target.gpu.memory_bandwidth)
  tpu_slice = tpu.resolve(name)
  chip = tpu_slice.chip
  return Target(
      name=name, platform="tpu",
      description=f"{tpu_slice.topology_name}, {num_slices} slice(s)",
      devices=tpu.devices(tpu_slice, num_slices),
      hosts=num_slices * max(1, tpu_slice.chips // math.prod(
          tpu_slice.topology_kwargs()["chips_per_host_bounds"])),
      memory_bytes=chip.hbm_bytes, memory_limit_bytes=chip.hbm_bytes,
      memory_limit_why="the chip's HBM",
      peak_flops=chip.peak_flops, peak_int8_ops=chip.peak_int8_ops,
      memory_bandwidth=chip.memory_bandwidth)
