r"""Command-line entry point: flags -> `train_and_evaluate(config, workdir)`.

  python -m bitnet_jax.main --config=configs/d20.py:cpu --workdir=runs/d20_cpu \
      --config.train.steps=500

Running the same command again resumes from the latest checkpoint in workdir.
"""

import functools
import os

from absl import app, flags
from ml_collections import config_flags

from bitnet_jax.aot import compile_step
from bitnet_jax.config import command_line
from bitnet_jax.distributed import sharding
from bitnet_jax.metrics import RunFileError, health
from bitnet_jax.runs import checkpoint, lock
from bitnet_jax.training import loop

# Failures with a message that says what to do: one line, exit status 2
# (`command_line.run`; ConfigError and OSError are refused by every command).
# FloatingPointError: the divergence guard; HealthAlarmError: an alarm with
# health.halt_on_alarm (both after saving what can be resumed).
REFUSALS = (lock.WorkdirLockedError, checkpoint.CheckpointMismatchError,
            checkpoint.CheckpointSaveError, checkpoint.UnrestorableRunError,
            RunFileError, FloatingPointError, health.HealthAlarmError)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A Python config file with get_config(), e.g. "
    "configs/d20.py or configs/d20.py:cpu; override fields with "
    "--config.train.steps=500.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints and metrics; default "
    "runs/<config name>[_<variant>].")


def default_workdir(config_argument: str) -> str:
  """runs/d20_cpu for "configs/d20.py:cpu", runs/tiny for "configs/tiny.py"."""
  path, _, variant = config_argument.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("runs", f"{name}_{variant}" if variant else name)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  sharding.initialize_distributed(config)
  workdir = _WORKDIR.value or default_workdir(flags.FLAGS["config"].serialize()
                                              .split("=", 1)[1])
  loop.train_and_evaluate(config, workdir, describe_step=functools.partial(
      compile_step.describe_compiled, config=config))


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  command_line.run(main, refusals=REFUSALS)
