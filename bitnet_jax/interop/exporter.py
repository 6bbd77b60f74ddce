"""Exports a run's checkpoint for transformers or llama.cpp (`export-hf`).

Each `--format` is one row of `EXPORT_FORMATS`: how its weights are written
and whether the folder is a transformers model (config.json with its
`quantization_config`, the tokenizer and generation files). A new format is
a writer and one row.

  bf16    model.safetensors of the latent weights; transformers ternarizes
          them on every forward (quantization_mode "online")
  packed  model.safetensors of the 2-bit codes + weight_scale
          (quantization_mode "offline", `hf.pack_ternary`)
  gguf    one llama.cpp "bitnet" file model-<ternary_type>.gguf (`gguf`)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from collections.abc import Callable

import ml_dtypes
import numpy as np
from absl import logging as absl_logging
from safetensors.numpy import save_file

from bitnet_jax.data.tokenizer import load_tokenizer
from bitnet_jax.interop import gguf, hf
from bitnet_jax.runs import reader
from bitnet_jax.runs.directory import HF_SOURCE
from bitnet_jax.storage import paths


@dataclasses.dataclass(frozen=True)
class Weights:
  """What a format's writer gets.

  tensors: HF name -> float32 latent weights in HF orientation
    (`hf.to_hf_tensors`).
  hf_config: the exported `BitNetConfig` dict (`hf.hf_config`).
  dtype: "bfloat16" or "float32", of the tensors that are not packed.
  linear_class: HF's quantized linear class ("bitlinear" | "autobitlinear").
  ternary_type: the GGUF ternary type ("TQ2_0" | "TQ1_0").
  tokenizer_json: the run's tokenizer.json, a local path.
  """
  tensors: dict[str, np.ndarray]
  hf_config: dict
  dtype: str
  linear_class: str
  ternary_type: str
  tokenizer_json: str


@dataclasses.dataclass(frozen=True)
class ExportFormat:
  """One `--format` of export-hf.

  summary: its words in the --format help.
  write: (folder, weights) -> the path to report: the folder, or the file
    written in it.
  quantization: linear_class -> config.json's `quantization_config`
    (raising ConversionError for a class it cannot write), or None: none.
  transformers: the folder is a transformers model: config.json, the
    tokenizer and generation files are written beside the weights.
  """
  summary: str
  write: Callable[[str, Weights], str]
  quantization: Callable[[str], dict] | None
  transformers: bool


def _write_safetensors(folder: str, weights: Weights, *, packed: bool
                       ) -> str:
  """model.safetensors: every tensor in `weights.dtype`, or with `packed`
  each BitLinear weight as uint8 codes (`hf.pack_ternary`) + weight_scale."""
  store = np.float32 if weights.dtype == "float32" else ml_dtypes.bfloat16
  written = {}
  for name, tensor in weights.tensors.items():
    if packed and hf.is_bitlinear(name):
      codes, gamma = hf.ternary_codes(tensor)
      written[name] = hf.pack_ternary(codes)
      written[name[:-len("weight")] + "weight_scale"] = np.array(
          [hf.scale_from_gamma(gamma, weights.linear_class)]).astype(store)
    else:
      written[name] = tensor.astype(store)
  save_file(written, os.path.join(folder, "model.safetensors"),
            metadata={"format": "pt"})
  return folder


def _write_gguf(folder: str, weights: Weights) -> str:
  """model-<ternary_type>.gguf (`gguf.write_gguf`); returns the file."""
  path = os.path.join(folder, f"model-{weights.ternary_type}.gguf")
  tensors = weights.tensors
  gguf.write_gguf(
      path, hf_config=weights.hf_config, ternary_type=weights.ternary_type,
      tensors={n: t for n, t in tensors.items() if not hf.is_bitlinear(n)},
      ternary={n: hf.ternary_codes(t) for n, t in tensors.items()
               if hf.is_bitlinear(n)},
      tokenizer_json=weights.tokenizer_json)
  return path


# --format -> how it is written; the flag's choices, in this order.
EXPORT_FORMATS = {
    "bf16": ExportFormat(
        "latent weights",
        functools.partial(_write_safetensors, packed=False),
        functools.partial(hf.quantization_config, False), transformers=True),
    "packed": ExportFormat(
        "packed 2-bit",
        functools.partial(_write_safetensors, packed=True),
        functools.partial(hf.quantization_config, True), transformers=True),
    "gguf": ExportFormat("GGUF", _write_gguf, None, transformers=False),
}


def _write_side_files(workdir: str, out: str, tokenizer_json: str,
                      tokenizer, hf_cfg: dict) -> None:
  """config.json, generation_config.json and the tokenizer files.

  The imported folder's generation_config / tokenizer_config /
  special_tokens_map / chat template are reused when RUN/hf_source has them.
  """
  with open(os.path.join(out, hf.CONFIG_FILE), "w") as f:
    json.dump(hf_cfg, f, indent=2)
  shutil.copyfile(tokenizer_json, os.path.join(out, hf.TOKENIZER_FILE))
  for name in hf.REUSED_FILES:
    source = paths.join(workdir, HF_SOURCE, name)
    if paths.isfile(source):
      with open(os.path.join(out, name), "wb") as f:
        f.write(paths.read_bytes(source))
  eos = hf_cfg["eos_token_id"]
  eos = eos[0] if isinstance(eos, list) else eos
  generation_config = os.path.join(out, hf.GENERATION_CONFIG_FILE)
  if not os.path.isfile(generation_config):
    with open(generation_config, "w") as f:
      json.dump({"bos_token_id": hf_cfg["bos_token_id"],
                 "eos_token_id": hf_cfg["eos_token_id"]}, f, indent=2)
  tokenizer_config = os.path.join(out, hf.TOKENIZER_CONFIG_FILE)
  if not os.path.isfile(tokenizer_config):
    token = tokenizer.id_to_token(eos)
    with open(tokenizer_config, "w") as f:
      json.dump({"tokenizer_class": "PreTrainedTokenizerFast",
                 "bos_token": token, "eos_token": token,
                 "model_max_length": hf_cfg["max_position_embeddings"],
                 "clean_up_tokenization_spaces": False}, f, indent=2)


def export_hf(workdir: str, out: str, fmt: str, *, step: int | None = None,
              dtype: str = "bfloat16", linear_class: str | None = None,
              ternary_type: str = "TQ2_0") -> str:
  """Writes a run's checkpoint for transformers (bf16 / packed) or GGUF.

  Everything is checked before anything is written, and the files go to
  `out`.partial first, renamed to `out` when complete: a failed export
  leaves no half-written folder.

  Args:
    fmt: a key of `EXPORT_FORMATS`: "bf16" (latent weights, online
      quantization), "packed" (2-bit codes + weight_scale) or "gguf".
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
  if fmt not in EXPORT_FORMATS:
    raise hf.ConversionError(f"--format={fmt!r}: use one of "
                             f"{', '.join(EXPORT_FORMATS)}")
  export_format = EXPORT_FORMATS[fmt]
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
  tokenizer_json = reader.tokenizer_path(workdir)
  tokenizer = load_tokenizer(tokenizer_json)
  bos, eos = reader.special_token_ids(workdir, tokenizer)
  quantization = (export_format.quantization(linear_class)
                  if export_format.quantization else None)
  hf_cfg = hf.hf_config(
      config.model, bos_token_id=bos, eos_token_id=eos, torch_dtype=dtype,
      max_position_embeddings=source.get("max_position_embeddings",
                                         int(config.train.seq_len)),
      quantization=quantization)
  _, params, found = reader.load_run(workdir, step)
  warmup = config.model.quantization_warmup_steps
  if found < warmup:
    absl_logging.warning(
        "checkpoint %d precedes the end of model.quantization_warmup_steps="
        "%d: the run evaluates it with %.0f%% ternary blending, the export "
        "is fully ternary (a different model); export a checkpoint >= %d",
        found, warmup, 100 * found / warmup, warmup)
  weights = Weights(tensors=hf.to_hf_tensors(params), hf_config=hf_cfg,
                    dtype=dtype, linear_class=linear_class,
                    ternary_type=ternary_type, tokenizer_json=tokenizer_json)
  partial = out + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  try:
    result = export_format.write(partial, weights)
    if export_format.transformers:
      _write_side_files(workdir, partial, tokenizer_json, tokenizer, hf_cfg)
  except BaseException:
    shutil.rmtree(partial, ignore_errors=True)
    raise
  if os.path.isdir(out):
    os.rmdir(out)  # empty, checked above
  os.replace(partial, out)
  absl_logging.info("exported checkpoint %d of %s to %s (%s)", found,
                    workdir, out, fmt)
  return result.replace(partial, out)
