r"""Moves BitNet models between bitnet_jax runs, Hugging Face and GGUF.

  # an HF BitNet folder (latent bf16 or packed 2-bit) -> a run to fine-tune
  python -m bitnet_jax.convert import-hf --hf_dir=DIR --workdir=RUN \
      [--config=configs/bitnet_2b4t.py]
  # a full-precision Llama / Qwen2 / Qwen3 folder -> a ternary run with
  # inserted sub-norms, or (none, none) the source model itself
  python -m bitnet_jax.convert import-hf --hf_dir=DIR --workdir=RUN \
      [--quantization=ternary|none --sub_norms=insert|none]
  # a run -> transformers (latent weights, or packed 2-bit) or GGUF
  python -m bitnet_jax.convert export-hf --workdir=RUN --out=DIR \
      --format=bf16|packed|gguf [--step=N --dtype=bfloat16|float32]

Import writes RUN/config.py (the model from the HF config.json, the rest from
--config or the fine-tuning defaults), RUN/tokenizer.json, RUN/hf_source/
(the HF config and tokenizer files, reused on export) and a weights-only
checkpoint RUN/checkpoints/0: `python -m bitnet_jax.main
--config=RUN/config.py --workdir=RUN` fine-tunes it. Nothing is downloaded.
"""

from __future__ import annotations

from absl import app, flags

from bitnet_jax import config as config_lib
from bitnet_jax.config import command_line
from bitnet_jax.interop import exporter, gguf, hf, hf_sources, importer
from bitnet_jax.runs import checkpoint

FLAGS = flags.FLAGS


def main(argv):
  commands = {"import-hf", "export-hf"}
  if len(argv) != 2 or argv[1] not in commands:
    raise app.UsageError("usage: python -m bitnet_jax.convert "
                         "import-hf|export-hf --flags (see --help)")
  if not FLAGS.workdir:
    raise hf.ConversionError("--workdir is required")
  if argv[1] == "import-hf":
    if not FLAGS.hf_dir:
      raise hf.ConversionError("--hf_dir is required")
    written = importer.import_hf(FLAGS.hf_dir, FLAGS.workdir,
                                 FLAGS.config,
                                 quantization=FLAGS.quantization,
                                 sub_norms=FLAGS.sub_norms)
    print(f"wrote {written}; fine-tune with: python -m bitnet_jax.main "
          f"--config={written} --workdir={FLAGS.workdir}")
  else:
    if not FLAGS.out:
      raise hf.ConversionError("--out is required")
    print(exporter.export_hf(FLAGS.workdir, FLAGS.out, FLAGS.format,
                             step=FLAGS.step, dtype=FLAGS.dtype,
                             linear_class=FLAGS.linear_class,
                             ternary_type=FLAGS.ternary_type))


def _define_flags() -> None:
  """Defines the command-line flags (only when run as a program)."""
  flags.DEFINE_string("hf_dir", None, "import-hf: a local HF folder.")
  flags.DEFINE_string("workdir", None, "The run directory.")
  flags.DEFINE_string("out", None, "export-hf: the output folder.")
  formats = exporter.EXPORT_FORMATS
  flags.DEFINE_enum(
      "format", "bf16", list(formats), "export-hf: " + ", ".join(
          f.summary for f in formats.values()) + ".")
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"],
                    "export-hf: dtype of the non-packed tensors.")
  flags.DEFINE_enum(
      "linear_class", None, list(hf.LINEAR_CLASSES), "export-hf "
      "--format=packed: weight_scale = 1/gamma (bitlinear) or gamma "
      "(autobitlinear); default: an imported packed model's, else bitlinear.")
  flags.DEFINE_enum("ternary_type", "TQ2_0",
                    list(gguf.TERNARY_TYPES), "GGUF ternary type.")
  flags.DEFINE_integer("step", None, "export-hf: checkpoint step.")
  flags.DEFINE_enum("quantization", "", ["", *config_lib.QUANTIZATIONS],
                    "import-hf of a full-precision model: 'ternary' "
                    "(default, the conversion) or 'none' (a teacher).")
  flags.DEFINE_enum("sub_norms", "", ["", *hf_sources.SUB_NORMS],
                    "import-hf of a full-precision model: 'insert' (default, "
                    "gain-1 SubLN) or 'none' (the source block).")
  flags.DEFINE_string(
      "config", "", "import-hf: a config file for everything but the model "
      "(its model fields must match the HF config).")


if __name__ == "__main__":
  _define_flags()
  # ValueError: ConfigError, hf.ConversionError and malformed HF files.
  command_line.run(main, refusals=(ValueError,
                                   checkpoint.CheckpointMismatchError))
