"""Hugging Face import, checked by transformers itself (torch on CPU).

A random 2B-4T-shaped `BitNetForCausalLM` built by transformers (in the
vocabulary and tokenizer of the session's tiny run, tests/conftest.py) is
imported in its latent and packed forms, scored, fine-tuned and exported
again, compared tensor by tensor; bad folders and configs are refused.
"""

import json
import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # HF's packed path compiles

import jax
import numpy as np
import pytest
import tokenizers
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file as torch_save_file
from transformers import AutoModelForCausalLM
from transformers.integrations.bitnet import pack_weights

from bitnet_jax.config import ConfigError
from bitnet_jax.interop import exporter, hf, importer
from bitnet_jax.runs import reader
from bitnet_jax.training import loop

from drivers import assert_logits_match as _assert_logits_match
from drivers import (
  hf_latent_folder,
  hf_logits,
  load_config,
  run_logits,
  write_hf_config,
)


@pytest.fixture(scope="module")
def hf_latent(tmp_path_factory, trained_run):
  """A random HF model with online quantization, float32 tensors, in the
  session run's vocabulary and tokenizer."""
  return hf_latent_folder(str(tmp_path_factory.mktemp("hf_latent")),
                          trained_run, torch.float32)


@pytest.fixture(scope="module")
def hf_latent_bf16(tmp_path_factory, trained_run):
  """The same in the -bf16 release's form: bf16 tensors."""
  return hf_latent_folder(str(tmp_path_factory.mktemp("hf_latent_bf16")),
                          trained_run, torch.bfloat16)


@pytest.fixture(scope="module")
def tokens(trained_run):
  vocab = reader.load_run_config(trained_run).model.vocab_size
  return np.random.default_rng(0).integers(0, vocab, (8, 16), np.int32)


def _pack_folder(latent: str, folder: str, linear_class: str,
                 dtype=torch.bfloat16) -> str:
  """The packed form of `latent`, made with transformers' own pack_weights.

  `dtype` is that of the scales and the unpacked tensors.
  """
  os.makedirs(folder)
  tensors = {}
  for name, value in load_file(os.path.join(latent, "model.safetensors")
                               ).items():
    weight = torch.tensor(value.astype(np.float32))
    if hf.is_bitlinear(name):  # HF's WeightQuant formula
      scale = 1.0 / weight.abs().mean().clamp(min=1e-5)
      codes = (weight * scale).round().clamp(-1, 1)
      tensors[name] = pack_weights(codes.clone())
      gamma = 1.0 / scale
      stored = gamma if linear_class == "autobitlinear" else scale
      tensors[name[:-6] + "weight_scale"] = stored.reshape(1).to(dtype)
    else:
      tensors[name] = weight.to(dtype)
  torch_save_file(tensors, os.path.join(folder, "model.safetensors"),
                  metadata={"format": "pt"})
  with open(os.path.join(latent, "config.json")) as f:
    config = json.load(f)
  config["dtype"] = str(dtype).removeprefix("torch.")
  write_hf_config(folder, config,
                  hf.quantization_config(True, linear_class))
  for name in ("tokenizer.json",):
    with open(os.path.join(latent, name), "rb") as src, open(
        os.path.join(folder, name), "wb") as dst:
      dst.write(src.read())
  return folder


def test_an_imported_model_is_evaluated_with_its_context_and_bos(
    hf_latent, tmp_path):
  """lm-eval's backend on an imported run: the HF config's context and BOS,
  and the log-likelihood transformers gives (a BOS-prefixed text)."""
  from bitnet_jax.evaluation.backend import BitNetLM  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  importer.import_hf(hf_latent, workdir)
  with open(os.path.join(hf_latent, "config.json")) as f:
    source = json.load(f)
  lm = BitNetLM.from_run(workdir, batch_size=8)
  assert lm.max_length == source["max_position_embeddings"]
  assert lm.prefix_token_id == source["bos_token_id"]
  text = "def main(argv):\n    return 0\n"
  request = type("Request", (), {"args": ("", text)})()
  (ours, _), = lm.loglikelihood([request])
  ids = [lm.prefix_token_id] + lm.tok_encode(text)
  model = AutoModelForCausalLM.from_pretrained(hf_latent, dtype=torch.float32)
  with torch.no_grad():
    log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0], -1)
  theirs = float(log_probs[torch.arange(len(ids) - 1),
                           torch.tensor(ids[1:])].sum())
  assert ours == pytest.approx(theirs, rel=1e-4), (ours, theirs)


@pytest.mark.parametrize("form", ["latent", "bitlinear", "autobitlinear"])
def test_import_of_a_transformers_model_gives_its_logits(
    hf_latent, tokens, tmp_path, form):
  # float32 files: exact ties (see the export test) stay rare; and
  # transformers fails on a bf16 autobitlinear file loaded as float32
  # (bf16 activations meet float32 weights in F.linear)
  folder = hf_latent if form == "latent" else _pack_folder(
      hf_latent, str(tmp_path / "hf"), form, torch.float32)
  workdir = str(tmp_path / "run")
  importer.import_hf(folder, workdir)
  ours, _ = run_logits(workdir, tokens)
  _assert_logits_match(ours, hf_logits(folder, tokens),
                       f"{form} import vs transformers")


@pytest.mark.parametrize("form", ["latent", "bitlinear", "autobitlinear"])
def test_import_then_export_reproduces_the_safetensors(hf_latent_bf16,
                                                       tmp_path, form):
  folder = hf_latent_bf16 if form == "latent" else _pack_folder(
      hf_latent_bf16, str(tmp_path / "hf"), form)
  importer.import_hf(folder, str(tmp_path / "run"))
  out = exporter.export_hf(str(tmp_path / "run"), str(tmp_path / "out"),
                           "bf16" if form == "latent" else "packed")
  before = load_file(os.path.join(folder, "model.safetensors"))
  after = load_file(os.path.join(out, "model.safetensors"))
  before.pop("lm_head.weight", None)  # tied: transformers may store it
  assert sorted(before) == sorted(after), "tensor names differ"
  for name, value in before.items():
    assert after[name].dtype == value.dtype, f"{name}: dtype changed"
    np.testing.assert_array_equal(after[name].view(np.uint8),
                                  value.view(np.uint8),
                                  f"{form}: {name} changed in the round trip")


@pytest.mark.slow
def test_fine_tuning_an_import_starts_from_its_weights(hf_latent, tmp_path,
                                                       data_dir):
  workdir = str(tmp_path / "run")
  config_py = importer.import_hf(hf_latent, workdir)
  _, imported, _ = reader.load_run(workdir)
  frozen = {"data.data_dir": data_dir, "train.steps": 2,
            "train.batch_size": 8, "train.seq_len": 32,
            "train.eval_every": 2, "train.eval_batches": 1,
            "train.checkpoint_every": 2, "optimizer.warmup_steps": 0,
            "optimizer.learning_rate": 0.0,
            "optimizer.stage2_learning_rate": 0.0}  # weights must not move
  for target, extra in ((workdir, {}),
                        (str(tmp_path / "new"), {"train.init_from": workdir})):
    config = load_config(config_py, {**frozen, **extra})
    loop.train_and_evaluate(config, target)
    _, params, step = reader.load_run(target)
    assert step == 2, f"{target}: no step-2 checkpoint"
    for a, b in zip(jax.tree.leaves(imported), jax.tree.leaves(params)):
      np.testing.assert_array_equal(
          np.asarray(a), np.asarray(b),
          f"{target} did not start from the imported weights")


def test_unsupported_hf_configs_name_the_key(hf_latent, tmp_path):
  with open(os.path.join(hf_latent, "config.json")) as f:
    good = json.load(f)
  for key, value in (("model_type", "gpt2"), ("hidden_act", "gelu"),
                     ("attention_bias", True)):
    folder = tmp_path / key
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**good, key: value}))
    with pytest.raises(hf.ConversionError, match=key):
      importer.import_hf(str(folder), str(tmp_path / f"run_{key}"))


def test_a_config_that_disagrees_with_the_hf_model_names_the_field(
    hf_latent, tmp_path):
  with pytest.raises(hf.ConversionError,
                     match=r"config.model.n_heads=2 .* has 4"):
    importer.import_hf(hf_latent, str(tmp_path / "run"), "configs/tiny.py")


def test_a_missing_init_from_names_the_key(tmp_path, data_dir):
  config = load_config("configs/tiny.py", {
      "data.data_dir": data_dir, "train.init_from": str(tmp_path / "none")})
  with pytest.raises(ConfigError, match="train.init_from"):
    loop.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.slow
def test_fine_tuning_with_another_tokenizer_is_refused(hf_latent, tmp_path):
  data_dir = str(tmp_path / "data")
  workdir = str(tmp_path / "run")
  importer.import_hf(hf_latent, workdir)
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel()
  tokenizer.train_from_iterator(["another corpus"] * 10,
                                tokenizers.trainers.BpeTrainer(
                                    special_tokens=["<|endoftext|>"]))
  tokenizer.save(str(tmp_path / "other.json"))
  other = {"data.data_dir": data_dir, "train.steps": 2,
           "optimizer.warmup_steps": 0,
           "train.batch_size": 8, "train.seq_len": 32,
           "data.tokenizer_path": str(tmp_path / "other.json")}
  config = load_config(f"{workdir}/config.py", other)
  with pytest.raises(ConfigError, match="tokenizer"):  # the import itself
    loop.train_and_evaluate(config, workdir)
  assert not os.path.exists(os.path.join(data_dir, "tokens")), (
      "the corpus was tokenized before the tokenizer was refused")
  config = load_config(f"{workdir}/config.py",
                       {**other, "train.init_from": workdir})
  with pytest.raises(ConfigError, match="train.init_from"):  # a new run
    loop.train_and_evaluate(config, str(tmp_path / "new"))


def test_a_corrupt_or_missing_weight_file_is_named(hf_latent, tmp_path):
  folder = tmp_path / "hf"
  folder.mkdir()
  for name in ("config.json", "tokenizer.json"):
    (folder / name).write_bytes(open(os.path.join(hf_latent, name),
                                     "rb").read())
  with pytest.raises(hf.ConversionError, match=r"holds no \*\.safetensors"):
    importer.import_hf(str(folder), str(tmp_path / "run1"))
  (folder / "model.safetensors").write_bytes(b"\x07not a safetensors file")
  with pytest.raises(hf.ConversionError, match="model.safetensors"):
    importer.import_hf(str(folder), str(tmp_path / "run2"))
  assert not os.path.exists(tmp_path / "run2" / "checkpoints"), (
      "a failed import left a checkpoint behind")


def test_import_refuses_a_used_workdir(hf_latent, tmp_path):
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.json").write_text("{}")
  with pytest.raises(hf.ConversionError, match="not empty"):
    importer.import_hf(hf_latent, str(tmp_path / "run"))

