"""GGUF export of a BitNet b1.58 model for llama.cpp (architecture "bitnet").

Mirrors what upstream llama.cpp's converter writes for `BitNetForCausalLM`
(conversion/bitnet.py + conversion/base.py `TextModel`) and what its loader
reads (src/models/bitnet.cpp), using only the `gguf` package and numpy:

- tensors: `token_embd` (f16), `output_norm`, `blk.N.{attn_norm, ffn_norm,
  attn_sub_norm, ffn_sub_norm}` (f32), and the seven BitLinear weights
  `blk.N.{attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down}`
  in TQ2_0 or TQ1_0. No q/k permutation: llama.cpp runs "bitnet" with NeoX
  (rotate-half) RoPE, the HF / `bitnet_jax.model.layers.apply_rope` layout. No
  per-tensor `.scale` tensors (optional upstream): gamma lives in the blocks.
- metadata: `bitnet.{block_count, context_length, embedding_length,
  feed_forward_length, attention.head_count, attention.head_count_kv,
  attention.key_length, attention.value_length,
  attention.layer_norm_rms_epsilon, rope.freq_base, rope.scaling.type =
  linear, rope.scaling.factor = 1, vocab_size, hidden_activation}`,
  `general.file_type`, and `tokenizer.ggml.*` of a "gpt2" (byte-level BPE)
  vocabulary: tokens padded with "[PAD<i>]" to vocab_size, token types,
  merges, bos / eos / pad ids, and `pre` "gpt-2" (a ByteLevel pre-tokenizer
  with GPT-2's regex, as `bitnet_jax.data.tokenizer` trains), "llama-bpe"
  (Llama 3's split, as 2B4T) or else "default" with a warning. Upstream
  picks `pre` by hashing a test encoding, which no new vocabulary matches.

Scale precision: a TQ block stores its scale as f16, so a ternary weight
reads back as exactly `codes * float16(gamma)` (relative error of gamma
<= 2**-11). Codes are stored exactly. A weight whose row length (in_features)
is not a multiple of 256 cannot be TQ-packed; it falls back, with a warning,
to f16 `codes * float16(gamma)`: the same values, a loadable file.

Upstream limits (llama.cpp at the time of writing): the "bitnet" graph has no
`output` tensor (the LM head is `token_embd`), so a file of an untied model
(`lm_head.weight` written as `output.weight`) is refused with "wrong number of
tensors"; and its FFN is SiLU-gated whatever `hidden_activation` says, so a
"relu2" model (2B4T) runs with the wrong activation there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import gguf
import numpy as np
from absl import logging

from bitnet_jax.interop import hf

ARCH = "bitnet"
_QT, _FT = gguf.GGMLQuantizationType, gguf.LlamaFileType
TERNARY_TYPES = {"TQ2_0": (_QT.TQ2_0, _FT.MOSTLY_TQ2_0),
                 "TQ1_0": (_QT.TQ1_0, _FT.MOSTLY_TQ1_0)}
HIDDEN_ACTS = ("relu2", "silu")
# The pre-tokenizer Split regex of Llama 3's tokenizer.json ("llama-bpe").
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
                 r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|"
                 r"\s+")
_T = gguf.MODEL_TENSOR
_GLOBAL = {"model.embed_tokens.weight": _T.TOKEN_EMBD,
           "model.norm.weight": _T.OUTPUT_NORM, "lm_head.weight": _T.OUTPUT}
_NORMS = {"input_layernorm": _T.ATTN_NORM,
          "post_attention_layernorm": _T.FFN_NORM,
          "self_attn.attn_sub_norm": _T.ATTN_SUB_NORM,
          "mlp.ffn_sub_norm": _T.FFN_SUB_NORM}
_BITLINEAR = {"self_attn.q_proj": _T.ATTN_Q, "self_attn.k_proj": _T.ATTN_K,
              "self_attn.v_proj": _T.ATTN_V, "self_attn.o_proj": _T.ATTN_OUT,
              "mlp.gate_proj": _T.FFN_GATE, "mlp.up_proj": _T.FFN_UP,
              "mlp.down_proj": _T.FFN_DOWN}


def name_map(n_layers: int, tied: bool) -> dict[str, str]:
  """{HF tensor name: GGUF tensor name} of a model with `n_layers` blocks."""
  names = {hf: gguf.TENSOR_NAMES[t] + ".weight" for hf, t in _GLOBAL.items()
           if not (tied and t == _T.OUTPUT)}
  for i in range(n_layers):
    for part, t in {**_NORMS, **_BITLINEAR}.items():
      names[f"model.layers.{i}.{part}.weight"] = (
          gguf.TENSOR_NAMES[t].format(bid=i) + ".weight")
  return names


def _config(hf_config: Mapping) -> dict:
  """Checks `hf_config` for what the bitnet loader needs; returns its fields."""
  need = ("vocab_size", "hidden_size", "intermediate_size", "rms_norm_eps",
          "num_hidden_layers", "num_attention_heads", "hidden_act",
          "max_position_embeddings")
  missing = [k for k in need if hf_config.get(k) is None]
  if missing:
    raise ValueError(f"hf_config lacks {missing}")
  c = dict(hf_config)
  c["num_key_value_heads"] = c.get("num_key_value_heads") or (
      c["num_attention_heads"])
  if c["hidden_act"] not in HIDDEN_ACTS:
    raise ValueError(f"hf_config['hidden_act']={c['hidden_act']!r}: use one "
                     f"of {HIDDEN_ACTS}")
  heads, hidden = c["num_attention_heads"], c["hidden_size"]
  head_dim = c.get("head_dim") or hidden // heads
  if head_dim * heads != hidden or heads % c["num_key_value_heads"]:
    raise ValueError(f"hf_config: head_dim={head_dim} x num_attention_heads="
                     f"{heads} must equal hidden_size={hidden} and be a "
                     "multiple of num_key_value_heads (llama.cpp's bitnet "
                     "loader reads attn_q as [hidden, hidden])")
  c["head_dim"] = head_dim
  c["rope_theta"] = hf.rope_theta(c)  # refuses RoPE scaling
  c["tie_word_embeddings"] = bool(c.get("tie_word_embeddings", False))
  return c


def _expected_shapes(c: dict) -> dict[str, tuple[int, ...]]:
  v, h, f = c["vocab_size"], c["hidden_size"], c["intermediate_size"]
  kv = c["num_key_value_heads"] * c["head_dim"]
  per_layer = {"input_layernorm": (h,), "post_attention_layernorm": (h,),
               "self_attn.attn_sub_norm": (h,), "mlp.ffn_sub_norm": (f,),
               "self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h),
               "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, h),
               "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h),
               "mlp.down_proj": (h, f)}
  shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
  if not c["tie_word_embeddings"]:
    shapes["lm_head.weight"] = (v, h)
  for i in range(c["num_hidden_layers"]):
    for part, shape in per_layer.items():
      shapes[f"model.layers.{i}.{part}.weight"] = shape
  return shapes


def _check_names(arg: str, given: Mapping, expected: Mapping) -> None:
  def shape(n):  # ternary values are (codes, gamma)
    return np.shape(given[n][0] if arg == "ternary" else given[n])

  problems = [f"missing {n}" for n in expected if n not in given]
  problems += [f"unexpected {n}" for n in given if n not in expected]
  problems += [f"{n}: shape {shape(n)}, expected {s}" for n, s in
               expected.items() if n in given and shape(n) != s]
  if problems:
    raise ValueError(f"{arg} does not fit hf_config:\n  " +
                     "\n  ".join(problems[:40]))


def _pack_ternary(name: str, codes: np.ndarray, gamma: float,
                  qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, bool]:
  """Packs `codes * f16(gamma)`: (uint8 blocks of `qtype` or f16, packed?)."""
  codes = np.asarray(codes)
  if not ((codes == -1) | (codes == 0) | (codes == 1)).all():
    raise ValueError(f"ternary[{name!r}]: codes must lie in {{-1, 0, 1}}")
  g16 = np.float16(gamma)
  if not np.isfinite(g16) or g16 == 0:
    raise ValueError(f"ternary[{name!r}]: gamma={gamma} is not representable "
                     "as a nonzero float16 (the TQ block scale)")
  if codes.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
    logging.warning("gguf export: %s has rows of %d, not a multiple of 256: "
                    "stored as f16 instead of %s", name, codes.shape[-1],
                    qtype.name)
    return codes.astype(np.float16) * g16, False
  # Codes with scale 1 pack exactly; then every block's f16 scale (its last
  # two bytes in TQ1_0 and TQ2_0) becomes gamma.
  packed = gguf.quants.quantize(codes.astype(np.float32), qtype)
  blocks = packed.reshape(codes.shape[0], -1, gguf.GGML_QUANT_SIZES[qtype][1])
  blocks[..., -2:] = np.array([g16]).view(np.uint8)
  return blocks.reshape(packed.shape), True


def _pre_tokenizer(pre: Mapping | None) -> str:
  """The llama.cpp `tokenizer.ggml.pre` name of a tokenizer.json splitter."""
  def byte_level(p, use_regex):
    return (p or {}).get("type") == "ByteLevel" and not p.get(
        "add_prefix_space", False) and p.get("use_regex", True) == use_regex

  if byte_level(pre, True):
    return "gpt-2"  # GPT-2's regex inside ByteLevel: llama.cpp's "gpt-2"
  parts = (pre or {}).get("pretokenizers") or []
  if (len(parts) == 2 and parts[0].get("type") == "Split" and
      (parts[0].get("pattern") or {}).get("Regex") == _LLAMA3_REGEX and
      byte_level(parts[1], False)):
    return "llama-bpe"
  logging.warning("gguf export: pre-tokenizer %s is neither GPT-2's nor Llama "
                  "3's; writing 'default' (llama.cpp may split text "
                  "differently)", json.dumps(pre)[:200])
  return "default"


def _vocab(path: str, vocab_size: int) -> tuple[list, list, list, str]:
  """(tokens, token types, merges, pre name) as upstream's _set_vocab_gpt2."""
  with open(path, encoding="utf-8") as f:
    tok = json.load(f)
  model = tok.get("model") or {}
  if model.get("type") != "BPE":
    raise ValueError(f"tokenizer_json={path!r}: model type "
                     f"{model.get('type')!r}; only BPE is supported")
  added = {t["content"]: t for t in tok.get("added_tokens") or []}
  by_id = {i: s for s, i in model["vocab"].items()}
  by_id.update({t["id"]: s for s, t in added.items()})
  if max(by_id) >= vocab_size:
    raise ValueError(f"tokenizer_json={path!r} has id {max(by_id)} >= "
                     f"hf_config['vocab_size']={vocab_size}")
  tokens, types = [], []
  for i in range(vocab_size):
    s = by_id.get(i)
    if s is None:  # embedding rows past the tokenizer, as upstream pads
      tokens.append(f"[PAD{i}]")
      types.append(gguf.TokenType.UNUSED)
      continue
    tokens.append(s)
    if s not in added:
      types.append(gguf.TokenType.NORMAL)
    elif added[s].get("special") or (s.startswith("<|") and s.endswith("|>")):
      types.append(gguf.TokenType.CONTROL)
    else:
      types.append(gguf.TokenType.USER_DEFINED)
  merges = [m if isinstance(m, str) else " ".join(m)
            for m in model.get("merges") or []]
  return tokens, types, merges, _pre_tokenizer(tok.get("pre_tokenizer"))


def _token_id(c: dict, key: str) -> int | None:
  """hf_config[key] checked; of a list the first (llama.cpp keeps one id and
  finds the other end-of-generation tokens by their text)."""
  value = c.get(key)
  if isinstance(value, (list, tuple)):
    value = value[0] if value else None
  if value is not None and not 0 <= int(value) < c["vocab_size"]:
    raise ValueError(f"hf_config[{key!r}]={value} is outside the vocabulary")
  return None if value is None else int(value)


def write_gguf(path: str, *, hf_config: dict, tensors: dict[str, np.ndarray],
               ternary: dict[str, tuple[np.ndarray, float]],
               tokenizer_json: str, ternary_type: str = "TQ2_0") -> None:
  """Writes a BitNet b1.58 model as a llama.cpp "bitnet" GGUF file.

  Args:
    path: the .gguf file to write.
    hf_config: an HF `BitNetConfig` as a dict (vocab_size, hidden_size,
      intermediate_size, num_hidden_layers, num_attention_heads,
      num_key_value_heads, rms_norm_eps, rope_theta or rope_parameters,
      max_position_embeddings, tie_word_embeddings, hidden_act "relu2" |
      "silu", bos_token_id, eos_token_id, optional head_dim, pad_token_id).
    tensors: HF name -> float32 array in HF orientation: embed_tokens
      `[vocab, hidden]` (stored f16), lm_head `[vocab, hidden]` (untied only,
      f16), the norms `[hidden]` / ffn_sub_norm `[intermediate]` (f32).
    ternary: HF name of each BitLinear weight -> (codes int8 `[out, in]` in
      {-1, 0, 1}, gamma float); the model's weight is codes * gamma.
    tokenizer_json: a HF tokenizers byte-level BPE `tokenizer.json`.
    ternary_type: "TQ2_0" (2.06 bits/weight, faster) or "TQ1_0" (1.69).

  Raises:
    ValueError: naming the argument that is unsupported or does not fit.
  """
  if ternary_type not in TERNARY_TYPES:
    raise ValueError(f"ternary_type={ternary_type!r}: use one of "
                     f"{', '.join(TERNARY_TYPES)}")
  qtype, ftype = TERNARY_TYPES[ternary_type]
  c = _config(hf_config)
  shapes = _expected_shapes(c)
  is_ternary = {n: hf.is_bitlinear(n)
                for n in shapes}
  _check_names("ternary", ternary, {n: s for n, s in shapes.items()
                                    if is_ternary[n]})
  _check_names("tensors", tensors, {n: s for n, s in shapes.items()
                                    if not is_ternary[n]})
  names = name_map(c["num_hidden_layers"], c["tie_word_embeddings"])
  if not c["tie_word_embeddings"]:
    logging.warning("gguf export: untied lm_head written as output.weight; "
                    "upstream llama.cpp's bitnet loader has no output tensor "
                    "and will refuse this file")
  if c["hidden_act"] != "silu":
    logging.warning("gguf export: hidden_act=%r; upstream llama.cpp's bitnet "
                    "graph applies SiLU", c["hidden_act"])

  writer = gguf.GGUFWriter(path, ARCH)
  writer.add_block_count(c["num_hidden_layers"])
  writer.add_context_length(c["max_position_embeddings"])
  writer.add_embedding_length(c["hidden_size"])
  writer.add_feed_forward_length(c["intermediate_size"])
  writer.add_head_count(c["num_attention_heads"])
  writer.add_head_count_kv(c["num_key_value_heads"])
  writer.add_key_length(c["head_dim"])
  writer.add_value_length(c["head_dim"])
  writer.add_rope_freq_base(c["rope_theta"])
  writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
  writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
  writer.add_rope_scaling_factor(1.0)
  writer.add_vocab_size(c["vocab_size"])
  writer.add_string(f"{ARCH}.hidden_activation", c["hidden_act"])
  writer.add_file_type(ftype)
  writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
  tokens, types, merges, pre = _vocab(tokenizer_json, c["vocab_size"])
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  writer.add_token_types(types)
  writer.add_token_merges(merges)
  for key, add in (("bos_token_id", writer.add_bos_token_id),
                   ("eos_token_id", writer.add_eos_token_id),
                   ("pad_token_id", writer.add_pad_token_id)):
    if (token := _token_id(c, key)) is not None:
      add(token)

  for hf_name in shapes:
    if is_ternary[hf_name]:
      codes, gamma = ternary[hf_name]
      data, packed = _pack_ternary(hf_name, codes, gamma, qtype)
      writer.add_tensor(names[hf_name], data,
                        raw_dtype=qtype if packed else None)
      continue
    data = np.asarray(tensors[hf_name], dtype=np.float32)
    if data.ndim > 1:
      data = data.astype(np.float16)
      if not np.isfinite(data).all():
        raise ValueError(f"tensors[{hf_name!r}] overflows float16")
    writer.add_tensor(names[hf_name], data)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def read_gguf(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """Reads a file of `write_gguf` back, for verification.

  Returns:
    (metadata, tensors): every KV field but the GGUF.* header ones, decoded
    (strings, numbers, lists), plus "_tensor_types" {HF name: GGML type name};
    and {HF name: float32 array in HF orientation}, ternary weights
    dequantized (codes * float16(gamma)).
  """
  reader = gguf.GGUFReader(path)
  meta = {name: field.contents() for name, field in reader.fields.items()
          if not name.startswith("GGUF.")}
  arch = meta["general.architecture"]
  n_layers = meta[f"{arch}.block_count"]
  hf_names = {g: h for h, g in name_map(n_layers, tied=False).items()}
  tensors, types = {}, {}
  for t in reader.tensors:
    if t.name not in hf_names:
      raise ValueError(f"{path}: unexpected tensor {t.name!r}")
    name = hf_names[t.name]
    values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    tensors[name] = np.array(values, dtype=np.float32).reshape(
        tuple(reversed([int(d) for d in t.shape])))
    types[name] = t.tensor_type.name
  meta["_tensor_types"] = types
  return meta, tensors
