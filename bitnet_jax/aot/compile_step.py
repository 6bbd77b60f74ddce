"""Compiles the train and eval steps `main` would run, for a TPU slice.

`compile_report(config, "v5p-8")` builds the run's mesh from libtpu's device
descriptions of that slice (`tpu.devices`), the abstract train state
(`train_state.create_train_state(..., initialize=False)`: shapes and
shardings, no arrays) and an abstract batch, then lowers and compiles
`steps.make_train_step` and `steps.make_eval_step` for the TPU, on this CPU
host. It reads back:

  * memory per chip (`compiled.memory_analysis()`): arguments + outputs -
    donated aliases + temporaries + generated code, against the chip's HBM;
  * the optimized HLO's matmuls (`hlo.matmuls`): int8 (s8 x s8 -> s32) and
    bf16 dots, and every forward BitLinear that does not reach the int8 path
    when `model.bitlinear_matmul="int8"`;
  * FLOPs per chip per step: the matmuls' FLOPs times how often one step runs
    them (`hlo.multiplicities`: a scanned layer body counts n_layers times),
    because `cost_analysis()["flops"]` counts each loop body once;
  * a step time: XLA's TPU cost model (`cost_analysis()["optimal_seconds"]`)
    scaled by corrected / XLA FLOPs, i.e. assuming the loop bodies run at
    the same rate as the rest. A compiler estimate, not a measurement; the
    MFU it implies is model FLOPs (`throughput.flops_per_token`, PaLM's
    6N + 12 L d T) per chip / (step seconds x the chip's dense bf16 peak).

Errors a user must see before launch (a mesh that does not divide the
chips, a batch that does not split over the data axis, a GPU-only attention
kernel, a step that does not fit in HBM) are raised as `ConfigError` /
`CompileError` with one line naming the config key and the fix.
"""

from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

from bitnet_jax import config as config_lib
from bitnet_jax.aot import hlo, tpu
from bitnet_jax.config import ConfigError
from bitnet_jax.data.batch import Batch
from bitnet_jax.distributed import sharding
from bitnet_jax.metrics import throughput
from bitnet_jax.optim import optimizer
from bitnet_jax.training import objectives, steps, train_state

HEADROOM = 0.10  # `find_batch` keeps this fraction of HBM free


class CompileError(RuntimeError):
  """XLA refused to compile the step (out of memory or an unsupported op);
  the message is one line naming the config keys to change."""


class OutOfMemoryError(CompileError):
  """The step does not fit in the chip's HBM (XLA's RESOURCE_EXHAUSTED)."""


def make_mesh(config: ml_collections.ConfigDict, devices: list,
              num_slices: int = 1) -> Mesh:
  """The run's (data, fsdp) mesh over `devices`.

  One slice: `sharding.make_mesh`. Several: the data axis spans the slices
  over the data-center network (DCN) and fsdp stays within a slice, as
  `mesh_utils.create_hybrid_device_mesh` lays them out (MaxText's
  `dcn_data_parallelism`).

  Raises:
    ConfigError: naming `mesh.data` / `mesh.fsdp` when the sizes do not fit
      the chips or `mesh.data` is not a multiple of the slice count.
  """
  if num_slices == 1:
    return sharding.make_mesh(config.mesh, devices)
  data, fsdp = sharding.mesh_sizes(config.mesh, len(devices))
  if data % num_slices:
    raise ConfigError(
        f"config.mesh.data={data} must be a multiple of --num_slices="
        f"{num_slices}: the data axis spans the slices (fsdp stays within "
        "one); set config.mesh.fsdp to the chips of one slice or less")
  grid = mesh_utils.create_hybrid_device_mesh(
      (data // num_slices, fsdp), (num_slices, 1), devices)
  return Mesh(grid, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 2)


def abstract_batch(config: ml_collections.ConfigDict, mesh: Mesh) -> Batch:
  """The train batch `main` feeds, as `jax.ShapeDtypeStruct`s
  (`Batch.shapes`): windows `[batch, seq_len + 1]`, the loss mask, and
  with `data.packing="document"` segment ids and positions.

  Raises:
    ConfigError: see `sharding.check_batch_size`.
  """
  t = config.train
  sharding.check_batch_size(t.batch_size, mesh)
  return Batch.shapes(t.batch_size, t.seq_len,
                      packed=config.data.packing == "document",
                      sharding=sharding.batch_sharding(mesh))


def _memory(compiled) -> dict:
  stats = compiled.memory_analysis()
  parts = {"argument_bytes": stats.argument_size_in_bytes,
           "output_bytes": stats.output_size_in_bytes,
           "alias_bytes": stats.alias_size_in_bytes,
           "temp_bytes": stats.temp_size_in_bytes,
           "code_bytes": stats.generated_code_size_in_bytes}
  parts["per_chip_bytes"] = (parts["argument_bytes"] + parts["output_bytes"]
                             - parts["alias_bytes"] + parts["temp_bytes"]
                             + parts["code_bytes"])
  return parts


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"xla_flops": float(cost.get("flops", 0.0)),
          "optimal_seconds": float(cost.get("optimal_seconds", 0.0))}


_OUT_OF_MEMORY = re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm")


def _compile(lowered, what: str, tpu_slice: tpu.Slice):
  """`lowered.compile()`, XLA's failures as one-line `CompileError`s."""
  try:
    return lowered.compile()
  except Exception as e:  # XlaRuntimeError and friends: classify by text
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text:
      used = _OUT_OF_MEMORY.search(text)
      amount = (f" ({used.group(1)}{used.group(2)} of {used.group(3)}"
                f"{used.group(4)} HBM)" if used else "")
      raise OutOfMemoryError(
          f"the {what} step does not fit in a {tpu_slice.chip.generation} "
          f"chip's HBM{amount} on {tpu_slice.name}: lower "
          "config.train.batch_size or raise config.train.grad_accum_steps, "
          "set config.model.remat_policy=full, or shard over more chips "
          "(config.mesh.fsdp=-1); --find_batch searches for a batch that "
          "fits") from None
    first = next((line for line in text.splitlines() if line.strip()), text)
    raise CompileError(f"XLA cannot compile the {what} step for "
                       f"{tpu_slice.name}: {first[:400]}") from None


def check_for_tpu(config: ml_collections.ConfigDict) -> None:
  """Config checks of `main`'s start-up plus the TPU path's own.

  Raises:
    ConfigError: `config.validate`'s errors; `model.attention_implementation
      ="cudnn"` (a GPU kernel).
  """
  config_lib.validate(config)
  if config.model.attention_implementation == "cudnn":
    raise ConfigError(
        "config.model.attention_implementation=cudnn is NVIDIA's fused "
        "kernel and does not exist on TPU; use auto or xla")


def bitlinear_forward(found: list[hlo.Matmul]) -> list[hlo.Matmul]:
  """The forward BitLinear matmuls (and their remat recomputations) among
  `found`: made in layers.py, outside the backward pass's transposes."""
  return [m for m in found if "layers.py" in m.source
          and (not m.backward or "rematted" in m.op_name)]


def _matmul_report(found: list[hlo.Matmul], int8_wanted: bool) -> dict:
  def dtype_pair(m):
    return f"{m.lhs_dtype}x{m.rhs_dtype}->{m.out_dtype}"
  forward = bitlinear_forward(found)
  missing = [m for m in forward if not m.is_int8] if int8_wanted else []
  return {
      "int8_dots": sum(m.is_int8 for m in found),
      "int8_dot_executions": sum(m.count for m in found if m.is_int8),
      "bf16_dots": sum(m.lhs_dtype == m.rhs_dtype == "bf16" for m in found),
      "other_dots": sum(not m.is_int8 and not m.lhs_dtype == m.rhs_dtype
                        == "bf16" for m in found),
      "bitlinear_forward_executions": sum(m.count for m in forward),
      "bitlinear_not_int8": [
          {"source": m.source, "dtypes": dtype_pair(m), "op_name": m.op_name,
           "why": "the operands reach the dot as " + dtype_pair(m)
                  + ", not int8 codes"} for m in missing],
      "flops_per_chip": sum(m.flops * m.count for m in found)}


def compile_report(config: ml_collections.ConfigDict, topology: str,
                   num_slices: int = 1, eval_step: bool = True) -> dict:
  """Compiles `main`'s train (and eval) step for a TPU slice; the report.

  Args:
    config: a run config (validated here, as `main` does).
    topology: a Cloud TPU accelerator type ("v5p-8", "v5litepod-16") or a
      topology ("v5p:2x2x2"); see `tpu.resolve`.
    num_slices: slices joined over DCN (multi-slice data parallelism).
    eval_step: also compile the eval step (its memory is reported).

  Returns:
    A JSON-ready dict: topology, chips, mesh, parameters, batch_size,
    seq_len, tokens_per_step, quantization, bitlinear_matmul, memory parts
    in bytes per chip (argument/output/alias/temp/code, per_chip_bytes),
    hbm_bytes, headroom (fraction of HBM left), fits, compile_seconds,
    the matmul counts of `_matmul_report`, flops_per_chip (FLOP per chip
    per step, loop-corrected), xla_flops, model_flops_per_chip (6N + 12LdT
    x tokens / chips), optimal_seconds, estimated_step_seconds, mfu, and
    eval_per_chip_bytes. estimated_step_seconds and mfu are None where
    XLA's cost model gives no estimate.

  Raises:
    ConfigError: a config key that cannot work on this slice.
    CompileError: XLA's refusal (e.g. out of memory), one line.
    ValueError: an unknown topology (listing the known ones).
    RuntimeError: libtpu is not installed.
  """
  check_for_tpu(config)
  tpu_slice = tpu.resolve(topology)
  devices = tpu.devices(tpu_slice, num_slices)
  mesh = make_mesh(config, devices, num_slices)
  batch = abstract_batch(config, mesh)
  tx = optimizer.make_optimizer(config)
  graphdef, state, shardings = train_state.create_train_state(
      config, mesh, tx, initialize=False)

  start = time.perf_counter()
  lowered = steps.make_train_step(
      config, graphdef, tx, shardings, mesh,
      objectives.make_objective(config, mesh, None)).lower(state, batch)
  compiled = _compile(lowered, "train", tpu_slice)
  compile_seconds = time.perf_counter() - start

  m, t = config.model, config.train
  chips = len(devices)
  hbm = tpu_slice.chip.hbm_bytes
  report = {
      "topology": tpu_slice.name, "topology_shape": tpu_slice.topology_name,
      "num_slices": num_slices, "chips": chips,
      "device_kind": devices[0].device_kind,
      "mesh": dict(mesh.shape),
      "parameters": int(sum(np.prod(x.shape) for x in
                            jax.tree.leaves(state.params))),
      "batch_size": t.batch_size, "seq_len": t.seq_len,
      "grad_accum_steps": t.grad_accum_steps,
      "tokens_per_step": t.batch_size * t.seq_len,
      "quantization": m.quantization,
      "bitlinear_matmul": (m.bitlinear_matmul if m.quantization == "ternary"
                           else "none"),
      "dtype": m.dtype, "remat_policy": m.remat_policy,
      **_memory(compiled), "hbm_bytes": hbm,
      "compile_seconds": round(compile_seconds, 2),
      **_matmul_report(hlo.matmuls(compiled.as_text()),
                       m.quantization == "ternary"
                       and m.bitlinear_matmul == "int8"),
      **_cost(compiled),
      "flops_method": "HLO matmuls x loop trip counts (hlo.matmuls)"}
  report["headroom"] = 1.0 - report["per_chip_bytes"] / hbm
  report["fits"] = report["per_chip_bytes"] <= hbm
  model_flops = throughput.flops_per_token(
      throughput.matmul_params(state.params, m), m.n_layers, m.d_model,
      t.seq_len) * report["tokens_per_step"] / chips
  report["model_flops_per_chip"] = model_flops
  scale = (report["flops_per_chip"] / report["xla_flops"]
           if report["xla_flops"] else 1.0)
  # libtpu's cost model gives no usable figure (<= 0) for some slices
  # (v5e, v6e in libtpu 0.10): then no estimate rather than a wrong one
  seconds = (report["optimal_seconds"] * scale
             if report["optimal_seconds"] > 0 else None)
  report["estimated_step_seconds"] = seconds
  report["mfu"] = (model_flops / (seconds * tpu_slice.chip.peak_flops)
                   if seconds else None)
  if eval_step:
    lowered = steps.make_eval_step(config, graphdef, shardings.params,
                                   mesh, objectives.NextToken(t)).lower(
        state.params, batch, jax.ShapeDtypeStruct((), jnp.int32))
    report["eval_per_chip_bytes"] = _memory(
        _compile(lowered, "eval", tpu_slice))["per_chip_bytes"]
  return report
