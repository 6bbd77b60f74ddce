"""The Hugging Face BitNet format: tensor names, configs, packed ternary codes.

Reference: transformers `models/bitnet/` (`BitNetForCausalLM`, whose block
layout `bitnet_jax.model.transformer` mirrors) and `integrations/bitnet.py` (the packed
layout and the two quantized linear classes):

- parameter `layers/i/<module>/kernel [in, out]` (slice i of the scanned
  `layers/<module>/kernel [n_layers, in, out]`, see `layout.unstack_layers`)
  is HF's `model.layers.i.<module>.weight [out, in]`; RMSNorm `scale` is
  `weight`;
  `embed_tokens/embedding` is `model.embed_tokens.weight`, `lm_head/kernel`
  is `lm_head.weight` (absent when embeddings are tied);
- a packed BitLinear weight is uint8 `[out / 4, in]`: code + 1 in {0, 1, 2}
  in 2-bit fields, the output rows split into 4 contiguous blocks, block j in
  bits 2j..2j+1; `weight_scale` holds gamma for `autobitlinear` and 1 / gamma
  for `bitlinear` (`BitLinear` divides its output by it, `AutoBitLinear`
  multiplies).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from bitnet_jax.config import ConfigError
from bitnet_jax.model.attention import kv_heads
from bitnet_jax.model.layout import to_layout, unstack_layers
from bitnet_jax.model.tree_paths import BITLINEAR_NAMES, path_name
from bitnet_jax.quant.quantizers import SCALE_EPS

VALUES_PER_BYTE = 4  # ternary codes per packed uint8
LINEAR_CLASSES = ("bitlinear", "autobitlinear")
# transformers' names of an HF model folder's files besides the weights.
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Kept by import-hf in RUN/hf_source (with the two above) and copied back by
# export-hf, which writes config.json and tokenizer.json from the run.
REUSED_FILES = (GENERATION_CONFIG_FILE, TOKENIZER_CONFIG_FILE,
                "special_tokens_map.json", "chat_template.jinja")
_ACTIVATIONS = {"relu2": "relu2", "silu": "swiglu", "swish": "swiglu"}


class ConversionError(ConfigError):
  """An HF folder or checkpoint cannot be converted; names the key or file."""


def hf_name(path: tuple) -> tuple[str, bool]:
  """(HF tensor name, whether to transpose) of a parameter tree path.

  Args:
    path: keys from the params root, e.g. ("layers", 0, "self_attn",
      "q_proj", "kernel").
  """
  *modules, leaf = [str(p) for p in path]
  if modules[0] == "layers":
    modules = ["model", "layers", *modules[1:]]
  elif modules[0] != "lm_head":
    modules = ["model", *modules]
  suffix = ".bias" if leaf == "bias" else ".weight"
  return ".".join(modules) + suffix, leaf == "kernel"


def is_bitlinear(name: str) -> bool:
  """Whether HF tensor `name` is a ternary BitLinear weight."""
  parts = name.split(".")
  return (name.startswith("model.layers.") and parts[-1] == "weight"
          and parts[-2] in BITLINEAR_NAMES)


def to_hf_tensors(params: Any) -> dict[str, np.ndarray]:
  """Our parameters (either layer layout) as HF-named float32 arrays in HF's
  `[out, in]` layout."""
  tensors = {}
  params = unstack_layers(jax.device_get(params))
  for path, value in jax.tree_util.tree_leaves_with_path(params):
    name, transpose = hf_name(path_name(path).split("/"))
    array = np.asarray(value, dtype=np.float32)
    tensors[name] = np.ascontiguousarray(array.T if transpose else array)
  return tensors


def from_hf_tensors(tensors: Mapping[str, np.ndarray],
                    abstract_params: Any, source: str) -> Any:
  """HF-named float arrays -> our parameter tree (numpy float32).

  Args:
    tensors: name -> array, as `to_hf_tensors` makes (extra names such as a
      tied `lm_head.weight` are ignored).
    abstract_params: the config's parameter shapes (`jax.ShapeDtypeStruct`),
      in either layer layout; the result has the same layout.
    source: the folder read, for messages.

  Raises:
    ConversionError: naming each missing tensor or differing shape.
  """
  problems = []

  def convert(path, abstract):
    name, transpose = hf_name(path_name(path).split("/"))
    if name not in tensors:
      problems.append(f"{name}: missing")
      return None
    array = np.asarray(tensors[name], dtype=np.float32)
    array = array.T if transpose else array
    if array.shape != tuple(abstract.shape):
      needed = tuple(abstract.shape)[::-1] if transpose else abstract.shape
      problems.append(f"{name}: {source} has {tuple(tensors[name].shape)}, "
                      f"the config needs {tuple(needed)}")
      return None
    return np.ascontiguousarray(array)

  params = jax.tree_util.tree_map_with_path(
      convert, unstack_layers(abstract_params))
  if problems:
    raise ConversionError(f"the weights in {source} do not fit the model "
                          "config:\n  " + "\n  ".join(problems[:40]))
  return to_layout(params, abstract_params)


def ternary_codes(weight: np.ndarray) -> tuple[np.ndarray, np.float32]:
  """Absmean ternary quantization (the FAQ's weight_quant) on the host.

  Args:
    weight: a latent weight, any shape, float32.

  Returns:
    (codes int8 of `weight`'s shape in {-1, 0, 1}, gamma float32), gamma =
    max(mean|W|, 1e-5) with the mean taken in float64 and rounded once.
  """
  w = np.asarray(weight, dtype=np.float32)
  gamma = np.float32(max(np.mean(np.abs(w), dtype=np.float64), SCALE_EPS))
  codes = np.clip(np.round(w / gamma), -1, 1).astype(np.int8)
  return codes, gamma


def latent_from_codes(codes: np.ndarray, gamma: float) -> np.ndarray:
  """A float32 latent weight that `ternary_codes` maps back to (codes, gamma).

  The latent is codes x c with c = gamma / (share of non-zero codes), except
  for a set of non-zero elements whose common magnitude absorbs the float32
  rounding of c, nudged by ulps until the absmean scale (float64 mean,
  rounded once) equals float32(gamma) exactly. So exporting an
  imported packed model reproduces its codes and scale bit for bit; the
  training quantizer's float32 mean on device agrees to ~1e-6.

  Raises:
    ConversionError: gamma not finite, or below the quantizer's clamp 1e-5
      (the codes could not be reproduced), or no float32 latent hits it.
  """
  codes = np.asarray(codes, dtype=np.int8)
  target = np.float32(gamma)
  if not np.isfinite(target) or target <= SCALE_EPS:
    raise ConversionError(f"weight scale gamma={gamma!r} is not a finite "
                          f"number above {SCALE_EPS} (the absmean clamp)")
  nonzero = np.flatnonzero(codes)
  latent = codes.astype(np.float32)
  if nonzero.size == 0:
    return latent * 0
  c = np.float32(float(target) * codes.size / nonzero.size)
  latent *= c
  # enough elements to absorb c's rounding, few enough that one ulp of
  # theirs moves the mean by at most half an ulp of gamma
  per_ulp = codes.size * np.spacing(target) / (2 * np.spacing(c))
  adjusted = nonzero[:max(1, min(nonzero.size, int(per_ulp)))]
  rest = float(c) * (nonzero.size - adjusted.size)
  magnitude = np.float32((float(target) * codes.size - rest) / adjusted.size)
  for _ in range(64):
    latent.flat[adjusted] = codes.flat[adjusted] * magnitude
    _, got = ternary_codes(latent)
    if got == target:
      return latent
    magnitude = np.nextafter(magnitude,
                             np.float32(np.inf if got < target else 0.0))
  raise ConversionError(f"no float32 latent weight reproduces the scale "
                        f"{gamma!r} exactly")


def pack_ternary(codes: np.ndarray) -> np.ndarray:
  """int8 codes `[out, in]` -> HF's packed uint8 `[out / 4, in]`.

  Raises:
    ConversionError: when `out` is not a multiple of 4 (HF's `BitLinear`
      cannot hold it).
  """
  out = codes.shape[0]
  if out % VALUES_PER_BYTE:
    raise ConversionError(f"a packed weight needs its output dimension "
                          f"divisible by 4, got shape {codes.shape}")
  fields = (codes.astype(np.int16) + 1).astype(np.uint8)
  blocks = fields.reshape(VALUES_PER_BYTE, out // VALUES_PER_BYTE, -1)
  packed = np.zeros(blocks.shape[1:], np.uint8)
  for j in range(VALUES_PER_BYTE):
    packed |= blocks[j] << (2 * j)
  return packed


def unpack_ternary(packed: np.ndarray) -> np.ndarray:
  """HF's packed uint8 `[out / 4, in]` -> int8 codes `[out, in]`.

  Raises:
    ConversionError: on a 2-bit field holding 3 (not a ternary code).
  """
  packed = np.asarray(packed, dtype=np.uint8)
  fields = np.concatenate([(packed >> (2 * j)) & 3
                           for j in range(VALUES_PER_BYTE)])
  if np.any(fields == 3):
    raise ConversionError("a packed weight holds the 2-bit value 3, which is "
                          "no ternary code: the file is not HF BitNet packed")
  return fields.astype(np.int8) - 1


def gamma_from_scale(weight_scale: float, linear_class: str) -> float:
  """gamma from a stored `weight_scale` (1/gamma for `bitlinear`).

  Raises:
    ConversionError: a scale that is not a positive finite number.
  """
  scale = float(np.asarray(weight_scale, np.float64).reshape(-1)[0])
  if not np.isfinite(scale) or scale <= 0:
    raise ConversionError(f"weight_scale={scale!r} is not a positive number")
  return scale if linear_class == "autobitlinear" else 1.0 / scale


def scale_from_gamma(gamma: float, linear_class: str) -> float:
  """The `weight_scale` value HF's `linear_class` expects for `gamma`."""
  return float(gamma) if linear_class == "autobitlinear" else 1.0 / float(
      gamma)


def quantization_config(packed: bool, linear_class: str) -> dict:
  """The `quantization_config` of an exported `config.json`.

  Latent weights: `autobitlinear` with online quantization (transformers
  ternarizes on every forward, as the `-bf16` release); packed: offline.
  """
  if packed and linear_class not in LINEAR_CLASSES:
    raise ConversionError(f"--linear_class={linear_class!r}: use one of "
                          f"{', '.join(LINEAR_CLASSES)}")
  return {"quant_method": "bitnet",
          "linear_class": linear_class if packed else "autobitlinear",
          "quantization_mode": "offline" if packed else "online"}


def rope_theta(hf_config: Mapping) -> float:
  """RoPE base of an HF config (`rope_parameters` or legacy `rope_theta`)."""
  rope = hf_config.get("rope_parameters") or {}
  theta = rope.get("rope_theta", hf_config.get("rope_theta", 500000.0))
  if hf_config.get("rope_scaling"):
    raise ConversionError(f"rope_scaling={hf_config['rope_scaling']} is not "
                          "supported: bitnet_jax implements the default "
                          "RoPE only")
  if rope.get("rope_type", "default") != "default":
    raise ConversionError(f"rope_parameters.rope_type="
                          f"{rope['rope_type']!r} is not supported: "
                          "bitnet_jax implements the default RoPE only")
  return float(theta)


# config.json keys that hold sizes (positive integers) and real numbers, in
# every architecture we import (BitNet, Llama, Qwen).
_INTEGER_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "intermediate_size", "vocab_size",
                 "head_dim", "max_position_embeddings")
_NUMBER_KEYS = ("rms_norm_eps", "initializer_range", "rope_theta")


def check_value_types(hf_config: Mapping, source: str) -> None:
  """Refuses a config.json whose sizes are not positive integers or whose
  real-valued settings are not numbers (an edited or damaged file).

  Raises:
    ConversionError: naming `source`, the key, its value and what it must be.
  """
  for key in _INTEGER_KEYS:
    value = hf_config.get(key)
    if value is not None and (isinstance(value, bool) or
                              not isinstance(value, int) or value < 1):
      raise ConversionError(f"{source}: config.json {key}={value!r} must be "
                            "a positive integer; fix the file (or download "
                            "it again)")
  for key in _NUMBER_KEYS:
    value = hf_config.get(key)
    if value is not None and (isinstance(value, bool) or
                              not isinstance(value, (int, float))):
      raise ConversionError(f"{source}: config.json {key}={value!r} must be "
                            "a number; fix the file (or download it again)")


def model_fields(hf_config: Mapping, source: str) -> dict[str, Any]:
  """`config.model` fields equivalent to an HF `BitNetConfig` dict.

  Raises:
    ConversionError: naming the HF key of an unsupported setting or of a
      malformed value (`check_value_types`).
  """
  def need(key):
    if key not in hf_config:
      raise ConversionError(f"{source}: config.json has no {key!r}")
    return hf_config[key]

  check_value_types(hf_config, source)
  if hf_config.get("model_type") != "bitnet":
    raise ConversionError(f"{source}: model_type="
                          f"{hf_config.get('model_type')!r}; only 'bitnet' "
                          "(BitNetForCausalLM) checkpoints can be imported")
  act = need("hidden_act")
  if act not in _ACTIVATIONS:
    raise ConversionError(f"{source}: hidden_act={act!r} is not supported; "
                          f"use one of {', '.join(_ACTIVATIONS)}")
  heads, d_model = need("num_attention_heads"), need("hidden_size")
  head_dim = hf_config.get("head_dim") or d_model // heads
  if head_dim * heads != d_model:
    raise ConversionError(f"{source}: head_dim={head_dim} x "
                          f"num_attention_heads={heads} != hidden_size="
                          f"{d_model}; bitnet_jax needs them equal")
  if hf_config.get("attention_bias"):
    raise ConversionError(f"{source}: attention_bias=true is not supported "
                          "(BitNet has no biases)")
  quant = hf_config.get("quantization_config") or {}
  if quant.get("quant_method", "bitnet") != "bitnet" or quant.get(
      "use_rms_norm"):
    raise ConversionError(f"{source}: quantization_config={quant} is not "
                          "supported (quant_method must be 'bitnet', "
                          "use_rms_norm false)")
  return {"vocab_size": need("vocab_size"), "d_model": d_model,
          "n_layers": need("num_hidden_layers"), "n_heads": heads,
          "n_kv_heads": hf_config.get("num_key_value_heads") or heads,
          "ffn_dim": need("intermediate_size"),
          "ffn_activation": _ACTIVATIONS[act],
          "quantization": "ternary",
          "tie_embeddings": bool(hf_config.get("tie_word_embeddings", False)),
          "rope_theta": rope_theta(hf_config),
          "norm_eps": float(hf_config.get("rms_norm_eps", 1e-5)),
          "init_std": float(hf_config.get("initializer_range", 0.02))}


def hf_config(model: Any, *, max_position_embeddings: int, bos_token_id: int,
              eos_token_id: int | list[int], torch_dtype: str,
              quantization: dict | None) -> dict:
  """An HF `BitNetConfig` dict for `config.model`.

  Raises:
    ConversionError: for a full-precision model (`model.quantization` none),
      an mHC-lite residual (`model.residual`), a block without sub-norms
      (`model.sub_norms`), biases (`model.attention_bias`), QK-norm
      (`model.qk_norm`), a head width apart from d_model / n_heads or scaled
      RoPE (`model.rope_scaling`), which `BitNetForCausalLM` (or our export)
      cannot express.
  """
  if model.quantization != "ternary":
    raise ConversionError("config.model.quantization='none': only ternary "
                          "models export as BitNetForCausalLM")
  if model.residual != "standard":
    raise ConversionError(
        f"config.model.residual={model.residual!r}: BitNetForCausalLM has "
        "one residual stream; only model.residual='standard' models export")
  if not model.sub_norms:
    raise ConversionError("config.model.sub_norms=False: BitNetForCausalLM "
                          "has attn_sub_norm and ffn_sub_norm in every "
                          "block; import with --sub_norms=insert to export")
  for key, feature in (("attention_bias", "q/k/v biases"),
                       ("qk_norm", "query/key RMSNorms")):
    if model[key]:
      raise ConversionError(f"config.model.{key}=True: BitNetForCausalLM has "
                            f"no {feature} (a converted Qwen model trains "
                            "and evaluates here but cannot export)")
  if model.head_dim and model.head_dim * model.n_heads != model.d_model:
    raise ConversionError(f"config.model.head_dim={model.head_dim} x n_heads "
                          f"!= d_model={model.d_model}: BitNetForCausalLM "
                          "and llama.cpp's bitnet need them equal")
  if model.rope_scaling != "none":
    raise ConversionError(f"config.model.rope_scaling="
                          f"{model.rope_scaling!r}: the export writes the "
                          "default RoPE only (BitNet and llama.cpp's bitnet "
                          "architecture)")
  heads = model.n_heads
  config = {
      "architectures": ["BitNetForCausalLM"], "model_type": "bitnet",
      "vocab_size": model.vocab_size, "hidden_size": model.d_model,
      "intermediate_size": model.ffn_dim,
      "num_hidden_layers": model.n_layers, "num_attention_heads": heads,
      "num_key_value_heads": kv_heads(model),
      "head_dim": model.d_model // heads,
      "hidden_act": {"relu2": "relu2", "swiglu": "silu"}[model.ffn_activation],
      "max_position_embeddings": max_position_embeddings,
      "rms_norm_eps": model.norm_eps, "rope_theta": model.rope_theta,
      "rope_parameters": {"rope_type": "default",
                          "rope_theta": model.rope_theta},
      "tie_word_embeddings": bool(model.tie_embeddings),
      "attention_bias": False, "attention_dropout": 0.0,
      "initializer_range": model.init_std, "use_cache": True,
      "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
      "dtype": torch_dtype, "torch_dtype": torch_dtype}
  if quantization:
    config["quantization_config"] = quantization
  return config
