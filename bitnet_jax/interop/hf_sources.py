"""What `import-hf` reads from a Hugging Face folder: weights and config.

The weights: every `*.safetensors` file, packed ternary ones unpacked
(`read_safetensors`, `latent_tensors`). The config: `config.model` fields of
a BitNet folder (`bitnet_jax.interop.hf.model_fields`) or of a full-precision
`LlamaForCausalLM` (Llama 2 / 3, TinyLlama, SmolLM and other Llama-shaped
models), `Qwen2ForCausalLM` or `Qwen3ForCausalLM` (`model_fields`).

These full-precision families have BitNet's block without its two
sub-norms: the same tensor names (`model.layers.i.self_attn.q_proj.weight`,
...; see `bitnet_jax.interop.hf`), SwiGLU, grouped-query attention, rotate-half
RoPE; Qwen2 adds q/k/v biases (`model.attention_bias`), Qwen3 a per-head
RMSNorm of queries and keys (`model.qk_norm`) and its own head width
(`model.head_dim`). Converting one
to 1.58 bits inserts the sub-norms before o_proj and down_proj with gain 1
(SubLN, BitDistill: Wu et al., arXiv 2510.13998) and trains it ternary;
`--sub_norms=none --quantization=none` keeps the source model exactly, the
full-precision teacher of a distillation.

Llama 3.1's `rope_type: "llama3"` frequency scaling is implemented
(`bitnet_jax.model.layers.rope_frequencies`); other RoPE types are refused by
name. Every refusal names the config.json key.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from safetensors import safe_open

from bitnet_jax.config.choices import QUANTIZATIONS, Quantization, RopeScaling
from bitnet_jax.interop import hf
from bitnet_jax.interop.hf import ConversionError
from bitnet_jax.model.layers import head_dim

SUB_NORMS = ("insert", "none")
# model_type -> the architecture it names (what import-hf accepts)
FULL_PRECISION = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}
_LLAMA3_KEYS = {"factor": "rope_scaling_factor",
                "low_freq_factor": "rope_low_freq_factor",
                "high_freq_factor": "rope_high_freq_factor",
                "original_max_position_embeddings": "rope_original_context"}


def rope_fields(hf_config: Mapping, source: str) -> dict[str, Any]:
  """`config.model` RoPE fields of an HF config.

  Reads transformers 5's `rope_parameters` or the older top-level
  `rope_theta` + `rope_scaling` (`rope_type` or `type`).

  Raises:
    ConversionError: a RoPE type other than default / llama3, or a llama3
      scaling without one of its four parameters, naming the key.
  """
  rope = dict(hf_config.get("rope_parameters") or {})
  key, scaling = "rope_parameters", rope
  if hf_config.get("rope_scaling"):  # the older configs' place
    key, scaling = "rope_scaling", hf_config["rope_scaling"]
    rope = {**rope, **scaling}
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  theta = float(rope.get("rope_theta", hf_config.get("rope_theta", 10000.0)))
  if kind == "default":
    return {"rope_theta": theta, "rope_scaling": RopeScaling.NONE.value}
  if kind != "llama3":
    raise ConversionError(
        f"{source}: config.json {key}.rope_type={kind!r} is not supported: "
        "bitnet_jax implements the default RoPE and Llama 3.1's 'llama3' "
        "scaling")
  missing = [name for name in _LLAMA3_KEYS if name not in rope]
  if missing:
    raise ConversionError(f"{source}: config.json {key} (rope_type llama3) "
                          f"has no {', '.join(missing)}")
  fields = {ours: rope[theirs] for theirs, ours in _LLAMA3_KEYS.items()}
  fields["rope_original_context"] = int(fields["rope_original_context"])
  return {"rope_theta": theta, "rope_scaling": RopeScaling.LLAMA3.value,
          **{k: v if k == "rope_original_context" else float(v)
             for k, v in fields.items()}}


def _refuse(hf_config: Mapping, source: str, key: str, allowed: Any,
            why: str) -> None:
  if key in hf_config and hf_config[key] not in allowed:
    raise ConversionError(f"{source}: config.json {key}={hf_config[key]!r} "
                          f"is not supported ({why})")


def family_fields(hf_config: Mapping, source: str) -> dict[str, Any]:
  """`config.model` fields of an HF Llama / Qwen2 / Qwen3 config dict (the
  block shape; `model_fields` adds quantization and sub-norms).

  Raises:
    ConversionError: naming the key of an unsupported setting (FFN biases,
      Llama's or Qwen3's attention biases, sliding-window attention, an
      activation other than SiLU, a RoPE type other than default / llama3)
      or a missing one.
  """
  def need(key):
    if key not in hf_config:
      raise ConversionError(f"{source}: config.json has no {key!r}")
    return hf_config[key]

  hf.check_value_types(hf_config, source)
  model_type = hf_config["model_type"]
  _refuse(hf_config, source, "hidden_act", ("silu", "swish"),
          "the gated FFN is SwiGLU: 'silu'")
  _refuse(hf_config, source, "mlp_bias", (False, None), "FFN biases")
  _refuse(hf_config, source, "attention_bias", (False, None),
          "biases on all four attention projections")
  _refuse(hf_config, source, "use_sliding_window", (False, None),
          "sliding-window attention")
  heads, d_model = need("num_attention_heads"), need("hidden_size")
  width = hf_config.get("head_dim") or d_model // heads
  return {"vocab_size": need("vocab_size"), "d_model": d_model,
          "n_layers": need("num_hidden_layers"), "n_heads": heads,
          "n_kv_heads": hf_config.get("num_key_value_heads") or heads,
          "head_dim": 0 if width * heads == d_model else width,
          "attention_bias": model_type == "qwen2",
          "qk_norm": model_type == "qwen3",
          "ffn_dim": need("intermediate_size"), "ffn_activation": "swiglu",
          "tie_embeddings": bool(hf_config.get("tie_word_embeddings", False)),
          **rope_fields(hf_config, source),
          "norm_eps": float(hf_config.get("rms_norm_eps", 1e-6)),
          "init_std": float(hf_config.get("initializer_range", 0.02))}


def model_fields(hf_config: Mapping, source: str, *,
                 quantization: str = "", sub_norms: str = ""
                 ) -> dict[str, Any]:
  """`config.model` fields for any folder `import-hf` reads.

  Args:
    hf_config: the folder's config.json.
    source: the folder, for messages.
    quantization: 'ternary' or 'none'; '' = the source's kind (BitNet:
      ternary; full precision: ternary, the conversion).
    sub_norms: 'insert' (gain-1 sub-norms, BitDistill's SubLN) or 'none'
      (the source block); '' = 'insert'. A BitNet source has its own.

  Raises:
    ConversionError: an unknown model_type, an option a BitNet source
      cannot take, or any refusal of `hf.model_fields` / `family_fields`.
  """
  if quantization not in ("", *QUANTIZATIONS):
    raise ConversionError(f"--quantization={quantization!r}: use one of "
                          f"{', '.join(QUANTIZATIONS)}")
  if sub_norms not in ("", *SUB_NORMS):
    raise ConversionError(f"--sub_norms={sub_norms!r}: use one of "
                          f"{', '.join(SUB_NORMS)}")
  model_type = hf_config.get("model_type")
  if model_type == "bitnet":
    if quantization == Quantization.NONE or sub_norms == "none":
      raise ConversionError(f"{source} is a BitNet model: --quantization and "
                            "--sub_norms apply to full-precision sources")
    return {**hf.model_fields(hf_config, source), "sub_norms": True}
  if model_type not in FULL_PRECISION:
    names = ", ".join(["BitNetForCausalLM", *FULL_PRECISION.values()])
    raise ConversionError(f"{source}: config.json model_type={model_type!r} "
                          f"cannot be imported; import-hf reads {names}")
  return {**family_fields(hf_config, source),
          "quantization": quantization or Quantization.TERNARY.value,
          "sub_norms": (sub_norms or "insert") == "insert"}


def insert_sub_norms(tensors: Mapping[str, np.ndarray],
                     model: Any) -> dict[str, np.ndarray]:
  """`tensors` plus gain-1 `attn_sub_norm` `[n_heads x head_dim]` and
  `ffn_sub_norm` `[ffn_dim]` weights for every layer that lacks them
  (float32), when `model.sub_norms` is on; otherwise `tensors` unchanged."""
  tensors = dict(tensors)
  if not model.sub_norms:
    return tensors
  for i in range(model.n_layers):
    prefix = f"model.layers.{i}."
    tensors.setdefault(prefix + "self_attn.attn_sub_norm.weight",
                       np.ones(model.n_heads * head_dim(model), np.float32))
    tensors.setdefault(prefix + "mlp.ffn_sub_norm.weight",
                       np.ones(model.ffn_dim, np.float32))
  return tensors


def read_safetensors(hf_dir: str) -> dict[str, np.ndarray]:
  """Every tensor of the folder's `*.safetensors` files (sharded or not).

  Raises:
    ConversionError: naming `--hf_dir` when there are none, or a file that
      cannot be read.
  """
  files = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
  if not files:
    raise ConversionError(f"--hf_dir={hf_dir!r} holds no *.safetensors")
  tensors = {}
  for path in files:
    try:
      with safe_open(path, framework="np") as f:
        for name in f.keys():
          tensors[name] = f.get_tensor(name)
    except Exception as e:  # safetensors raises its own error types
      raise ConversionError(f"cannot read {path}: {e}") from e
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
        raise ConversionError(f"{source}: packed {name} has no "
                                 f"{scale_name}")
      try:
        gamma = hf.gamma_from_scale(tensors[scale_name], linear_class)
        out[name] = hf.latent_from_codes(hf.unpack_ternary(array), gamma)
      except ConversionError as e:
        raise ConversionError(f"{source}: {name}: {e}") from e
    else:
      out[name] = np.asarray(array, dtype=np.float32)
  return out
