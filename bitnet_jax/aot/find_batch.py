"""The largest batch that fits a TPU slice, from a few ahead-of-time compiles.

Per-chip memory of a train step is close to affine in the micro-batch
(parameters, optimizer state and code are fixed; activations and the
batch grow with it), so two compiles, at one and two sequences per
data-parallel device, give a line; the largest micro-batch below
(1 - `compile_step.HEADROOM`) of HBM on that line is then compiled to
verify, stepping down while it does not fit. If even one sequence per
device does not fit, `model.remat_policy="full"` is tried. The config's
own `train.batch_size` is then reached with the fewest gradient-accumulation
steps whose micro-batch fits (`train.grad_accum_steps`).
"""

from __future__ import annotations

import ml_collections

from bitnet_jax.aot import compile_step, tpu

_MAX_VERIFY = 4  # compiles spent stepping down from the line's prediction


def _with(config: ml_collections.ConfigDict, **changes) -> ml_collections.ConfigDict:
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for key, value in changes.items():
      section, name = key.split("__")
      config[section][name] = value
  return config


def _fits(config, topology, num_slices, batch_size) -> tuple[bool, dict | None]:
  trial = _with(config, train__batch_size=batch_size, train__grad_accum_steps=1)
  try:
    report = compile_step.compile_report(trial, topology, num_slices,
                                         eval_step=False)
  except compile_step.OutOfMemoryError:
    return False, None
  limit = (1.0 - compile_step.HEADROOM) * report["hbm_bytes"]
  return report["per_chip_bytes"] <= limit, report


def find_batch(config: ml_collections.ConfigDict, topology: str,
               num_slices: int = 1) -> dict:
  """The largest micro-batch that fits with >= 10% HBM headroom.

  Args:
    config: a run config; `train.batch_size` is the target global batch.
    topology: as `compile_step.compile_report`.
    num_slices: slices joined over DCN.

  Returns:
    {"largest_batch_size": sequences per step without accumulation
    (at most the config's batch_size), "remat_policy": the policy it
    needs, "grad_accum_steps": accumulation steps that run the config's
    batch_size with micro-batches of at most that size, "per_chip_bytes"
    and "headroom" of the largest batch's compile, "compiles": how many
    compiles the search took}.

  Raises:
    compile_step.CompileError: one sequence per device does not fit even
      with full remat (names mesh.fsdp and the model size).
    ConfigError, ValueError, RuntimeError: as `compile_report`.
  """
  compile_step.check_for_tpu(config)
  devices = tpu.devices(tpu.resolve(topology), num_slices)
  mesh = compile_step.make_mesh(config, devices, num_slices)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  target = config.train.batch_size
  compiles = 0

  def fits(candidate_config, batch):
    nonlocal compiles
    compiles += 1
    return _fits(candidate_config, topology, num_slices, batch)

  policies = [config.model.remat_policy] + (
      ["full"] if config.model.remat_policy != "full" else [])
  for policy in policies:
    trial = _with(config, model__remat_policy=policy)
    ok, small = fits(trial, shards)
    if ok:
      break
  else:
    raise compile_step.CompileError(
        f"one sequence of {config.train.seq_len} tokens per data-parallel "
        f"device does not fit {topology} even with "
        "config.model.remat_policy=full; shard the parameters over more "
        "chips (config.mesh.fsdp=-1, config.mesh.data=1), lower "
        "config.train.seq_len, or use a larger slice")

  best, best_report = shards, small
  if target > shards:
    ok, double = fits(trial, 2 * shards)
    if ok:
      best, best_report = 2 * shards, double
      slope = max(double["per_chip_bytes"] - small["per_chip_bytes"], 1) / shards
      limit = (1.0 - compile_step.HEADROOM) * small["hbm_bytes"]
      predicted = shards + (limit - small["per_chip_bytes"]) / slope
      candidate = min(target, int(predicted) // shards * shards)
      for _ in range(_MAX_VERIFY):
        if candidate <= best:
          break
        ok, report = fits(trial, candidate)
        if ok:
          best, best_report = candidate, report
          break
        candidate = max(best, int(candidate * 0.9) // shards * shards)

  accum = next(k for k in range(1, target + 1)
               if target % k == 0 and target // k <= best
               and (target // k) % shards == 0) if target % shards == 0 else None
  return {"largest_batch_size": best, "remat_policy": policy,
          "grad_accum_steps": accum,
          "per_chip_bytes": best_report["per_chip_bytes"],
          "headroom": best_report["headroom"], "compiles": compiles}
