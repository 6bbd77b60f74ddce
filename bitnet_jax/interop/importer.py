"""Imports a local Hugging Face folder into a run directory (`import-hf`).

The folder is an HF BitNet model (latent bf16 or packed 2-bit, `hf`) or a
full-precision Llama / Qwen2 / Qwen3 model (`hf_sources`). The run gets
RUN/config.py (the model from the HF config.json, the rest from --config or
the fine-tuning defaults), RUN/tokenizer.json, RUN/hf_source/ (the HF config
and tokenizer files, reused on export) and a weights-only checkpoint
RUN/checkpoints/0: `python -m bitnet_jax.main --config=RUN/config.py
--workdir=RUN` fine-tunes it. Nothing is downloaded.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil

import ml_collections
from absl import logging as absl_logging

from bitnet_jax import config as config_lib
from bitnet_jax.data.tokenizer import load_tokenizer
from bitnet_jax.interop import hf, hf_sources
from bitnet_jax.model.attention import kv_heads
from bitnet_jax.runs import checkpoint, identity, reader
from bitnet_jax.runs.directory import (
  CONFIG_PY,
  HF_SOURCE,
  TOKENIZER_JSON,
  checkpoints_dir,
)
from bitnet_jax.storage import paths


def _read_json(path: str) -> dict:
  try:
    with paths.open_file(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise hf.ConversionError(f"{path} is missing") from e
  except ValueError as e:
    raise hf.ConversionError(f"{path} is not valid JSON: {e}") from e


def run_config(fields: dict, config_path: str, workdir: str
               ) -> ml_collections.ConfigDict:
  """The fine-tuning config of an import: --config (its model checked
  against `fields`) or the defaults with `fields` as the model.

  Args:
    fields: the `config.model` fields of the HF model
      (`hf_sources.model_fields`).
    config_path: a config file for everything but the model, or ''.
    workdir: the run directory (data.tokenizer_path points into it).

  Raises:
    ConversionError: naming the `config.model` key that differs from the
      HF model.
    ConfigError: the resulting config does not validate.
  """
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
  config.data.tokenizer_path = os.path.join(workdir, TOKENIZER_JSON)
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
  hf_config = _read_json(os.path.join(hf_dir, hf.CONFIG_FILE))
  fields = hf_sources.model_fields(hf_config, hf_dir,
                                   quantization=quantization,
                                   sub_norms=sub_norms)
  if os.path.isdir(workdir) and os.listdir(workdir):
    raise hf.ConversionError(f"--workdir={workdir!r} is not empty (a run's "
                             "files would mix with the import's); import "
                             "into a new directory")
  tokenizer_json = os.path.join(hf_dir, hf.TOKENIZER_FILE)
  if not os.path.isfile(tokenizer_json):
    raise hf.ConversionError(f"{tokenizer_json} is missing: import needs the "
                             "model's tokenizer (tokenizer.json)")
  config = run_config(fields, config_path, workdir)
  tokenizer = load_tokenizer(tokenizer_json)
  config_lib.check_vocab(config, tokenizer.get_vocab_size(), tokenizer_json)
  tensors = hf_sources.insert_sub_norms(
      hf_sources.latent_tensors(hf_sources.read_safetensors(hf_dir),
                                hf_config, hf_dir),
      config.model)
  params = hf.from_hf_tensors(tensors, reader.abstract_params(config.model),
                              hf_dir)
  os.makedirs(os.path.join(workdir, HF_SOURCE), exist_ok=True)
  for name in (hf.CONFIG_FILE, hf.TOKENIZER_FILE, *hf.REUSED_FILES):
    if os.path.isfile(os.path.join(hf_dir, name)):
      shutil.copyfile(os.path.join(hf_dir, name),
                      os.path.join(workdir, HF_SOURCE, name))
  shutil.copyfile(tokenizer_json, os.path.join(workdir, TOKENIZER_JSON))
  config_py = os.path.join(workdir, CONFIG_PY)
  with open(config_py, "w", encoding="utf-8") as f:
    f.write(_config_py(config, hf_dir))
  saver = checkpoint.Checkpointer(checkpoints_dir(workdir),
                                  keep=config.train.keep_checkpoints)
  saver.save_weights(0, params, {"tokens_seen": 0, "imported_from": hf_dir})
  saver.close()
  absl_logging.info("imported %s into %s", hf_dir, workdir)
  return config_py
