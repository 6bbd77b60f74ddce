"""Full-precision Llama / Qwen checkpoints imported (bitnet_jax.interop.hf_sources).

Tiny random `LlamaForCausalLM`s (default and Llama 3.1 RoPE),
`Qwen2ForCausalLM` (q/k/v biases) and `Qwen3ForCausalLM` (QK-norm, its own
head width) built and saved by transformers are imported;
with `--quantization=none --sub_norms=none` our model must be the source
model (logits and greedy tokens, float32, torch on CPU); `--sub_norms=insert`
may add only gain-1 sub-norms.
"""

import json
import os
import subprocess
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
  AutoModelForCausalLM,
  AutoTokenizer,
  LlamaConfig,
  LlamaForCausalLM,
  PreTrainedTokenizerFast,
  Qwen2Config,
  Qwen2ForCausalLM,
  Qwen3Config,
  Qwen3ForCausalLM,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from bitnet_jax.data.tokenizer import load_tokenizer
from bitnet_jax.interop import exporter, hf, importer
from bitnet_jax.model.decode import greedy
from bitnet_jax.model.layers import rope_frequencies
from bitnet_jax.model.layout import unstack_layers
from bitnet_jax.model.tree_paths import path_name
from bitnet_jax.runs import directory, reader

from drivers import REPO, assert_logits_match, load_config, relative_error

VOCAB = 320
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
DEFAULT_ROPE = {"rope_type": "default", "rope_theta": 10000.0}
# name -> (config class, model class, its keywords, what export refuses)
SOURCES = {
    "llama2": (LlamaConfig, LlamaForCausalLM,
               {"tie_word_embeddings": False,
                "rope_parameters": DEFAULT_ROPE}, None),
    "llama3_tied": (LlamaConfig, LlamaForCausalLM,
                    {"tie_word_embeddings": True,
                     "rope_parameters": LLAMA3_ROPE}, "rope_scaling"),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM,
              {"tie_word_embeddings": True,
               "rope_parameters": DEFAULT_ROPE}, "attention_bias"),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM,
              {"tie_word_embeddings": False, "head_dim": 32,
               "rope_parameters": DEFAULT_ROPE}, "qk_norm"),
}


def _tokenizer(folder: str) -> None:
  """A byte-level BPE tokenizer with a chat template, saved as
  transformers saves one (tokenizer.json, tokenizer_config.json, ...)."""
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(
      vocab_size=VOCAB - 8, special_tokens=["<s>", "</s>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(["def main(argv):\n    return 0\n" * 20,
                                 "import os, sys\n" * 20], trainer)
  fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>",
                                 eos_token="</s>")
  fast.chat_template = CHAT_TEMPLATE
  fast.save_pretrained(folder)


def _hf_folder(folder: str, name: str) -> str:
  """Saves a random float32 model of SOURCES[name] (GQA; norms and biases
  randomized so that they matter)."""
  torch.manual_seed(0)
  config_class, model_class, keywords, _ = SOURCES[name]
  config = config_class(
      vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=0,
      eos_token_id=1, **keywords)
  model = model_class(config)
  with torch.no_grad():
    for param_name, p in model.named_parameters():
      if param_name.endswith("norm.weight"):
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif param_name.endswith("bias"):
        p.copy_(0.5 * torch.randn_like(p))
  model.save_pretrained(folder)
  _tokenizer(folder)
  return folder


@pytest.fixture(scope="module", params=sorted(SOURCES))
def source(request, tmp_path_factory):
  folder = str(tmp_path_factory.mktemp(request.param + "_"))  # name_N
  return _hf_folder(folder, request.param)


def _tokens(seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(2, VOCAB, (2, 40))


def test_llama3_frequencies_equal_transformers():
  config = LlamaConfig(hidden_size=4096, num_attention_heads=32,
                       rope_parameters={**LLAMA3_ROPE,
                                        "original_max_position_embeddings":
                                        8192})
  theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
  model = load_config("configs/tiny.py").model
  model.update({"rope_theta": 500000.0, "rope_scaling": "llama3",
                "rope_scaling_factor": 8.0, "rope_original_context": 8192})
  ours = np.array(rope_frequencies(128, model))
  np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6, err_msg=(
      "Llama 3.1 RoPE frequencies differ from transformers'"))
  model.rope_scaling = "none"
  assert not np.allclose(np.array(rope_frequencies(128, model)), ours), (
      "the scaling changed no frequency")


def test_none_none_import_is_the_source_model(source, tmp_path):
  workdir = str(tmp_path / "run")
  importer.import_hf(source, workdir, quantization="none", sub_norms="none")
  config, model, _ = reader.load_model(workdir)
  assert (config.model.quantization, config.model.sub_norms) == ("none",
                                                                 False)
  tokens = _tokens()
  ours = np.asarray(model(jnp.asarray(tokens)))
  theirs_model = AutoModelForCausalLM.from_pretrained(source,
                                                      dtype=torch.float32)
  with torch.no_grad():
    theirs = theirs_model(torch.tensor(tokens)).logits.numpy()
  error = relative_error(ours, theirs)
  assert error <= 1e-4, f"logits differ from transformers' by {error:.2e}"
  prompt = tokens[:, :8]
  with torch.no_grad():
    hf_tokens = theirs_model.generate(
        torch.tensor(prompt), max_new_tokens=20, min_new_tokens=20,
        do_sample=False).numpy()[:, 8:]
  np.testing.assert_array_equal(greedy(model, prompt, 20), hf_tokens,
                                err_msg="greedy tokens differ")


def _flat_params(workdir: str) -> dict[str, np.ndarray]:
  _, model, _ = reader.load_model(workdir)
  from flax import nnx  # pylint: disable=g-import-not-at-top
  params = unstack_layers(jax.device_get(nnx.state(model, nnx.Param)))
  return {path_name(path): np.asarray(value) for path, value in
          jax.tree_util.tree_leaves_with_path(params)}


def test_inserting_sub_norms_adds_only_gain_one_norms(source, tmp_path):
  importer.import_hf(source, str(tmp_path / "plain"), quantization="none",
                     sub_norms="none")
  importer.import_hf(source, str(tmp_path / "subln"), quantization="none")
  plain, inserted = (_flat_params(str(tmp_path / name))
                     for name in ("plain", "subln"))
  added = set(inserted) - set(plain)
  assert set(plain) <= set(inserted), set(plain) - set(inserted)
  assert added and all("sub_norm" in name for name in added), added
  assert len(added) == 2 * 2, f"2 layers x 2 sub-norms, got {sorted(added)}"
  for name in added:
    assert np.all(inserted[name] == 1), f"{name} is not gain 1"
  for name, value in plain.items():
    np.testing.assert_array_equal(inserted[name], value, err_msg=name)


def test_default_import_is_ternary_with_sub_norms_and_the_tokenizer(
    source, tmp_path):
  workdir = str(tmp_path / "run")
  importer.import_hf(source, workdir)
  config = reader.load_run_config(workdir)
  assert config.model.quantization == "ternary" and config.model.sub_norms
  tokenizer = AutoTokenizer.from_pretrained(
      os.path.join(workdir, directory.HF_SOURCE))
  assert tokenizer.chat_template == CHAT_TEMPLATE
  assert (tokenizer.bos_token, tokenizer.eos_token) == ("<s>", "</s>")
  bos, eos = reader.special_token_ids(
      workdir, load_tokenizer(reader.tokenizer_path(workdir)))
  assert (bos, eos) == (0, 1)


def _with(folder: str, tmp_path, **changes) -> str:
  """A copy of `folder`'s config.json with `changes` (weights linked)."""
  out = tmp_path / "_".join(changes)
  out.mkdir()
  for name in os.listdir(folder):
    os.symlink(os.path.join(folder, name), out / name)
  with open(os.path.join(folder, "config.json")) as f:
    config = {**json.load(f), **changes}
  (out / "config.json").unlink()
  (out / "config.json").write_text(json.dumps(config))
  return str(out)


@pytest.mark.parametrize("changes,named", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4,
                          "factor": 4.0}}, "rope_type='yarn'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type='linear'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}},
     "factor"),
    ({"mlp_bias": True}, "mlp_bias"), ({"attention_bias": True},
                                       "attention_bias"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "gpt2"}, "Qwen3ForCausalLM"),
])
def test_unsupported_llama_configs_name_the_key(changes, named, tmp_path,
                                                 tmp_path_factory):
  folder = _hf_folder(str(tmp_path_factory.mktemp("src")), "llama2")
  with pytest.raises(hf.ConversionError, match=named.replace("[", r"\[")):
    importer.import_hf(_with(folder, tmp_path, **changes),
                       str(tmp_path / "run"))


def test_a_converted_model_exports_as_bitnet_or_is_refused(source, tmp_path):
  """Sub-norms inserted, default RoPE: `BitNetForCausalLM` gives our logits
  (int8 ties aside, as for every export); no sub-norms or llama3 RoPE:
  refused, naming the field, with no folder left."""
  workdir = str(tmp_path / "run")
  importer.import_hf(source, workdir)
  out = str(tmp_path / "hf")
  refused = SOURCES[os.path.basename(source).rsplit("_", 1)[0]][3]
  if refused:
    with pytest.raises(hf.ConversionError, match=refused):
      exporter.export_hf(workdir, out, "bf16", dtype="float32")
    assert not os.path.exists(out), "a refused export left files"
  else:
    exporter.export_hf(workdir, out, "bf16", dtype="float32")
    tokens = _tokens(1)
    _, model, _ = reader.load_model(workdir)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert type(exported).__name__ == "BitNetForCausalLM"
    with torch.no_grad():
      theirs = exported(torch.tensor(tokens)).logits.numpy()
    assert_logits_match(np.asarray(model(jnp.asarray(tokens))), theirs,
                        "converted Llama export")
    assert AutoTokenizer.from_pretrained(out).chat_template == CHAT_TEMPLATE
  plain = str(tmp_path / "plain")
  importer.import_hf(source, plain, sub_norms="none")
  with pytest.raises(hf.ConversionError, match="sub_norms"):
    exporter.export_hf(plain, str(tmp_path / "hf2"), "bf16")
  assert not os.path.exists(tmp_path / "hf2"), "a refused export left files"


@pytest.mark.slow
def test_command_line_takes_the_conversion_flags(tmp_path):
  source = _hf_folder(str(tmp_path / "qwen3"), "qwen3")

  def import_hf(*flags):
    return subprocess.run(
        [sys.executable, "-m", "bitnet_jax.convert", "import-hf",
         f"--hf_dir={source}", *flags], cwd=REPO, capture_output=True,
        text=True, timeout=300)

  workdir = str(tmp_path / "teacher")
  done = import_hf(f"--workdir={workdir}", "--quantization=none",
                   "--sub_norms=none")
  assert done.returncode == 0, done.stderr[-3000:]
  model = reader.load_run_config(workdir).model
  assert (model.quantization, model.sub_norms) == ("none", False)
  done = import_hf(f"--workdir={tmp_path / 'bad'}", "--sub_norms=maybe")
  assert done.returncode != 0 and "sub_norms" in done.stderr
  assert "Traceback" not in done.stderr, done.stderr[-2000:]
