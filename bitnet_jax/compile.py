r"""Ahead-of-time compile for a TPU slice, on a CPU host (MaxText's
train_compile): memory per chip, FITS / DOES NOT FIT, int8 matmuls, FLOPs
and the cost model's step time, before the first TPU hour.

  python -m bitnet_jax.compile --config=configs/bitnet_700m.py \
      --topology=v5p-8 [--num_slices=1] [--config.train.batch_size=64] \
      [--report=700m_v5p8.json] [--find_batch]

Needs libtpu (`pip install 'jax[tpu]'`); no TPU. See `bitnet_jax.aot`.
"""

import json
import os

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from bitnet_jax.aot import compile_step, find_batch, tpu
from bitnet_jax.aot.report import format_table
from bitnet_jax.config import command_line

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A Python config file, e.g. configs/bitnet_700m.py; "
    "override fields with --config.train.batch_size=64.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "Cloud TPU accelerator type (v4-8, v5litepod-16, v5e-8, "
    "v5p-64, v6e-8, ...) or topology (v5p:2x2x2).")
_NUM_SLICES = flags.DEFINE_integer(
    "num_slices", 1, "Slices joined over DCN; the data axis spans them.")
_REPORT = flags.DEFINE_string("report", None, "Also write the report as JSON.")
_FIND_BATCH = flags.DEFINE_bool(
    "find_batch", False, "Also search the largest train.batch_size that fits "
    "with >= 10% HBM headroom (a few more compiles).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _TOPOLOGY.value:
    raise app.UsageError("--topology is required, e.g. --topology=v5p-8; "
                         f"known: {', '.join(tpu.known_names())}")
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
    report["find_batch"] = find_batch.find_batch(config, _TOPOLOGY.value,
                                                 _NUM_SLICES.value)
  print(format_table(report) if "error" not in report else
        json.dumps(report["find_batch"], indent=1))
  if _REPORT.value:
    os.makedirs(os.path.dirname(os.path.abspath(_REPORT.value)),
                exist_ok=True)
    with open(_REPORT.value, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  # ValueError: ConfigError and bad flag values; RuntimeError: libtpu's.
  command_line.run(main, refusals=(ValueError, compile_step.CompileError,
                                   RuntimeError))
