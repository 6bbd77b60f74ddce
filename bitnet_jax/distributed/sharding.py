"""Device mesh, parameter and batch shardings, multi-host start-up.

The mesh has two axes, both data-parallel for activations:
  `data`: parameters replicated (pure data parallelism);
  `fsdp`: parameters and optimizer state sharded (ZeRO-3 / FSDP).
The batch dimension is sharded over both axes; each parameter of rank >= 2 is
sharded over `fsdp` along its largest divisible dimension (as nanodo does),
and everything else is replicated. The leading `[n_layers]` axis of scanned
blocks (`model.scan_layers`) is never sharded: the rule applies to one
layer's shape, so every device holds its slice of every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bitnet_jax.config import ConfigError
from bitnet_jax.model.tree_paths import in_stacked_layers

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """Calls `jax.distributed.initialize` when `distributed.initialize` is set.

  Empty / negative fields are left to JAX's auto-detection (TPU pods, SLURM,
  Open MPI, Kubernetes). Must run before any other JAX call.
  """
  d = config.distributed
  if not d.initialize:
    return
  jax.distributed.initialize(
      coordinator_address=d.coordinator_address or None,
      num_processes=d.num_processes or None,
      process_id=d.process_id if d.process_id >= 0 else None)


def mesh_sizes(mesh_config: ml_collections.ConfigDict,
               device_count: int) -> tuple[int, int]:
  """(data, fsdp) of `config.mesh` over `device_count` devices, a -1 filled.

  Raises:
    ConfigError: naming `mesh.data` / `mesh.fsdp` when the sizes do not
      multiply to the device count.
  """
  sizes = {"data": mesh_config.data, "fsdp": mesh_config.fsdp}
  known = int(np.prod([s for s in sizes.values() if s != -1]))
  for name, size in sizes.items():
    if size == -1:
      if device_count % known:
        raise ConfigError(
            f"config.mesh.{name}=-1 cannot fill {device_count} devices when "
            f"the other axis is {known}; pick sizes that divide the count")
      sizes[name] = device_count // known
  if sizes["data"] * sizes["fsdp"] != device_count:
    raise ConfigError(
        f"config.mesh.data={sizes['data']} x config.mesh.fsdp="
        f"{sizes['fsdp']} must equal the {device_count} devices; set one "
        "of them to -1 to fill")
  return sizes["data"], sizes["fsdp"]


def make_mesh(mesh_config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp) mesh; one axis may be -1 (= fill).

  Args:
    mesh_config: `config.mesh` with integer `data` and `fsdp`.
    devices: the devices to use; all of `jax.devices()` by default.

  Raises:
    ConfigError: see `mesh_sizes`.
  """
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh(mesh_sizes(mesh_config, len(devices)), MESH_AXES,
                       axis_types=(AxisType.Auto, AxisType.Auto),
                       devices=devices)


def parameter_spec(shape: Sequence[int], fsdp_size: int) -> P:
  """FSDP rule: shard the largest dimension divisible by the fsdp size."""
  if len(shape) < 2 or fsdp_size == 1:
    return P()
  for dim in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
  """NamedShardings for a pytree of arrays or `jax.ShapeDtypeStruct`s
  (parameters, or a train state whose optimizer state mirrors them)."""
  fsdp_size = mesh.shape["fsdp"]

  def place(path, x):
    if in_stacked_layers(path):
      return NamedSharding(mesh, P(None, *parameter_spec(x.shape[1:],
                                                         fsdp_size)))
    return NamedSharding(mesh, parameter_spec(x.shape, fsdp_size))

  return jax.tree_util.tree_map_with_path(place, abstract_state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a `[batch, ...]` array: batch split over data and fsdp."""
  return NamedSharding(mesh, P(BATCH_AXES))


def platform(mesh: Mesh) -> str:
  """The platform of the mesh's devices ("gpu", "tpu", "cpu"): what a step
  built for it is compiled for, whatever the host's default backend."""
  return mesh.devices.flat[0].platform


def replicated(mesh: Mesh) -> NamedSharding:
  """A fully replicated sharding (scalars, metrics)."""
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  """Raises ConfigError naming `train.batch_size` when `batch_size` rows
  do not split evenly over the mesh's data-parallel devices."""
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % shards:
    raise ConfigError(
        f"config.train.batch_size={batch_size} must be divisible by the "
        f"{shards} data-parallel devices (mesh.data x mesh.fsdp)")


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Assembles per-process batches `[local_batch, ...]` into global arrays.

  Each process passes its own rows (an array, or a dict of arrays such as
  {"tokens", "segment_ids", "positions"}); each result is `[local_batch x
  process_count, ...]`, sharded over the batch axes.

  Raises:
    ConfigError: naming `train.batch_size` if the global batch does not split
      evenly over the mesh's data-parallel devices.
  """
  check_batch_size(
      jax.tree.leaves(local_batch)[0].shape[0] * jax.process_count(), mesh)
  return jax.tree.map(lambda rows: jax.make_array_from_process_local_data(
      batch_sharding(mesh), rows), local_batch)
