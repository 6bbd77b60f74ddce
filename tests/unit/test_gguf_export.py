"""GGUF export: a tiny BitNet model round-trips through write_gguf/read_gguf."""

import json

import gguf
import numpy as np
import pytest
from tokenizers import (
  Regex,
  Tokenizer,
  decoders,
  models,
  pre_tokenizers,
  trainers,
)

from bitnet_jax.interop import gguf as gguf_export

EOT = "<|endoftext|>"
BITLINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
              "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
              "mlp.down_proj")


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> str:
  """A byte-level BPE tokenizer.json of about 300 tokens, trained here."""
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=300, special_tokens=[EOT], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  text = ["the quick brown fox jumps over the lazy dog\n",
          "def main():\n    return 42  # the answer\n"] * 50
  tokenizer.train_from_iterator(text, trainer=trainer)
  path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
  tokenizer.save(path)
  return path


def _model(tokenizer_json: str, *, intermediate: int = 512,
           tied: bool = False, seed: int = 0):
  """(hf_config, tensors, ternary) of a 2-layer GQA model, random weights."""
  rng = np.random.default_rng(seed)
  n_tokens = Tokenizer.from_file(tokenizer_json).get_vocab_size()
  eot = Tokenizer.from_file(tokenizer_json).token_to_id(EOT)
  config = {"vocab_size": n_tokens + 5, "hidden_size": 256,
            "intermediate_size": intermediate, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "max_position_embeddings": 128, "tie_word_embeddings": tied,
            "hidden_act": "relu2", "bos_token_id": eot, "eos_token_id": eot}
  h, f, v = 256, intermediate, config["vocab_size"]
  shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (128, h),
            "self_attn.v_proj": (128, h), "self_attn.o_proj": (h, h),
            "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h),
            "mlp.down_proj": (h, f)}
  tensors = {"model.embed_tokens.weight": rng.normal(size=(v, h)),
             "model.norm.weight": rng.normal(size=h)}
  if not tied:
    tensors["lm_head.weight"] = rng.normal(size=(v, h))
  ternary = {}
  for i in range(2):
    prefix = f"model.layers.{i}."
    for norm, size in (("input_layernorm", h), ("post_attention_layernorm", h),
                       ("self_attn.attn_sub_norm", h),
                       ("mlp.ffn_sub_norm", f)):
      tensors[prefix + norm + ".weight"] = rng.normal(size=size)
    for part, shape in shapes.items():
      codes = rng.integers(-1, 2, size=shape).astype(np.int8)
      codes[0, :256] = 0  # an all-zero block (scale 0 in upstream's packing)
      ternary[prefix + part + ".weight"] = (
          codes, np.float32(rng.uniform(0.003, 0.05)))
  tensors = {n: t.astype(np.float32) for n, t in tensors.items()}
  return config, tensors, ternary


def _write_and_read(tmp_path, config, tensors, ternary, tokenizer_json,
                    **kwargs):
  """write_gguf to tmp_path/m.gguf, then read_gguf it: (metadata, tensors)."""
  path = str(tmp_path / "m.gguf")
  gguf_export.write_gguf(path, hf_config=config, tensors=tensors,
                         ternary=ternary, tokenizer_json=tokenizer_json,
                         **kwargs)
  return gguf_export.read_gguf(path)


@pytest.mark.parametrize("ternary_type", ["TQ2_0", "TQ1_0"])
def test_ternary_weights_read_back_as_codes_times_f16_gamma(
    tmp_path, tokenizer_json, ternary_type):
  config, tensors, ternary = _model(tokenizer_json)
  meta, read = _write_and_read(tmp_path, config, tensors, ternary,
                               tokenizer_json, ternary_type=ternary_type)
  for name, (codes, gamma) in ternary.items():
    expected = codes.astype(np.float32) * np.float32(np.float16(gamma))
    assert meta["_tensor_types"][name] == ternary_type, (
        f"{name} stored as {meta['_tensor_types'][name]}, not {ternary_type}")
    assert read[name].shape == codes.shape, f"{name}: shape {read[name].shape}"
    assert np.array_equal(read[name], expected), (
        f"{name} ({ternary_type}) does not read back as codes * f16(gamma)")
  assert meta["general.file_type"] == getattr(
      gguf.LlamaFileType, "MOSTLY_" + ternary_type), "wrong general.file_type"


def test_high_precision_tensors_match_their_stored_precision(
    tmp_path, tokenizer_json):
  config, tensors, ternary = _model(tokenizer_json, seed=1)
  meta, read = _write_and_read(tmp_path, config, tensors, ternary,
                               tokenizer_json)
  assert set(read) == set(tensors) | set(ternary), (
      f"tensor names differ: {set(read) ^ (set(tensors) | set(ternary))}")
  for name, value in tensors.items():
    stored = np.float16 if value.ndim == 2 else np.float32
    assert meta["_tensor_types"][name] == ("F16" if value.ndim == 2 else
                                           "F32"), f"{name} type"
    assert np.array_equal(read[name], value.astype(stored).astype(np.float32)
                          ), f"{name} does not match its {stored.__name__}"


def test_gguf_names_and_shapes_are_the_ones_llama_cpp_loads(
    tmp_path, tokenizer_json):
  config, tensors, ternary = _model(tokenizer_json, tied=True)
  path = str(tmp_path / "m.gguf")
  gguf_export.write_gguf(path, hf_config=config, tensors=tensors,
                         ternary=ternary, tokenizer_json=tokenizer_json)
  # ggml order: ne0 is the input dimension (src/models/bitnet.cpp shapes).
  h, v, kv = 256, config["vocab_size"], 128
  expected = {"token_embd.weight": [h, v], "output_norm.weight": [h]}
  for i in range(2):
    for name, shape in (("attn_norm", [h]), ("attn_sub_norm", [h]),
                        ("ffn_norm", [h]), ("ffn_sub_norm", [512]),
                        ("attn_q", [h, h]), ("attn_k", [h, kv]),
                        ("attn_v", [h, kv]), ("attn_output", [h, h]),
                        ("ffn_gate", [h, 512]), ("ffn_up", [h, 512]),
                        ("ffn_down", [512, h])):
      expected[f"blk.{i}.{name}.weight"] = shape
  reader = gguf.GGUFReader(path)
  written = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
  assert written == expected, f"GGUF tensors differ from upstream's: {written}"
  # Each GGUF name holds its HF tensor (k and v, gate and up share shapes).
  upstream = dict(zip(("attn_q", "attn_k", "attn_v", "attn_output",
                       "ffn_gate", "ffn_up", "ffn_down"), BITLINEARS))
  upstream.update(attn_norm="input_layernorm",
                  ffn_norm="post_attention_layernorm",
                  attn_sub_norm="self_attn.attn_sub_norm",
                  ffn_sub_norm="mlp.ffn_sub_norm")
  for t in reader.tensors:
    values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
    if t.name.startswith("blk."):
      _, i, part, _ = t.name.split(".")
      hf_name = f"model.layers.{i}.{upstream[part]}.weight"
    else:
      hf_name = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight"}[t.name]
    if hf_name in ternary:
      codes, gamma = ternary[hf_name]
      want = codes * np.float32(np.float16(gamma))
    else:
      want = tensors[hf_name].astype(np.float16 if t.name == "token_embd."
                                     "weight" else np.float32)
    assert np.array_equal(values.reshape(want.shape), want), (
        f"{t.name} does not hold {hf_name}")


def test_metadata_and_tokenizer(tmp_path, tokenizer_json):
  config, tensors, ternary = _model(tokenizer_json)
  meta, _ = _write_and_read(tmp_path, config, tensors, ternary,
                            tokenizer_json)
  checks = {"general.architecture": "bitnet", "bitnet.block_count": 2,
            "bitnet.embedding_length": 256,
            "bitnet.feed_forward_length": 512,
            "bitnet.attention.head_count": 4,
            "bitnet.attention.head_count_kv": 2,
            "bitnet.context_length": 128,
            "bitnet.rope.freq_base": 500000.0,
            "bitnet.attention.layer_norm_rms_epsilon": float(np.float32(1e-5)),
            "bitnet.vocab_size": config["vocab_size"],
            "bitnet.hidden_activation": "relu2",
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
            "tokenizer.ggml.bos_token_id": config["bos_token_id"],
            "tokenizer.ggml.eos_token_id": config["eos_token_id"]}
  for key, value in checks.items():
    assert meta.get(key) == value, f"{key}={meta.get(key)!r}, want {value!r}"
  tokenizer = Tokenizer.from_file(tokenizer_json)
  n = tokenizer.get_vocab_size()
  vocab = [tokenizer.id_to_token(i) for i in range(n)]
  tokens = meta["tokenizer.ggml.tokens"]
  assert len(tokens) == config["vocab_size"], "one token per embedding row"
  assert tokens[:n] == vocab, "tokens are not the vocabulary in id order"
  assert tokens[n:] == [f"[PAD{i}]" for i in range(n, len(tokens))], "pads"
  types = meta["tokenizer.ggml.token_type"]
  eot = tokenizer.token_to_id(EOT)
  assert types[eot] == gguf.TokenType.CONTROL, "<|endoftext|> is not CONTROL"
  assert types[eot + 1] == gguf.TokenType.NORMAL, "a BPE token not NORMAL"
  assert set(types[n:]) == {gguf.TokenType.UNUSED}, "pads are not UNUSED"
  saved = Tokenizer.from_file(tokenizer_json).to_str()
  merges = json.loads(saved)["model"]["merges"]
  assert meta["tokenizer.ggml.merges"] == [
      m if isinstance(m, str) else " ".join(m) for m in merges], "merges"


def test_llama3_style_pre_tokenizer_is_llama_bpe(tmp_path, tokenizer_json):
  tokenizer = Tokenizer.from_file(tokenizer_json)
  regex = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
           r"\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
  tokenizer.pre_tokenizer = pre_tokenizers.Sequence([  # as Llama 3 / 2B4T
      pre_tokenizers.Split(Regex(regex), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  llama3_json = str(tmp_path / "tokenizer.json")
  tokenizer.save(llama3_json)
  config, tensors, ternary = _model(tokenizer_json, tied=True)
  meta, _ = _write_and_read(tmp_path, config, tensors, ternary, llama3_json)
  assert meta["tokenizer.ggml.pre"] == "llama-bpe", meta["tokenizer.ggml.pre"]


def test_row_length_not_multiple_of_256_falls_back_to_f16(
    tmp_path, tokenizer_json):
  config, tensors, ternary = _model(tokenizer_json, intermediate=320)
  meta, read = _write_and_read(tmp_path, config, tensors, ternary,
                               tokenizer_json)
  for name, (codes, gamma) in ternary.items():
    want = "F16" if name.endswith("down_proj.weight") else "TQ2_0"
    assert meta["_tensor_types"][name] == want, f"{name}: not {want}"
    expected = codes.astype(np.float32) * np.float32(np.float16(gamma))
    assert np.array_equal(read[name], expected), f"{name} values changed"


def test_bad_arguments_raise_value_error_naming_them(tmp_path,
                                                     tokenizer_json):
  config, tensors, ternary = _model(tokenizer_json)
  path = str(tmp_path / "m.gguf")
  with pytest.raises(ValueError, match="ternary_type='Q4_0'"):
    gguf_export.write_gguf(path, hf_config=config, tensors=tensors,
                           ternary=ternary, tokenizer_json=tokenizer_json,
                           ternary_type="Q4_0")
  bad = dict(ternary)
  codes, gamma = bad["model.layers.0.mlp.up_proj.weight"]
  bad["model.layers.0.mlp.up_proj.weight"] = (codes * 2, gamma)
  with pytest.raises(ValueError, match=r"ternary\['model.layers.0.mlp.up_pro"):
    gguf_export.write_gguf(path, hf_config=config, tensors=tensors,
                           ternary=bad, tokenizer_json=tokenizer_json)
  missing = {n: t for n, t in tensors.items() if n != "model.norm.weight"}
  with pytest.raises(ValueError, match="missing model.norm.weight"):
    gguf_export.write_gguf(path, hf_config=config, tensors=missing,
                           ternary=ternary, tokenizer_json=tokenizer_json)
