"""Cloud TPU slices: accelerator-type names, topologies and chip specs.

Cloud TPU names a slice by its accelerator type (`gcloud compute tpus
tpu-vm create --accelerator-type=...`). For v4 and v5p the number counts
TensorCores, two per chip (a v5p-8 is 4 chips, 2x2x1, one megacore device
per chip); for v5e (`v5litepod-N`) and v6e it counts chips (a v5litepod-8 is
8 chips, 2x4). Sources: cloud.google.com/tpu/docs/v4, /v5e, /v5p and /v6e
("System architecture" and "Configurations" sections). A topology string
("v5p:2x2x2") is accepted as well.

Per chip (same pages): v4 32 GiB HBM at 1,200 GB/s and 275 TFLOP/s dense
bf16 (and int8); v5e 16 GiB, 819 GB/s, 197 TFLOP/s bf16 and 394 TOP/s int8;
v5p 95 GiB, 2,765 GB/s, 459 TFLOP/s and 918 TOP/s; v6e 32 GiB, 1,640 GB/s,
918 TFLOP/s and 1,836 TOP/s.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One TPU generation's chip.

  Attributes:
    generation: "v4", "v5e", "v5p" or "v6e".
    hbm_bytes: high-bandwidth memory per chip, bytes.
    peak_flops: dense bf16 FLOP/s per chip.
    megacore: the chip's two TensorCores form one JAX device (v4, v5p).
    cores_in_name: the accelerator-type number counts TensorCores (2 per
      chip) rather than chips.
    memory_bandwidth: HBM bandwidth, bytes/s.
    peak_int8_ops: dense int8 OP/s per chip.
  """
  generation: str
  hbm_bytes: int
  peak_flops: float
  megacore: bool
  cores_in_name: bool
  memory_bandwidth: float
  peak_int8_ops: float


CHIPS = {
    "v4": Chip("v4", 32 * GIB, 275e12, megacore=True, cores_in_name=True,
               memory_bandwidth=1200e9, peak_int8_ops=275e12),
    "v5e": Chip("v5e", 16 * GIB, 197e12, megacore=False, cores_in_name=False,
                memory_bandwidth=819e9, peak_int8_ops=394e12),
    "v5p": Chip("v5p", 95 * GIB, 459e12, megacore=True, cores_in_name=True,
                memory_bandwidth=2765e9, peak_int8_ops=918e12),
    "v6e": Chip("v6e", 32 * GIB, 918e12, megacore=False, cores_in_name=False,
                memory_bandwidth=1640e9, peak_int8_ops=1836e12),
}
# accelerator-type prefixes -> generation
_PREFIXES = {"v4": "v4", "v5p": "v5p", "v5litepod": "v5e", "v5e": "v5e",
             "v6e": "v6e"}
# chips -> shape: 3-D tori (v4, v5p) and 2-D meshes (v5e, v6e)
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4),
              64: (4, 4, 4), 128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8),
              1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8),
              64: (8, 8), 128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Slice:
  """One TPU slice.

  Attributes:
    name: as given ("v5p-8", "v5litepod-16", "v5p:2x2x2").
    chip: its `Chip`.
    shape: chips along each axis, e.g. (2, 2, 1).
  """
  name: str
  chip: Chip
  shape: tuple[int, ...]

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def topology_name(self) -> str:
    """The name `jax.experimental.topologies.get_topology_desc` takes."""
    return f"{self.chip.generation}:{'x'.join(map(str, self.shape))}"

  def topology_kwargs(self) -> dict:
    """libtpu's topology options: megacore chips, chips per host (4, or 8
    on one-host v5e/v6e slices), wrap-around links on full 3-D tori."""
    shape = self.shape + (1,) * (3 - len(self.shape))
    if self.chip.megacore or self.chips > 8:
      per_host = (min(2, shape[0]), min(2, shape[1]), 1)
    else:  # v5e-8 / v6e-8: one host with all its chips
      per_host = shape
    full_torus = len(self.shape) == 3 and self.chips >= 64
    return {"chip_config_name": "megacore" if self.chip.megacore else
            "default",
            "chips_per_host_bounds": per_host,
            "wrap": tuple(full_torus and s >= 4 for s in shape)}


def known_names() -> list[str]:
  """Every accelerator-type name `resolve` accepts (one per line of docs)."""
  names = []
  for prefix, generation in _PREFIXES.items():
    chip = CHIPS[generation]
    for chips in _shape_table(chip):
      names.append(f"{prefix}-{chips * 2 if chip.cores_in_name else chips}")
  return names


def _shape_table(chip: Chip) -> dict[int, tuple[int, ...]]:
  return _SHAPES_3D if chip.generation in ("v4", "v5p") else _SHAPES_2D


def resolve(name: str) -> Slice:
  """The slice of an accelerator type ("v5p-8") or topology ("v5p:2x2x2").

  Raises:
    ValueError: naming `--topology` and listing the known names.
  """
  known = ", ".join(known_names())
  topology = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+)*)", name)
  if topology:
    chip = CHIPS[topology.group(1)]
    shape = tuple(int(s) for s in topology.group(2).split("x"))
    if len(shape) != len(next(iter(_shape_table(chip).values()))):
      raise ValueError(f"--topology={name}: {chip.generation} slices are "
                       f"{len(next(iter(_shape_table(chip).values())))}-D "
                       "(e.g. v5p:2x2x1, v5e:2x4)")
    return Slice(name, chip, shape)
  accelerator = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", name)
  if accelerator:
    chip = CHIPS[_PREFIXES[accelerator.group(1)]]
    count = int(accelerator.group(2))
    chips = count // 2 if chip.cores_in_name else count
    if chips in _shape_table(chip) and (not chip.cores_in_name
                                        or count % 2 == 0):
      return Slice(name, chip, _shape_table(chip)[chips])
  raise ValueError(f"--topology={name!r} is not a Cloud TPU accelerator "
                   f"type this tool knows; use one of: {known} (or a "
                   "topology such as v5p:2x2x2)")


def devices(tpu_slice: Slice, num_slices: int = 1) -> list:
  """TPU device descriptions of `num_slices` copies of `tpu_slice`, from
  libtpu on this host (`jax.experimental.topologies`; no TPU needed).

  Raises:
    RuntimeError: when libtpu is not installed (with the pip command).
  """
  from jax.experimental import topologies
  # libtpu takes a host-wide lock on load; description-only use (no chips)
  # may share it with another compile or a test on the same host
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    topology = topologies.get_topology_desc(
        topology_name=tpu_slice.topology_name, platform="tpu",
        num_slices=num_slices, **tpu_slice.topology_kwargs())
  except (RuntimeError, ValueError) as e:
    if importlib.util.find_spec("libtpu") is None:
      raise RuntimeError(
          "compiling for TPU needs libtpu on this host: pip install "
          f"'jax[tpu]=={_jax_version()}'") from e
    raise
  return list(topology.devices)


def _jax_version() -> str:
  import jax
  return jax.__version__
