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

import datetime
import json
import os
import shutil
import sys

import ml_collections
import ml_dtypes
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from safetensors.numpy import save_file

from bitnet_jax.runs import checkpoint
from bitnet_jax.interop import gguf
from bitnet_jax.interop import hf
from bitnet_jax.interop import hf_sources
from bitnet_jax.storage import paths
from bitnet_jax.runs import identity
from bitnet_jax.runs import reader
from bitnet_jax import config as config_lib
from bitnet_jax.data.tokenizer import load_tokenizer
from bitnet_jax.model.attention import kv_heads

HF_SOURCE = reader.HF_SOURCE
_HF_FILES = ("config.json", "generation_config.json", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json",
             "chat_template.jinja")


def _read_json(path: str) -> dict:
  try:
    with paths.open_file(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise hf.ConversionError(f"{path} is missing") from e
  except ValueError as e:
    raise hf.ConversionError(f"{path} is not valid JSON: {e}") from e


def _run_config(fields: dict, config_path: str, workdir: str
                ) -> ml_collections.ConfigDict:
  """The fine-tuning config: --config (checked) or the defaults + model."""
  if config_path:
    config = reader.load_config_file(config_path)
    ours = {**config.model, "n_kv_heads": kv_heads(config.model)}
    for key, value in fields.items():
      if ours[key] != value:
        raise hf.ConversionError(
            f"config.model.{key}={config.model[key]!r} in {config_path}, "
            f"but the HF model has {value!r}; fix the config or leave "
            "--config out to take the model from the HF config")
  else:
    config = config_lib.base_config()
    config.model.update(fields)
    config_lib.apply_fine_tuning(config)
  config.data.tokenizer_path = os.path.join(workdir, reader.TOKENIZER_JSON)
  config_lib.validate(config)
  return config


def _config_py(config: ml_collections.ConfigDict, hf_dir: str) -> str:
  """Python source of a config file reproducing `config`."""
  base = _flat(config_lib.base_config())
  lines = [f'"""Fine-tuning config written by `bitnet_jax.convert import-hf`'
           f"\n\nfrom {hf_dir} on {datetime.date.today()}. Set data.dataset "
           'to your data; edit freely.\n"""', "",
           "from bitnet_jax.config import base_config", "", "",
           "def get_config():", '  """The imported model\'s config."""',
           "  c = base_config()"]
  for key, value in _flat(config).items():
    if base.get(key, object()) != value:
      lines.append(f"  c.{key} = {value!r}")
  return "\n".join(lines + ["  return c", ""])


def _flat(config: ml_collections.ConfigDict) -> dict:
  """{"model.d_model": 256, ...}: the config as config.json stores it."""
  return identity.flatten(identity.config_dict(config))


def import_hf(hf_dir: str, workdir: str, config_path: str = "", *,
              quantization: str = "", sub_norms: str = "") -> str:
  """Converts a local HF folder (BitNet, or a full-precision Llama, Qwen2 or
  Qwen3 model, `bitnet_jax.interop.hf_sources`) into a run directory.

  Args:
    hf_dir: the HF folder (config.json, *.safetensors, tokenizer.json).
    workdir: a new or empty local run directory.
    config_path: optional config file for everything but the model.
    quantization, sub_norms: full-precision sources only ('' = ternary,
      insert): see `hf_sources.model_fields`.

  Returns:
    The path of the written `RUN/config.py`.

  Raises:
    ConversionError: unsupported HF config keys, missing or misshapen
      tensors, a missing tokenizer.json, or a non-empty workdir.
  """
  if paths.is_url(workdir):
    raise hf.ConversionError(f"--workdir={workdir!r}: import into a local "
                             "folder, then copy it to the bucket (gcloud "
                             "storage cp -r); training and export read it "
                             "there")
  hf_dir, workdir = os.path.abspath(hf_dir), os.path.abspath(workdir)
  hf_config = _read_json(os.path.join(hf_dir, "config.json"))
  fields = hf_sources.model_fields(hf_config, hf_dir,
                                   quantization=quantization,
                                   sub_norms=sub_norms)
  if os.path.isdir(workdir) and os.listdir(workdir):
    raise hf.ConversionError(f"--workdir={workdir!r} is not empty (a run's "
                             "files would mix with the import's); import "
                             "into a new directory")
  tokenizer_json = os.path.join(hf_dir, "tokenizer.json")
  if not os.path.isfile(tokenizer_json):
    raise hf.ConversionError(f"{tokenizer_json} is missing: import needs the "
                             "model's tokenizer (tokenizer.json)")
  config = _run_config(fields, config_path, workdir)
  tokenizer = load_tokenizer(tokenizer_json)
  config_lib.check_vocab(config, tokenizer.get_vocab_size(), tokenizer_json)
  tensors = hf_sources.insert_sub_norms(
      hf_sources.latent_tensors(hf_sources.read_safetensors(hf_dir),
                                hf_config, hf_dir),
      config.model)
  params = hf.from_hf_tensors(tensors, reader.abstract_params(config.model),
                              hf_dir)
  os.makedirs(os.path.join(workdir, HF_SOURCE), exist_ok=True)
  for name in _HF_FILES:
    if os.path.isfile(os.path.join(hf_dir, name)):
      shutil.copyfile(os.path.join(hf_dir, name),
                      os.path.join(workdir, HF_SOURCE, name))
  shutil.copyfile(tokenizer_json, os.path.join(workdir, reader.TOKENIZER_JSON))
  config_py = os.path.join(workdir, reader.CONFIG_PY)
  with open(config_py, "w", encoding="utf-8") as f:
    f.write(_config_py(config, hf_dir))
  saver = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                  keep=config.train.keep_checkpoints)
  saver.save_weights(0, params, {"tokens_seen": 0, "imported_from": hf_dir})
  saver.close()
  absl_logging.info("imported %s into %s", hf_dir, workdir)
  return config_py


def _write_side_files(workdir: str, out: str, tokenizer, hf_cfg: dict
                      ) -> None:
  """config.json, generation_config.json and the tokenizer files.

  The imported folder's generation_config / tokenizer_config /
  special_tokens_map are reused when RUN/hf_source has them.
  """
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(hf_cfg, f, indent=2)
  shutil.copyfile(reader.tokenizer_path(workdir),
                  os.path.join(out, "tokenizer.json"))
  for name in ("generation_config.json", "tokenizer_config.json",
               "special_tokens_map.json", "chat_template.jinja"):
    source = paths.join(workdir, HF_SOURCE, name)
    if paths.isfile(source):
      with open(os.path.join(out, name), "wb") as f:
        f.write(paths.read_bytes(source))
  eos = hf_cfg["eos_token_id"]
  eos = eos[0] if isinstance(eos, list) else eos
  if not os.path.isfile(os.path.join(out, "generation_config.json")):
    with open(os.path.join(out, "generation_config.json"), "w") as f:
      json.dump({"bos_token_id": hf_cfg["bos_token_id"],
                 "eos_token_id": hf_cfg["eos_token_id"]}, f, indent=2)
  if not os.path.isfile(os.path.join(out, "tokenizer_config.json")):
    token = tokenizer.id_to_token(eos)
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
      json.dump({"tokenizer_class": "PreTrainedTokenizerFast",
                 "bos_token": token, "eos_token": token,
                 "model_max_length": hf_cfg["max_position_embeddings"],
                 "clean_up_tokenization_spaces": False}, f, indent=2)


def _write_weights(out: str, fmt: str, tensors: dict[str, np.ndarray],
                   hf_cfg: dict, dtype: str, linear_class: str,
                   ternary_type: str, workdir: str) -> str:
  """The weight file(s) of one format in `out`; returns what to report."""
  if fmt == "gguf":
    path = os.path.join(out, f"model-{ternary_type}.gguf")
    gguf.write_gguf(
        path, hf_config=hf_cfg, ternary_type=ternary_type,
        tensors={n: t for n, t in tensors.items() if not hf.is_bitlinear(n)},
        ternary={n: hf.ternary_codes(t) for n, t in tensors.items()
                 if hf.is_bitlinear(n)},
        tokenizer_json=reader.tokenizer_path(workdir))
    return path
  store = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
  written = {}
  for name, tensor in tensors.items():
    if fmt == "packed" and hf.is_bitlinear(name):
      codes, gamma = hf.ternary_codes(tensor)
      written[name] = hf.pack_ternary(codes)
      written[name[:-len("weight")] + "weight_scale"] = np.array(
          [hf.scale_from_gamma(gamma, linear_class)]).astype(store)
    else:
      written[name] = tensor.astype(store)
  save_file(written, os.path.join(out, "model.safetensors"),
            metadata={"format": "pt"})
  return out


def export_hf(workdir: str, out: str, fmt: str, *, step: int | None = None,
              dtype: str = "bfloat16", linear_class: str | None = None,
              ternary_type: str = "TQ2_0") -> str:
  """Writes a run's checkpoint for transformers (bf16 / packed) or GGUF.

  Everything is checked before anything is written, and the files go to
  `out`.partial first, renamed to `out` when complete: a failed export
  leaves no half-written folder.

  Args:
    fmt: "bf16" (latent weights, online quantization), "packed" (2-bit
      codes + weight_scale) or "gguf".
    dtype: "bfloat16" or "float32", of the tensors that are not packed.
    linear_class: packed only: "bitlinear" (weight_scale = 1/gamma) or
      "autobitlinear" (gamma); None = that of an imported packed model,
      else "bitlinear" (transformers' default class).
    ternary_type: gguf only: "TQ2_0" or "TQ1_0".

  Returns:
    The written folder (bf16, packed) or GGUF file.

  Raises:
    ConversionError: an existing `out`, a full-precision model, a packed
      weight whose output dimension is not a multiple of 4, a bad option.
    ConfigError: `workdir` is not a run or lacks checkpoint `step`.
  """
  if paths.is_url(out):
    raise hf.ConversionError(f"--out={out!r}: exports are written to a local "
                             "folder; copy it to the bucket afterwards "
                             "(gcloud storage cp -r)")
  workdir, out = paths.resolve(workdir), os.path.abspath(out)
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise hf.ConversionError(f"--out={out!r} exists and is not an empty "
                             "folder; choose a new one")
  source = reader.hf_source_config(workdir)
  source_quant = source.get("quantization_config") or {}
  if linear_class is None:
    linear_class = (source_quant.get("linear_class", "bitlinear")
                    if source_quant.get("quantization_mode") == "offline"
                    else "bitlinear")
  config = reader.load_run_config(workdir)
  tokenizer = load_tokenizer(reader.tokenizer_path(workdir))
  bos, eos = reader.special_token_ids(workdir, tokenizer)
  hf_cfg = hf.hf_config(
      config.model, bos_token_id=bos, eos_token_id=eos, torch_dtype=dtype,
      max_position_embeddings=source.get("max_position_embeddings",
                                         int(config.train.seq_len)),
      quantization=None if fmt == "gguf" else hf.quantization_config(
          fmt == "packed", linear_class))
  _, params, found = reader.load_run(workdir, step)
  warmup = config.model.quantization_warmup_steps
  if found < warmup:
    absl_logging.warning(
        "checkpoint %d precedes the end of model.quantization_warmup_steps="
        "%d: the run evaluates it with %.0f%% ternary blending, the export "
        "is fully ternary (a different model); export a checkpoint >= %d",
        found, warmup, 100 * found / warmup, warmup)
  tensors = hf.to_hf_tensors(params)
  partial = out + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  try:
    result = _write_weights(partial, fmt, tensors, hf_cfg, dtype,
                            linear_class, ternary_type, workdir)
    if fmt != "gguf":
      _write_side_files(workdir, partial, tokenizer, hf_cfg)
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  if os.path.isdir(out):
    os.rmdir(out)  # empty, checked above
  os.replace(partial, out)
  absl_logging.info("exported checkpoint %d of %s to %s (%s)", found,
                    workdir, out, fmt)
  return result.replace(partial, out)


FLAGS = flags.FLAGS


def main(argv):
  commands = {"import-hf", "export-hf"}
  if len(argv) != 2 or argv[1] not in commands:
    raise app.UsageError("usage: python -m bitnet_jax.convert "
                         "import-hf|export-hf --flags (see --help)")
  try:
    if not FLAGS.workdir:
      raise hf.ConversionError("--workdir is required")
    if argv[1] == "import-hf":
      if not FLAGS.hf_dir:
        raise hf.ConversionError("--hf_dir is required")
      written = import_hf(FLAGS.hf_dir, FLAGS.workdir, FLAGS.config,
                          quantization=FLAGS.quantization,
                          sub_norms=FLAGS.sub_norms)
      print(f"wrote {written}; fine-tune with: python -m bitnet_jax.main "
            f"--config={written} --workdir={FLAGS.workdir}")
    else:
      if not FLAGS.out:
        raise hf.ConversionError("--out is required")
      print(export_hf(FLAGS.workdir, FLAGS.out, FLAGS.format,
                      step=FLAGS.step, dtype=FLAGS.dtype,
                      linear_class=FLAGS.linear_class,
                      ternary_type=FLAGS.ternary_type))
  except (config_lib.ConfigError, checkpoint.CheckpointMismatchError,
          ValueError, OSError) as e:  # OSError: paths, permissions, disk
    absl_logging.error("%s: %s", type(e).__name__, e)
    sys.exit(1)


def _define_flags() -> None:
  """Defines the command-line flags (only when run as a program)."""
  flags.DEFINE_string("hf_dir", None, "import-hf: a local HF folder.")
  flags.DEFINE_string("workdir", None, "The run directory.")
  flags.DEFINE_string("out", None, "export-hf: the output folder.")
  flags.DEFINE_enum("format", "bf16", ["bf16", "packed", "gguf"],
                    "export-hf: latent weights, packed 2-bit, GGUF.")
  flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"],
                    "export-hf: dtype of the non-packed tensors.")
  flags.DEFINE_enum(
      "linear_class", None, list(hf.LINEAR_CLASSES), "export-hf "
      "--format=packed: weight_scale = 1/gamma (bitlinear) or gamma "
      "(autobitlinear); default: an imported packed model's, else bitlinear.")
  flags.DEFINE_enum("ternary_type", "TQ2_0",
                    ["TQ2_0", "TQ1_0"], "GGUF ternary type.")
  flags.DEFINE_integer("step", None, "export-hf: checkpoint step.")
  flags.DEFINE_enum("quantization", "", ["", *hf_sources.QUANTIZATIONS],
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
  app.run(main)
