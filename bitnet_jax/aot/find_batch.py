"""The largest batch that fits a TPU slice or GPU hosts, per remat policy,
from a few ahead-of-time compiles; and the best (policy, batch).

Per-device memory of a train step is close to affine in the micro-batch
(parameters, optimizer state and code are fixed; activations and the batch
grow with it), so two compiles, at one and two sequences per data-parallel
device, give a line; the largest micro-batch below (1 - `HEADROOM`) of the
device's usable memory on that line is then compiled to verify, stepping
down while it does not fit (`largest_batch`). MaxText's estimator does the
same search for TPU. `find_batch` runs it for each remat policy (less
recomputation first) and picks the policy and batch with the highest
estimated tokens/s (the compile report's step estimate; the larger batch
where there is none). The config's own `train.batch_size` is then reached
with the fewest gradient-accumulation steps whose micro-batch fits
(`train.grad_accum_steps`).
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections

from bitnet_jax.aot import compile_step, targets
from bitnet_jax.config.choices import RematPolicy

_MAX_VERIFY = 4  # compiles spent stepping down from the line's prediction
# less recomputation (faster steps, more memory) first
POLICIES = (RematPolicy.NONE.value, RematPolicy.SAVE_QKV_OUT.value,
            RematPolicy.DOTS_SAVEABLE.value, RematPolicy.FULL.value)


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
  limit = (1.0 - compile_step.HEADROOM) * report["memory_limit_bytes"]
  return report["per_chip_bytes"] <= limit, report


def largest_batch(config: ml_collections.ConfigDict, topology: str,
                  shards: int, num_slices: int = 1) -> dict | None:
  """The largest micro-batch (a multiple of `shards`, at most the config's
  `train.batch_size`) that fits with `HEADROOM` free under the config's
  remat policy; None if one sequence per device does not.

  Returns:
    {"largest_batch_size", "per_chip_bytes", "headroom",
    "estimated_step_seconds" (None if the report has none),
    "tokens_per_sec" (estimated, or None), "compiles"} or None.
  """
  compiles = 0

  def fits(batch):
    nonlocal compiles
    compiles += 1
    return _fits(config, topology, num_slices, batch)

  ok, small = fits(shards)
  if not ok:
    return None
  target = config.train.batch_size
  best, best_report = shards, small
  if target > shards:
    ok, double = fits(2 * shards)
    if ok:
      best, best_report = 2 * shards, double
      slope = max(double["per_chip_bytes"] - small["per_chip_bytes"], 1) / shards
      limit = (1.0 - compile_step.HEADROOM) * small["memory_limit_bytes"]
      predicted = shards + (limit - small["per_chip_bytes"]) / slope
      candidate = min(target, int(predicted) // shards * shards)
      for _ in range(_MAX_VERIFY):
        if candidate <= best:
          break
        ok, report = fits(candidate)
        if ok:
          best, best_report = candidate, report
          break
        candidate = max(best, int(candidate * 0.9) // shards * shards)
  seconds = best_report.get("estimated_step_seconds")
  return {"largest_batch_size": best,
          "per_chip_bytes": best_report["per_chip_bytes"],
          "headroom": best_report["headroom"],
          "estimated_step_seconds": seconds,
          "tokens_per_sec": (best * config.train.seq_len / seconds
                             if seconds else None),
          "compiles": compiles}


def find_batch(config: ml_collections.ConfigDict, topology: str,
               num_slices: int = 1,
               policies: Sequence[str] = POLICIES) -> dict:
  """The largest micro-batch per remat policy, and the best of them.

  Args:
    config: a run config; `train.batch_size` is the target global batch.
    topology: as `compile_step.compile_report`.
    num_slices: TPU slices joined over DCN.
    policies: the `model.remat_policy` values to search.

  Returns:
    {"policies": {policy: `largest_batch`'s dict, or {"fits": False}},
    and for the best policy (highest estimated tokens/s, else the largest
    batch, else the earlier policy): "remat_policy", "largest_batch_size",
    "grad_accum_steps" (accumulation steps that run the config's batch_size
    with micro-batches of at most that size; None if none divides),
    "per_chip_bytes", "headroom", "estimated_step_seconds",
    "tokens_per_sec", and "compiles" in all}.

  Raises:
    compile_step.CompileError: one sequence per device fits under no
      policy (names mesh.fsdp and the model size).
    ConfigError, ValueError, RuntimeError: as `compile_report`.
  """
  target = targets.resolve(topology, num_slices)
  compile_step.check(config, target.platform)
  mesh = compile_step.make_mesh(config, target.devices, num_slices)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  found: dict[str, dict] = {}
  for policy in policies:
    result = largest_batch(_with(config, model__remat_policy=policy),
                           topology, shards, num_slices)
    found[policy] = result or {"fits": False, "compiles": 1}
  fitting = [(p, r) for p, r in found.items() if "largest_batch_size" in r]
  if not fitting:
    raise compile_step.CompileError(
        f"one sequence of {config.train.seq_len} tokens per data-parallel "
        f"device does not fit {topology} under any remat policy searched "
        f"({', '.join(policies)}; config.model.remat_policy=full keeps the "
        "least); shard the parameters over more devices (config.mesh.fsdp=-1, "
        "config.mesh.data=1), lower config.train.seq_len, or use a larger "
        "slice")
  policy, best = max(
      fitting, key=lambda pr: (pr[1]["tokens_per_sec"] or 0.0,
                               pr[1]["largest_batch_size"],
                               -policies.index(pr[0])))
  batch = config.train.batch_size
  largest = best["largest_batch_size"]
  accum = next((k for k in range(1, batch + 1)
                if batch % k == 0 and batch // k <= largest
                and (batch // k) % shards == 0), None) \
      if batch % shards == 0 else None
  return {"policies": found, "remat_policy": policy,
          "largest_batch_size": largest, "grad_accum_steps": accum,
          "per_chip_bytes": best["per_chip_bytes"],
          "headroom": best["headroom"],
          "estimated_step_seconds": best["estimated_step_seconds"],
          "tokens_per_sec": best["tokens_per_sec"],
          "compiles": sum(r["compiles"] for r in found.values())}
