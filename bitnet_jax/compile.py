r"""Ahead-of-time compile for a TPU slice or NVIDIA GPU hosts, on a CPU host
(MaxText's train_compile): memory per device, FITS / DOES NOT FIT, which
kernels the step holds (cuDNN attention, int8 GEMMs), FLOPs and an
estimated step time, before the first accelerator hour.

  python -m bitnet_jax.compile --config=configs/bitnet_700m.py \
      --topology=v5p-8 [--num_slices=1] [--config.train.batch_size=64] \
      [--report=700m_v5p8.json] [--find_batch [--remat_policies=none,full]]
  python -m bitnet_jax.compile --config=configs/bitnet_2b4t.py \
      --topology=h100-1        # also h100-8, h200-8, a100-80gb-8, h100-2x8

TPU needs libtpu (`pip install 'jax[tpu]'`); GPU needs JAX's CUDA plugin,
cuDNN and ptxas (`pip install -e '.[gpu_compile]'`); neither needs the
accelerator. See `bitnet_jax.aot`.
"""

import json
import os

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from bitnet_jax.aot import compile_step, find_batch, targets
from bitnet_jax.aot.report import find_batch_rows, format_table
from bitnet_jax.config import command_line

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A Python config file, e.g. configs/bitnet_700m.py; "
    "override fields with --config.train.batch_size=64.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "Cloud TPU accelerator type (v4-8, v5litepod-16, v5e-8, "
    "v5p-64, v6e-8, ...), TPU topology (v5p:2x2x2), or GPU hosts "
    "<gpu>-<gpus> / <gpu>-<hosts>x<gpus> (h100-1, h100-8, h200-8, "
    "a100-80gb-8, h100-2x8).")
_NUM_SLICES = flags.DEFINE_integer(
    "num_slices", 1, "Slices joined over DCN; the data axis spans them.")
_REPORT = flags.DEFINE_string("report", None, "Also write the report as JSON.")
_FIND_BATCH = flags.DEFINE_bool(
    "find_batch", False, "Also search, per remat policy, the largest "
    "train.batch_size that fits with >= 10% of usable memory free, and the "
    "best (policy, batch) by estimated tokens/s (a few compiles each).")
_POLICIES = flags.DEFINE_list(
    "remat_policies", list(find_batch.POLICIES),
    "The model.remat_policy values --find_batch searches.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _TOPOLOGY.value:
    raise app.UsageError("--topology is required, e.g. --topology=v5p-8 or "
                         f"h100-8; known: {', '.join(targets.known_names())}")
  unknown = set(_POLICIES.value) - set(find_batch.POLICIES)
  if unknown:
    raise app.UsageError(f"--remat_policies: unknown {sorted(unknown)}; use "
                         f"some of {', '.join(find_batch.POLICIES)}")
  config = _CONFIG.value
  try:
    report = compile_step.compile_report(config, _TOPOLOGY.value,
                                         _NUM_SLICES.value)
  except compile_step.OutOfMemoryError as e:
    if not _FIND_BATCH.value:
      raise
    absl_logging.error("CompileError: %s", e)  # then search what fits
    report = {"topology": _TOPOLOGY.value, "fits": False, "error": str(e)}
  if _FIND_BATCH.value:
    report["find_batch"] = find_batch.find_batch(
        config, _TOPOLOGY.value, _NUM_SLICES.value, _POLICIES.value)
  if "error" not in report:
    print(format_table(report))
  else:
    rows = find_batch_rows(report["find_batch"])
    width = max(len(name) for name, _ in rows)
    print("\n".join(f"{name:<{width}}  {value}" for name, value in rows))
  if _REPORT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_REPORT.value)),
                exist_ok=True)
    with open(_REPORT.value, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  # ValueError: ConfigError and bad flag values; RuntimeError: libtpu's or
  # the CUDA plugin's.
  command_line.run(main, refusals=(ValueError, compile_step.CompileError,
                                   RuntimeError))
