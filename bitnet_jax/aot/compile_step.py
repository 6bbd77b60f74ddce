"""Compiles the train and eval steps `main` would run, for a TPU slice or
NVIDIA GPU hosts, on a CPU host (no accelerator).

`compile_report(config, "v5p-8")` (or "h100-8") builds the run's mesh from
compile-only device descriptions (`targets.resolve`: libtpu's, or JAX's
CUDA plugin with an XLA GPU spec), the abstract train state
(`train_state.create_train_state(..., initialize=False)`: shapes and
shardings, no arrays) and an abstract batch, then lowers and compiles
`steps.make_train_step` and `steps.make_eval_step` for those devices
(attention's "auto" follows them: `attention.compiling_for`). It reads back:

  * memory per device (`compiled.memory_analysis()`): arguments + outputs -
    donated aliases + temporaries + generated code, against what a step may
    use (TPU: HBM; GPU: the fraction JAX preallocates). On GPU an over-size
    step still compiles, so the fit is decided here;
  * the optimized HLO's kernels (`kernel_report`): int8 GEMMs (s8 x s8 ->
    s32 dots, inside Triton GEMM fusions on GPU, or cuBLASLt custom calls),
    bf16 dots, every forward BitLinear that misses the int8 path when
    `model.bitlinear_matmul="int8"`, and cuDNN fused attention forward and
    backward (or why the step has XLA's attention);
  * FLOPs per device per step: the matmuls' and cuDNN attention's FLOPs
    times how often one step runs them (`hlo.multiplicities`: a scanned
    layer body counts n_layers times, from XLA's `known_trip_count` or the
    loop condition's bound), because `cost_analysis()["flops"]` counts each
    loop body once (and is None on GPU);
  * a step time, an estimate: XLA's TPU cost model
    (`cost_analysis()["optimal_seconds"]`) scaled by corrected / XLA FLOPs
    where libtpu gives one, else a roofline (`roofline`: FLOPs at the dense
    peaks vs bytes moved at the memory bandwidth). The MFU it implies is
    model FLOPs (`throughput.flops_per_token`, PaLM's 6N + 12 L d T) per
    device / (step seconds x the device's dense bf16 peak).

Errors a user must see before launch (a mesh that does not divide the
devices, a batch that does not split over the data axis, cuDNN attention
where it cannot run, a step that does not fit) are raised as `ConfigError`
/ `CompileError` with one line naming the config key and the fix.
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
from bitnet_jax.aot import hlo, targets
from bitnet_jax.config import ConfigError
from bitnet_jax.data.batch import Batch
from bitnet_jax.distributed import sharding
from bitnet_jax.metrics import throughput
from bitnet_jax.model import attention
from bitnet_jax.model.layers import head_dim
from bitnet_jax.optim import optimizer
from bitnet_jax.training import objectives, steps, train_state

HEADROOM = 0.10  # `find_batch` keeps this fraction of usable memory free


class CompileError(RuntimeError):
  """XLA refused to compile the step (out of memory or an unsupported op);
  the message is one line naming the config keys to change."""


class OutOfMemoryError(CompileError):
  """The step does not fit in a TPU chip's HBM (XLA's RESOURCE_EXHAUSTED;
  XLA's GPU compiler compiles an over-size step, `fits` says so)."""


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
  """XLA's cost model: FLOPs (loop bodies once) and the TPU's
  `optimal_seconds`; zeros where there is none (GPU: `cost_analysis()` is
  None)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  cost = cost or {}
  return {"xla_flops": float(cost.get("flops", 0.0)),
          "optimal_seconds": float(cost.get("optimal_seconds", 0.0))}


_OUT_OF_MEMORY = re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm")


# XLA's GPU compiler without a GPU does not autotune: for some GEMM shapes
# (the 3B config's [16384, 3200] dots) its default Triton tiling fails
_NO_TRITON_TILING = "Couldn't find output tile sizes"
NO_TRITON_NOTE = (
    "compiled with cuBLAS GEMMs (xla_gpu_enable_triton_gemm=false): XLA's "
    "Triton GEMM tiling failed without a GPU to autotune on; on a GPU the "
    "autotuner picks the tiles (Triton or cuBLAS)")


def _compile(lowered, what: str, target: targets.Target):
  """`lowered.compile()`, XLA's failures as one-line `CompileError`s.

  Returns:
    (compiled, note): note is "" or `NO_TRITON_NOTE` when the GPU step was
    compiled again without Triton GEMMs after XLA's deviceless Triton
    tiling failed.
  """
  try:
    return lowered.compile(), ""
  except Exception as e:  # XlaRuntimeError and friends: classify by text
    text = str(e)
    if target.platform == "gpu" and _NO_TRITON_TILING in text:
      try:
        return lowered.compile(compiler_options={
            "xla_gpu_enable_triton_gemm": False}), NO_TRITON_NOTE
      except Exception as again:  # noqa: BLE001  (classified below)
        text = str(again)
    if "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text:
      used = _OUT_OF_MEMORY.search(text)
      amount = (f" ({used.group(1)}{used.group(2)} of {used.group(3)}"
                f"{used.group(4)} HBM)" if used else "")
      raise OutOfMemoryError(
          f"the {what} step does not fit in a {target.devices[0].device_kind}"
          f" device's memory{amount} on {target.name}: lower "
          "config.train.batch_size or raise config.train.grad_accum_steps, "
          "set config.model.remat_policy=full, or shard over more devices "
          "(config.mesh.fsdp=-1); --find_batch searches for a batch that "
          "fits") from None
    first = next((line for line in text.splitlines() if line.strip()), text)
    raise CompileError(f"XLA cannot compile the {what} step for "
                       f"{target.name}: {first[:400]}") from None


def check(config: ml_collections.ConfigDict, platform: str) -> None:
  """Config checks of `main`'s start-up plus the target's own.

  Raises:
    ConfigError: `config.validate`'s errors; `attention.check_cudnn`'s
      (cuDNN asked for on a TPU, or on a GPU with shapes it cannot run).
  """
  config_lib.validate(config)
  attention.check_cudnn(config.model, config.train.seq_len,
                        config.data.packing == "document", platform)


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
      "int8_cublas_calls": sum(m.is_int8 and m.kind == "cublas"
                               for m in found),
      "int8_fused_dots": sum(m.is_int8 and m.kind == "dot" for m in found),
      "bf16_dots": sum(m.lhs_dtype == m.rhs_dtype == "bf16" for m in found),
      "other_dots": sum(not m.is_int8 and not m.lhs_dtype == m.rhs_dtype
                        == "bf16" for m in found),
      "bitlinear_forward_executions": sum(m.count for m in forward),
      "bitlinear_not_int8": [
          {"source": m.source, "dtypes": dtype_pair(m), "op_name": m.op_name,
           "why": "the operands reach the dot as " + dtype_pair(m)
                  + ", not int8 codes"} for m in missing],
      "int8_flops_per_chip": sum(m.flops * m.count for m in found
                                 if m.is_int8),
      "flops_per_chip": sum(m.flops * m.count for m in found)}


def _attention_report(fused: list[hlo.FusedAttention],
                      config: ml_collections.ConfigDict,
                      platform: str) -> dict:
  """Which attention the step holds: cuDNN's fused kernel (forward and
  backward executions per step) or XLA's, and why not cuDNN."""
  forward = sum(a.count for a in fused if not a.backward)
  backward = sum(a.count for a in fused if a.backward)
  m = config.model
  why = ""
  if not forward:
    if platform != "gpu":
      why = f"cuDNN is NVIDIA's kernel; this is a {platform.upper()} step"
    elif m.dropout_rate > 0:
      why = "model.dropout_rate > 0 trains with the written-out attention"
    elif m.attention_implementation == "xla":
      why = "model.attention_implementation=xla"
    else:
      why = attention.cudnn_unsupported(
          jnp.dtype(m.dtype), head_dim(m), config.train.seq_len,
          config.data.packing == "document", platform) or "unknown"
  return {"attention_kernel": "cudnn" if forward else "xla",
          "cudnn_attention_forward": forward,
          "cudnn_attention_backward": backward,
          "cudnn_attention_targets": sorted({a.target for a in fused}),
          "attention_flops_per_chip": sum(a.flops * a.count for a in fused),
          "attention_why_not_cudnn": why}


def kernels_summary(report: dict) -> str:
  """One line: the attention and BitLinear kernels a compiled step holds
  (what `main` logs at start on a GPU, and the report's "kernels" row)."""
  if report["attention_kernel"] == "cudnn":
    attention_text = (f"cuDNN fused attention (forward x"
                      f"{report['cudnn_attention_forward']}, backward x"
                      f"{report['cudnn_attention_backward']} per step)")
  else:
    attention_text = (f"XLA attention ({report['attention_why_not_cudnn']})")
  if report["bitlinear_matmul"] == "int8":
    forms = []
    if report["int8_fused_dots"]:
      forms.append(f"{report['int8_fused_dots']} int8 dots in fusions")
    if report["int8_cublas_calls"]:
      forms.append(f"{report['int8_cublas_calls']} cuBLASLt int8 calls")
    linear = (f"BitLinear int8 GEMMs ({', '.join(forms) or 'none'}; "
              f"{report['int8_dot_executions']} executions per step"
              + (f"; {len(report['bitlinear_not_int8'])} forward BitLinear "
                 "matmuls NOT int8" if report["bitlinear_not_int8"] else "")
              + ")")
  else:
    linear = f"BitLinear {report['bitlinear_matmul']} (no int8 GEMMs asked)"
  return f"{attention_text}; {linear}"


def kernel_report(compiled_text: str, config: ml_collections.ConfigDict,
                  platform: str) -> dict:
  """The kernels of a compiled step's optimized HLO text: matmuls
  (`_matmul_report`), attention (`_attention_report`), bytes moved
  (`hlo.kernel_bytes`) and the `kernels` line (`kernels_summary`)."""
  m = config.model
  bitlinear_matmul = (m.bitlinear_matmul if m.quantization == "ternary"
                      else "none")
  report = {"bitlinear_matmul": bitlinear_matmul,
            **_matmul_report(hlo.matmuls(compiled_text),
                             bitlinear_matmul == "int8"),
            **_attention_report(hlo.fused_attention(compiled_text), config,
                                platform),
            "bytes_per_chip": hlo.kernel_bytes(compiled_text)}
  report["kernels"] = kernels_summary(report)
  return report


def describe_compiled(compiled_text: str,
                      config: ml_collections.ConfigDict) -> str:
  """`kernels_summary` of a compiled train step's optimized HLO text on
  this host's devices (what `main` logs at start on a GPU or TPU)."""
  return kernels_summary(kernel_report(compiled_text, config,
                                       jax.default_backend()))


def roofline(flops: float, int8_ops: float, moved_bytes: float,
             target: targets.Target) -> dict:
  """A roofline estimate of one step per device (Williams et al., CACM
  2009): the larger of the matmul time at the device's dense peaks (int8
  at the int8 peak, the rest at bf16's) and the bytes moved over memory
  bandwidth. An estimate: no kernel reaches its peak, and GPU compiles on a
  CPU host are not autotuned."""
  compute = ((flops - int8_ops) / target.peak_flops
             + int8_ops / target.peak_int8_ops)
  memory = moved_bytes / target.memory_bandwidth
  return {"roofline_compute_seconds": compute,
          "roofline_memory_seconds": memory,
          "roofline_step_seconds": max(compute, memory),
          "roofline_bound": "compute" if compute >= memory else "memory"}


def compile_report(config: ml_collections.ConfigDict, topology: str,
                   num_slices: int = 1, eval_step: bool = True) -> dict:
  """Compiles `main`'s train (and eval) step for a TPU slice or GPU hosts;
  the report.

  Args:
    config: a run config (validated here, as `main` does).
    topology: a Cloud TPU accelerator type ("v5p-8", "v5litepod-16"), a TPU
      topology ("v5p:2x2x2") or a GPU target ("h100-8", "h100-2x8"); see
      `targets.resolve`.
    num_slices: TPU slices joined over DCN (multi-slice data parallelism).
    eval_step: also compile the eval step (its memory is reported).

  Returns:
    A JSON-ready dict: topology, platform, chips (devices), hosts, mesh,
    parameters, batch_size, seq_len, tokens_per_step, quantization,
    bitlinear_matmul, memory parts in bytes per device (argument / output /
    alias / temp / code, per_chip_bytes), hbm_bytes (device memory),
    memory_limit_bytes and memory_limit_why (what a step may use),
    headroom (fraction of the limit left), fits, compile_seconds,
    compile_note ("" or `NO_TRITON_NOTE`),
    `kernel_report`'s entries (int8 dots in both forms, cuDNN attention
    forward / backward, bytes_per_chip, kernels), flops_per_chip (matmul
    and fused-attention FLOP per device per step, loops x trip count),
    xla_flops, model_flops_per_chip (6N + 12LdT x tokens / devices),
    optimal_seconds (XLA's TPU cost model; 0 where none), the roofline
    (`roofline`), estimated_step_seconds (the cost model's, scaled to the
    loop-corrected FLOPs, where it gives one; else the roofline's),
    step_estimate (which), mfu, and eval_per_chip_bytes.

  Raises:
    ConfigError: a config key that cannot work on this target.
    CompileError: XLA's refusal (e.g. out of memory), one line.
    ValueError: an unknown topology (listing the known ones).
    RuntimeError: libtpu or JAX's CUDA plugin is not installed.
  """
  target = targets.resolve(topology, num_slices)
  check(config, target.platform)
  devices = target.devices
  mesh = make_mesh(config, devices, num_slices)
  batch = abstract_batch(config, mesh)
  tx = optimizer.make_optimizer(config)
  graphdef, state, shardings = train_state.create_train_state(
      config, mesh, tx, initialize=False)

  start = time.perf_counter()
  lowered = steps.make_train_step(
      config, graphdef, tx, shardings, mesh,
      objectives.make_objective(config, mesh, None)).lower(state, batch)
  compiled, compile_note = _compile(lowered, "train", target)
  compile_seconds = time.perf_counter() - start

  m, t = config.model, config.train
  chips = len(devices)
  report = {
      "topology": topology, "topology_shape": target.description,
      "platform": target.platform,
      "num_slices": num_slices, "chips": chips, "hosts": target.hosts,
      "device_kind": devices[0].device_kind,
      "mesh": dict(mesh.shape),
      "parameters": int(sum(np.prod(x.shape) for x in
                            jax.tree.leaves(state.params))),
      "batch_size": t.batch_size, "seq_len": t.seq_len,
      "grad_accum_steps": t.grad_accum_steps,
      "tokens_per_step": t.batch_size * t.seq_len,
      "quantization": m.quantization,
      "dtype": m.dtype, "remat_policy": m.remat_policy,
      "loss_chunk_size": t.loss_chunk_size,
      "mu_dtype": config.optimizer.mu_dtype,
      **_memory(compiled), "hbm_bytes": target.memory_bytes,
      "memory_limit_bytes": target.memory_limit_bytes,
      "memory_limit_why": target.memory_limit_why,
      "compile_seconds": round(compile_seconds, 2),
      "compile_note": compile_note,
      **kernel_report(compiled.as_text(), config, target.platform),
      **_cost(compiled),
      "flops_method": "HLO matmuls and cuDNN attention x loop trip counts "
                      "(hlo.matmuls, hlo.fused_attention)"}
  report["flops_per_chip"] += report["attention_flops_per_chip"]
  report["headroom"] = 1.0 - (report["per_chip_bytes"]
                              / report["memory_limit_bytes"])
  report["fits"] = report["per_chip_bytes"] <= report["memory_limit_bytes"]
  model_flops = throughput.flops_per_token(
      throughput.matmul_params(state.params, m), m.n_layers, m.d_model,
      t.seq_len) * report["tokens_per_step"] / chips
  report["model_flops_per_chip"] = model_flops
  report.update(roofline(report["flops_per_chip"],
                         report["int8_flops_per_chip"],
                         report["bytes_per_chip"], target))
  scale = (report["flops_per_chip"] / report["xla_flops"]
           if report["xla_flops"] else 1.0)
  # libtpu's cost model gives no usable figure (<= 0) for some slices
  # (v5e, v6e in libtpu 0.10), and GPUs have none: then the roofline
  if report["optimal_seconds"] > 0:
    seconds = report["optimal_seconds"] * scale
    report["step_estimate"] = "XLA's TPU cost model (an estimate)"
  else:
    seconds = report["roofline_step_seconds"]
    report["step_estimate"] = (f"roofline, {report['roofline_bound']}-bound "
                               "(an estimate)")
  report["estimated_step_seconds"] = seconds
  report["mfu"] = (model_flops / (seconds * target.peak_flops)
                   if seconds else None)
  if eval_step:
    lowered = steps.make_eval_step(config, graphdef, shardings.params,
                                   mesh, objectives.NextToken(t)).lower(
        state.params, batch, jax.ShapeDtypeStruct((), jnp.int32))
    report["eval_per_chip_bytes"] = _memory(
        _compile(lowered, "eval", target)[0])["per_chip_bytes"]
  return report
