r"""Moves BitNet models between bitnet_jax runs, Hugging Face and GGUF.

  # an HF BitNet folder (latent bf16 or packed 2-bit) -> a run to fine-tune
  python -m bitnet_jax.convert import-hf --hf_dir=DIR --workdir=RUN \
      [--config=configs/bitnet_2b4t.py]
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
import glob
import json
import os
import shutil
import sys

import ml_collections
import ml_dtypes
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from safetensors import safe_open
from safetensors.numpy import save_file

from bitnet_jax import checkpoint, gguf_export, hf, runs
from bitnet_jax import config as config_lib
from bitnet_jax.data.tokenizer import end_of_text_id, load_tokenizer

HF_SOURCE = "hf_source"  # RUN/hf_source: the imported folder's small files
_HF_FILES = ("config.json", "generation_config.json", "tokenizer.json",
             "tokenizer_config.json", "special_tokens_map.json")



def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise hf.ConversionError(f"{path} is missing") from e
  except ValueError as e:
    raise hf.ConversionError(f"{path} is not valid JSON: {e}") from e


def read_safetensors(hf_dir: str) -> dict[str, np.ndarray]:
  """Every tensor of the folder's `*.safetensors` files (sharded or not).

  Raises:
    ConversionError: naming `--hf_dir` when there are none, or a file that
      cannot be read.
  """
  files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
  if not files:
    raise hf.ConversionError(f"--hf_dir={hf_dir!r} holds no *.safetensors")
  tensors = {}
  for path in files:
    try:
      with safe_open(path, framework="np") as f:
        for name in f.keys():
          tensors[name] = f.get_tensor(name)
    except Exception as e:  # safetensors raises its own error types
      raise hf.ConversionError(f"cannot read {path}: {e}") from e
  return tensors


def latent_tensors(tensors: dict[str, np.ndarray], hf_config: dict,
                   source: str) -> dict[str, np.ndarray]:
  """HF tensors -> float32 latent weights (packed ones unpacked).

  A packed uint8 weight becomes codes x gamma' (`hf.latent_from_codes`) with
  gamma read from its `weight_scale` as `quantization_config.linear_class`
  defines it.
  """
  quant = hf_config.get("quantization_config") or {}
  linear_class = quant.get("linear_class", "bitlinear")
  out = {}
  for name, array in tensors.items():
    if name.endswith(".weight_scale"):
      continue
    if array.dtype == np.uint8:
      scale_name = name[:-len("weight")] + "weight_scale"
      if scale_name not in tensors:
        raise hf.ConversionError(f"{source}: packed {name} has no "
                                 f"{scale_name}")
      gamma = hf.gamma_from_scale(tensors[scale_name], linear_class)
      out[name] = hf.latent_from_codes(hf.unpack_ternary(array), gamma)
    else:
      out[name] = np.asarray(array, dtype=np.float32)
  return out


def _run_config(fields: dict, config_path: str, workdir: str
                ) -> ml_collections.ConfigDict:
  """The fine-tuning config: --config (checked) or the defaults + model."""
  if config_path:
    config = runs.load_config_file(config_path)
    for key, value in fields.items():
      if config.model[key] != value:
        raise hf.ConversionError(
            f"config.model.{key}={config.model[key]!r} in {config_path}, "
            f"but the HF model has {value!r}; fix the config or leave "
            "--config out to take the model from the HF config")
  else:
    config = config_lib.base_config()
    config.model.update(fields)
    config_lib.apply_fine_tuning(config)
  config.data.tokenizer_path = os.path.join(workdir, runs.TOKENIZER_JSON)
  config_lib.validate(config)
  return config


def _config_py(config: ml_collections.ConfigDict, hf_dir: str) -> str:
  """Python source of a config file reproducing `config`."""
  base = run_flat(config_lib.base_config())
  lines = [f'"""Fine-tuning config written by `bitnet_jax.convert import-hf`'
           f"\n\nfrom {hf_dir} on {datetime.date.today()}. Set data.dataset "
           'to your data; edit freely.\n"""', "",
           "from bitnet_jax.config import base_config", "", "",
           "def get_config():", '  """The imported model\'s config."""',
           "  c = base_config()"]
  for key, value in run_flat(config).items():
    if base.get(key, object()) != value:
      lines.append(f"  c.{key} = {value!r}")
  return "\n".join(lines + ["  return c", ""])


def run_flat(config: ml_collections.ConfigDict) -> dict:
  """{"model.d_model": 256, ...} of a ConfigDict."""
  flat = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      flat.update({f"{key}.{k}": v for k, v in run_flat(value).items()})
    else:
      flat[key] = value
  return flat


def import_hf(hf_dir: str, workdir: str, config_path: str = "") -> str:
  """Converts a local HF BitNet folder into a run directory.

  Returns:
    The path of the written `RUN/config.py`.

  Raises:
    ConversionError: unsupported HF config keys, missing or misshapen
      tensors, a missing tokenizer.json, or a workdir with checkpoints.
  """
  hf_dir, workdir = os.path.abspath(hf_dir), os.path.abspath(workdir)
  hf_config = _read_json(os.path.join(hf_dir, "config.json"))
  fields = hf.model_fields(hf_config, hf_dir)
  if os.path.isdir(os.path.join(workdir, "checkpoints")) and os.listdir(
      os.path.join(workdir, "checkpoints")):
    raise hf.ConversionError(f"--workdir={workdir!r} already has "
                             "checkpoints; import into a new directory")
  tokenizer_json = os.path.join(hf_dir, "tokenizer.json")
  if not os.path.isfile(tokenizer_json):
    raise hf.ConversionError(f"{tokenizer_json} is missing: import needs the "
                             "model's tokenizer (tokenizer.json)")
  config = _run_config(fields, config_path, workdir)
  tokenizer = load_tokenizer(tokenizer_json)
  config_lib.check_vocab(config, tokenizer.get_vocab_size(), tokenizer_json)
  tensors = latent_tensors(read_safetensors(hf_dir), hf_config, hf_dir)
  params = hf.from_hf_tensors(tensors, runs.abstract_params(config.model),
                              hf_dir)
  os.makedirs(os.path.join(workdir, HF_SOURCE), exist_ok=True)
  for name in _HF_FILES:
    if os.path.isfile(os.path.join(hf_dir, name)):
      shutil.copyfile(os.path.join(hf_dir, name),
                      os.path.join(workdir, HF_SOURCE, name))
  shutil.copyfile(tokenizer_json, os.path.join(workdir, runs.TOKENIZER_JSON))
  config_py = os.path.join(workdir, runs.CONFIG_PY)
  with open(config_py, "w", encoding="utf-8") as f:
    f.write(_config_py(config, hf_dir))
  saver = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"),
                                  keep=config.train.keep_checkpoints)
  saver.save_weights(0, params, {"tokens_seen": 0, "imported_from": hf_dir})
  saver.close()
  absl_logging.info("imported %s into %s", hf_dir, workdir)
  return config_py


def _special_ids(workdir: str, tokenizer) -> tuple[int, int | list[int]]:
  source = os.path.join(workdir, HF_SOURCE, "config.json")
  if os.path.isfile(source):
    saved = _read_json(source)
    if saved.get("eos_token_id") is not None:
      return saved.get("bos_token_id"), saved["eos_token_id"]
  eos = end_of_text_id(tokenizer, os.path.join(workdir, runs.TOKENIZER_JSON))
  return eos, eos


def _write_tokenizer(workdir: str, out: str, tokenizer, eos_id: int,
                     max_length: int) -> None:
  """tokenizer.json plus the imported or a generated tokenizer_config."""
  shutil.copyfile(runs.tokenizer_path(workdir),
                  os.path.join(out, "tokenizer.json"))
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    source = os.path.join(workdir, HF_SOURCE, name)
    if os.path.isfile(source):
      shutil.copyfile(source, os.path.join(out, name))
  if not os.path.isfile(os.path.join(out, "tokenizer_config.json")):
    eos = tokenizer.id_to_token(eos_id)
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
      json.dump({"tokenizer_class": "PreTrainedTokenizerFast",
                 "bos_token": eos, "eos_token": eos,
                 "model_max_length": max_length,
                 "clean_up_tokenization_spaces": False}, f, indent=2)


def export_hf(workdir: str, out: str, fmt: str, *, step: int | None = None,
              dtype: str = "bfloat16", linear_class: str = "",
              ternary_type: str = "TQ2_0") -> str:
  """Writes a run's checkpoint for transformers (bf16 / packed) or GGUF.

  Returns:
    The written folder (bf16, packed) or GGUF file.

  Raises:
    ConversionError: a non-empty `out`, a full-precision model, a packed
      weight whose output dimension is not a multiple of 4.
    ConfigError: `workdir` is not a run or lacks checkpoint `step`.
  """
  workdir, out = os.path.abspath(workdir), os.path.abspath(out)
  if os.path.isdir(out) and os.listdir(out):
    raise hf.ConversionError(f"--out={out!r} is not empty; choose a new "
                             "folder")
  config, params, found = runs.load_run(workdir, step)
  tokenizer = load_tokenizer(runs.tokenizer_path(workdir))
  bos, eos = _special_ids(workdir, tokenizer)
  source_quant = {}
  if os.path.isfile(os.path.join(workdir, HF_SOURCE, "config.json")):
    source_quant = _read_json(os.path.join(workdir, HF_SOURCE, "config.json")
                              ).get("quantization_config") or {}
  linear_class = linear_class or source_quant.get("linear_class",
                                                  "bitlinear")
  tensors = hf.to_hf_tensors(params)
  os.makedirs(out, exist_ok=True)
  max_length = int(config.train.seq_len)
  if fmt == "gguf":
    ternary = {n: hf.ternary_codes(t) for n, t in tensors.items()
               if hf.is_bitlinear(n)}
    path = os.path.join(out, f"model-{ternary_type}.gguf")
    gguf_export.write_gguf(
        path, hf_config=hf.hf_config(
            config.model, max_position_embeddings=max_length,
            bos_token_id=bos, eos_token_id=eos, torch_dtype=dtype,
            quantization=None),
        tensors={n: t for n, t in tensors.items() if not hf.is_bitlinear(n)},
        ternary=ternary, tokenizer_json=runs.tokenizer_path(workdir),
        ternary_type=ternary_type)
    return path
  packed = fmt == "packed"
  store = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
  written = {}
  for name, tensor in tensors.items():
    if packed and hf.is_bitlinear(name):
      codes, gamma = hf.ternary_codes(tensor)
      written[name] = hf.pack_ternary(codes)
      written[name[:-len("weight")] + "weight_scale"] = np.array(
          [hf.scale_from_gamma(gamma, linear_class)]).astype(store)
    else:
      written[name] = tensor.astype(store)
  save_file(written, os.path.join(out, "model.safetensors"),
            metadata={"format": "pt"})
  hf_cfg = hf.hf_config(config.model, max_position_embeddings=max_length,
                        bos_token_id=bos, eos_token_id=eos, torch_dtype=dtype,
                        quantization=hf.quantization_config(packed,
                                                            linear_class))
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump(hf_cfg, f, indent=2)
  with open(os.path.join(out, "generation_config.json"), "w") as f:
    json.dump({"bos_token_id": bos, "eos_token_id": eos}, f, indent=2)
  _write_tokenizer(workdir, out, tokenizer, eos if isinstance(eos, int)
                   else eos[0], max_length)
  absl_logging.info("exported checkpoint %d of %s to %s (%s)", found,
                    workdir, out, fmt)
  return out


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
      written = import_hf(FLAGS.hf_dir, FLAGS.workdir, FLAGS.config)
      print(f"wrote {written}; fine-tune with: python -m bitnet_jax.main "
            f"--config={written} --workdir={FLAGS.workdir}")
    else:
      if not FLAGS.out:
        raise hf.ConversionError("--out is required")
      print(export_hf(FLAGS.workdir, FLAGS.out, FLAGS.format,
                      step=FLAGS.step, dtype=FLAGS.dtype,
                      linear_class=FLAGS.linear_class,
                      ternary_type=FLAGS.ternary_type))
  except (config_lib.ConfigError, checkpoint.CheckpointMismatchError) as e:
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
  flags.DEFINE_string(
      "linear_class", "", "export-hf --format=packed: 'bitlinear' "
      "(weight_scale = 1/gamma) or 'autobitlinear' (gamma); default: the "
      "imported model's, else bitlinear.")
  flags.DEFINE_enum("ternary_type", "TQ2_0",
                    ["TQ2_0", "TQ1_0"], "GGUF ternary type.")
  flags.DEFINE_integer("step", None, "export-hf: checkpoint step.")
  flags.DEFINE_string(
      "config", "", "import-hf: a config file for everything but the model "
      "(its model fields must match the HF config).")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
