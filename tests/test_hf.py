"""Hugging Face interop, checked by transformers itself (torch on CPU).

A tiny trained run (GQA, relu2, RoPE theta 5e5, tied embeddings: the 2B-4T
architecture at toy size) is exported and loaded by `BitNetForCausalLM`; a
random `BitNetForCausalLM` built by transformers is imported; imports are
exported again and compared tensor by tensor.
"""

import json
import os
import shutil
import subprocess
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # HF's packed path compiles

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
from safetensors.numpy import load_file
from safetensors.torch import save_file as torch_save_file
from transformers import (AutoModelForCausalLM, AutoTokenizer, BitNetConfig,
                          BitNetForCausalLM)
from transformers.integrations.bitnet import pack_weights, unpack_weights

from bitnet_jax import convert
from bitnet_jax.interop import gguf
from bitnet_jax.interop import hf
from bitnet_jax.quant import quantizers
from bitnet_jax.runs import reader
from bitnet_jax.training import loop
from bitnet_jax.config import ConfigError
from bitnet_jax.generate import greedy
from bitnet_jax.model.layout import unstack_layers
from drivers import REPO, load_config
from drivers import assert_logits_match as _assert_logits_match
from drivers import relative_error as _relative_error

def _hf_logits(folder: str, tokens: np.ndarray) -> np.ndarray:
  model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def _our_logits(workdir: str, tokens: np.ndarray):
  _, model, _ = reader.load_model(workdir)
  return np.asarray(model(jnp.asarray(tokens))), model


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, data_dir):
  """A tiny 2B-4T-shaped run trained for 30 steps (rows of 256: TQ2_0)."""
  config = load_config("configs/tiny.py", {
      "data.data_dir": data_dir, "model.d_model": 256, "model.ffn_dim": 512,
      "model.n_heads": 4, "model.n_kv_heads": 2,
      "model.ffn_activation": "relu2", "model.tie_embeddings": True,
      "model.rope_theta": 500000.0, "train.steps": 30,
      "train.eval_every": 30, "train.checkpoint_every": 30})
  workdir = str(tmp_path_factory.mktemp("trained"))
  loop.train_and_evaluate(config, workdir)
  return workdir


@pytest.fixture(scope="module")
def tokens(trained_run):
  vocab = reader.load_run_config(trained_run).model.vocab_size
  return np.random.default_rng(0).integers(0, vocab, (8, 16), np.int32)


def test_unrepresentable_scales_are_refused():
  codes = np.ones((4, 4), np.int8)
  for bad in (3e-6, 0.0, float("nan")):  # below the 1e-5 clamp, or no number
    with pytest.raises(hf.ConversionError, match="gamma"):
      hf.latent_from_codes(codes, bad)
  with pytest.raises(hf.ConversionError, match="weight_scale"):
    hf.gamma_from_scale(np.zeros(1), "bitlinear")


def test_pack_and_unpack_match_transformers_bit_for_bit():
  codes = np.random.default_rng(1).integers(-1, 2, (64, 24)).astype(np.int8)
  theirs = pack_weights(torch.tensor(codes, dtype=torch.int8).clone())
  np.testing.assert_array_equal(hf.pack_ternary(codes), theirs.numpy(),
                                "our packed bytes differ from HF's")
  np.testing.assert_array_equal(
      hf.unpack_ternary(theirs.numpy()),
      unpack_weights(theirs, dtype=torch.float32).numpy().astype(np.int8),
      "unpacking HF's bytes gives other codes than HF's unpack_weights")


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(64, 32), (5, 7), (256, 96),
                                   (6912, 2560)])  # 2B-4T's FFN
def test_latent_from_codes_requantizes_to_the_same_codes_and_scale(shape):
  rng = np.random.default_rng(sum(shape))
  codes = rng.integers(-1, 2, shape).astype(np.int8)
  gamma = np.float32(rng.uniform(0.001, 0.2))
  latent = hf.latent_from_codes(codes, gamma)
  got_codes, got_gamma = hf.ternary_codes(latent)
  np.testing.assert_array_equal(got_codes, codes, "codes changed")
  assert got_gamma == gamma, f"scale {got_gamma!r} != {gamma!r}"
  np.testing.assert_allclose(  # the training quantizer sees the same
      np.asarray(quantizers.weight_quant(jnp.asarray(latent))),
      codes * gamma, rtol=1e-5,  # its float32 mean, summed on device
      err_msg="weight_quant(latent) != codes * gamma")


EXPORTS = [("bf16", "float32"), ("packed", "float32"), ("bf16", "bfloat16"),
           ("packed", "bfloat16")]


def _export(trained_run: str, tmp_path, fmt: str, dtype: str
            ) -> tuple[str, str]:
  """(exported folder, a run holding exactly the file's weights)."""
  out = convert.export_hf(trained_run, str(tmp_path / fmt), fmt, dtype=dtype)
  if dtype == "float32":
    return out, trained_run
  reference = str(tmp_path / "reimported")  # bf16-rounded: read them back
  convert.import_hf(out, reference)
  return out, reference


@pytest.mark.slow
@pytest.mark.parametrize("fmt,dtype", EXPORTS)
def test_export_loads_in_transformers_with_our_logits_and_greedy_tokens(
    trained_run, tokens, tmp_path, fmt, dtype):
  """float32 files: logits to 1e-4. bfloat16 files: see below.

  In bf16 files the embeddings and norm weights are bf16 values, so ratios
  x * 127 / max|x| that land exactly on .5 are common (6 of 12,288 layer-0
  activations in one measured batch), and the two frameworks, rounding the
  RMSNorm differently in the last bit, break those ties differently: logits
  then agree to ~1e-2, not 1e-4. That each layer computes the same on
  identical inputs is checked to 1e-5 for every file by
  `test_each_exported_layer_matches_transformers_on_identical_inputs`.
  """
  out, reference = _export(trained_run, tmp_path, fmt, dtype)
  ours, model = _our_logits(reference, tokens)
  theirs = _hf_logits(out, tokens)
  if dtype == "float32":
    _assert_logits_match(ours, theirs, f"{fmt}/{dtype} export")
  else:
    assert _relative_error(ours, theirs) < 5e-2, (
        f"{fmt}/{dtype} export: logits differ by "
        f"{_relative_error(ours, theirs):.2e}, more than int8 ties explain")
  hf_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  generated = hf_model.generate(
      torch.tensor(tokens[:1, :8], dtype=torch.long), max_new_tokens=20,
      min_new_tokens=20, do_sample=False).numpy()[:, 8:]
  np.testing.assert_array_equal(
      greedy(model, tokens[:1, :8], 20), generated,
      f"{fmt}/{dtype}: greedy continuations differ")


@pytest.mark.parametrize("fmt,dtype", EXPORTS)
def test_each_exported_layer_matches_transformers_on_identical_inputs(
    trained_run, tmp_path, fmt, dtype):
  out, reference = _export(trained_run, tmp_path, fmt, dtype)
  hf_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  modules = dict(hf_model.named_modules())
  _, params, _ = reader.load_run(reference)
  rng = np.random.default_rng(2)
  checked = 0
  for name, kernel in hf.to_hf_tensors(params).items():
    if not hf.is_bitlinear(name):
      continue
    x = rng.normal(size=(3, 5, kernel.shape[1])).astype(np.float32)
    ours = np.asarray(quantizers.activation_quant(jnp.asarray(x))
                      @ quantizers.weight_quant(jnp.asarray(kernel.T)))
    with torch.no_grad():
      theirs = modules[name[:-len(".weight")]](torch.tensor(x)).numpy()
    assert _relative_error(ours, theirs) <= 1e-5, (
        f"{fmt}/{dtype}: {name} differs from transformers' layer by "
        f"{_relative_error(ours, theirs):.2e} on the same input")
    checked += 1
  assert checked == 7 * 2, f"checked {checked} BitLinear layers, not 14"


def _random_hf_model(folder: str, tokenizer_json: str, vocab: int,
                     dtype: torch.dtype) -> dict:
  """Saves a random 2B-4T-shaped BitNetForCausalLM; returns its config."""
  torch.manual_seed(0)
  config = BitNetConfig(
      vocab_size=vocab, hidden_size=64, intermediate_size=128,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      hidden_act="relu2", rms_norm_eps=1e-5, tie_word_embeddings=True,
      rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
      bos_token_id=0, eos_token_id=0)
  model = BitNetForCausalLM(config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):  # make the norms matter
        p.copy_(1 + 0.2 * torch.randn_like(p))
  model.to(dtype).save_pretrained(folder)
  with open(os.path.join(tokenizer_json), "rb") as f:
    tokenizer = f.read()
  with open(os.path.join(folder, "tokenizer.json"), "wb") as f:
    f.write(tokenizer)
  with open(os.path.join(folder, "config.json")) as f:
    saved = json.load(f)
  return saved


def _write_config(folder: str, config: dict, quantization: dict) -> None:
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({**config, "quantization_config": quantization}, f)


def _latent_folder(folder: str, trained_run: str, dtype) -> str:
  vocab = reader.load_run_config(trained_run).model.vocab_size
  config = _random_hf_model(folder, reader.tokenizer_path(trained_run), vocab,
                            dtype)
  _write_config(folder, config, hf.quantization_config(False, ""))
  return folder


@pytest.fixture(scope="module")
def hf_latent(tmp_path_factory, trained_run):
  """A random HF model with online quantization, float32 tensors."""
  return _latent_folder(str(tmp_path_factory.mktemp("hf_latent")),
                        trained_run, torch.float32)


@pytest.fixture(scope="module")
def hf_latent_bf16(tmp_path_factory, trained_run):
  """The same in the -bf16 release's form: bf16 tensors."""
  return _latent_folder(str(tmp_path_factory.mktemp("hf_latent_bf16")),
                        trained_run, torch.bfloat16)


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
  _write_config(folder, config, hf.quantization_config(True, linear_class))
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
  convert.import_hf(hf_latent, workdir)
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
  convert.import_hf(folder, workdir)
  ours, _ = _our_logits(workdir, tokens)
  _assert_logits_match(ours, _hf_logits(folder, tokens),
                       f"{form} import vs transformers")


@pytest.mark.parametrize("form", ["latent", "bitlinear", "autobitlinear"])
def test_import_then_export_reproduces_the_safetensors(hf_latent_bf16,
                                                       tmp_path, form):
  folder = hf_latent_bf16 if form == "latent" else _pack_folder(
      hf_latent_bf16, str(tmp_path / "hf"), form)
  convert.import_hf(folder, str(tmp_path / "run"))
  out = convert.export_hf(str(tmp_path / "run"), str(tmp_path / "out"),
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
  config_py = convert.import_hf(hf_latent, workdir)
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
      convert.import_hf(str(folder), str(tmp_path / f"run_{key}"))


def test_a_config_that_disagrees_with_the_hf_model_names_the_field(
    hf_latent, tmp_path):
  with pytest.raises(hf.ConversionError,
                     match=r"config.model.n_heads=2 .* has 4"):
    convert.import_hf(hf_latent, str(tmp_path / "run"), "configs/tiny.py")


def test_a_missing_init_from_names_the_key(tmp_path, data_dir):
  config = load_config("configs/tiny.py", {
      "data.data_dir": data_dir, "train.init_from": str(tmp_path / "none")})
  with pytest.raises(ConfigError, match="train.init_from"):
    loop.train_and_evaluate(config, str(tmp_path / "run"))


def _cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", *args], capture_output=True,
                        text=True, cwd=REPO, timeout=300, check=False)


@pytest.mark.slow
def test_command_lines_import_generate_and_export_gguf(trained_run,
                                                       hf_latent, tmp_path):
  """The README's commands, end to end, in fresh processes."""
  run = str(tmp_path / "imported")
  done = _cli("bitnet_jax.convert", "import-hf", f"--hf_dir={hf_latent}",
              f"--workdir={run}")
  assert done.returncode == 0, f"import-hf failed:\n{done.stderr[-2000:]}"
  assert f"--config={run}/config.py" in done.stdout, done.stdout
  done = _cli("bitnet_jax.generate", f"--workdir={run}", "--prompt=def ",
              "--max_new_tokens=5")
  assert done.returncode == 0, f"generate failed:\n{done.stderr[-2000:]}"
  assert done.stdout.startswith("def "), f"no continuation: {done.stdout!r}"
  text = tmp_path / "long.py"
  text.write_text("def main(argv):\n  return len(argv)\n" * 200)
  done = _cli("bitnet_jax.generate", f"--workdir={run}", "--debug",
              f"--text_file={text}")
  assert done.returncode == 0, f"generate --debug failed:\n{done.stderr}"
  assert "copy rate" in done.stdout and "scored the first" in done.stdout, (
      f"--debug did not say it cut the long text:\n{done.stdout[-600:]}")
  out = str(tmp_path / "gguf")
  done = _cli("bitnet_jax.convert", "export-hf", f"--workdir={trained_run}",
              f"--out={out}", "--format=gguf")
  assert done.returncode == 0, f"export gguf failed:\n{done.stderr[-2000:]}"
  metadata, tensors = gguf.read_gguf(done.stdout.strip())
  _, params, _ = reader.load_run(trained_run)
  ternary = 0
  for name, latent in hf.to_hf_tensors(params).items():
    if hf.is_bitlinear(name):
      codes, gamma = hf.ternary_codes(latent)
      expected = codes * np.float32(np.float16(gamma))
      ternary += 1
      assert metadata["_tensor_types"][name] == "TQ2_0", name
    else:
      stored = {"F16": np.float16, "F32": np.float32}[
          metadata["_tensor_types"][name]]
      expected = latent.astype(stored).astype(np.float32)
    np.testing.assert_array_equal(tensors[name], expected,
                                  f"GGUF {name} differs from ours")
  assert ternary == 14, f"{ternary} ternary tensors in the GGUF, not 14"


def test_export_of_a_missing_run_or_step_names_the_flag(trained_run,
                                                        tmp_path):
  with pytest.raises(ConfigError, match="--workdir"):
    convert.export_hf(str(tmp_path / "nothing"), str(tmp_path / "o1"), "bf16")
  with pytest.raises(ConfigError, match="--step=7"):
    convert.export_hf(trained_run, str(tmp_path / "o2"), "bf16", step=7)


def test_bitnet_2b4t_config_has_the_released_architecture():
  """Every tensor of transformers' 2B-4T model has our shape (transposed)."""
  config = load_config("configs/bitnet_2b4t.py")
  hf_config = BitNetConfig(tie_word_embeddings=True)  # defaults: 2B-4T
  with torch.device("meta"):
    theirs = {n: tuple(p.shape) for n, p in
              BitNetForCausalLM(hf_config).named_parameters()}
  ours = {}
  for path, x in jax.tree_util.tree_leaves_with_path(
      unstack_layers(reader.abstract_params(config.model))):
    name, transpose = hf.hf_name(tuple(
        getattr(k, "key", None) for k in path))
    ours[name] = tuple(x.shape)[::-1] if transpose else tuple(x.shape)
  assert ours == theirs, "shapes differ: " + str(
      {n: (ours.get(n), theirs.get(n)) for n in ours.keys() | theirs.keys()
       if ours.get(n) != theirs.get(n)})
  assert hf.model_fields(hf_config.to_dict(), "2B-4T") == {
      k: config.model[k] for k in hf.model_fields(hf_config.to_dict(), "")}, \
      "the HF defaults map to other model fields than the config's"


@pytest.mark.slow
def test_fine_tuning_with_another_tokenizer_is_refused(hf_latent, tmp_path,
                                                       data_dir):
  workdir = str(tmp_path / "run")
  convert.import_hf(hf_latent, workdir)
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
    convert.import_hf(str(folder), str(tmp_path / "run1"))
  (folder / "model.safetensors").write_bytes(b"\x07not a safetensors file")
  with pytest.raises(hf.ConversionError, match="model.safetensors"):
    convert.import_hf(str(folder), str(tmp_path / "run2"))
  assert not os.path.exists(tmp_path / "run2" / "checkpoints"), (
      "a failed import left a checkpoint behind")


def test_exported_tokenizer_loads_with_auto_tokenizer(trained_run, tmp_path):
  out = convert.export_hf(trained_run, str(tmp_path / "out"), "packed")
  theirs = AutoTokenizer.from_pretrained(out)
  ours = tokenizers.Tokenizer.from_file(reader.tokenizer_path(trained_run))
  text = "def main(argv):\n    return 0  # done\n"
  assert theirs(text)["input_ids"] == ours.encode(text).ids, (
      "AutoTokenizer encodes differently from the run's tokenizer")
  assert theirs.decode(ours.encode(text).ids) == text, "decode differs"
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  assert theirs.eos_token_id == config["eos_token_id"], (
      f"eos {theirs.eos_token_id} != config.json's {config['eos_token_id']}")


def test_a_failed_export_leaves_no_folder_and_a_used_one_is_refused(
    trained_run, tmp_path):
  out = tmp_path / "out"
  with pytest.raises(hf.ConversionError, match="linear_class"):
    convert.export_hf(trained_run, str(out), "packed", linear_class="bitnet")
  assert not out.exists() and not (tmp_path / "out.partial").exists(), (
      "a failed export left files behind")
  out.mkdir()
  (out / "keep.txt").write_text("user data")
  with pytest.raises(hf.ConversionError, match="--out"):
    convert.export_hf(trained_run, str(out), "bf16")
  assert (out / "keep.txt").read_text() == "user data"


def test_import_refuses_a_used_workdir(hf_latent, tmp_path):
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "config.json").write_text("{}")
  with pytest.raises(hf.ConversionError, match="not empty"):
    convert.import_hf(hf_latent, str(tmp_path / "run"))


def test_a_config_with_n_kv_heads_0_matches_an_hf_model_without_gqa(
    tmp_path):
  fields = {"n_heads": 2, "n_kv_heads": 2}  # HF: num_key_value_heads = heads
  config = convert._run_config(fields, "configs/tiny.py", str(tmp_path))
  assert config.model.n_kv_heads == 0, "the config's own value was replaced"


def test_a_config_json_from_before_n_kv_heads_loads_with_the_default(
    trained_run, tmp_path):
  old = tmp_path / "old_run"
  shutil.copytree(trained_run, old)
  saved = json.loads((old / "config.json").read_text())
  del saved["model"]["n_kv_heads"]  # as config.json was written before
  saved["model"]["n_heads"] = 2  # (its model then had plain attention)
  (old / "config.json").write_text(json.dumps(saved))
  config = reader.load_run_config(str(old))
  assert config.model.n_kv_heads == 0 and config.model.n_heads == 2, (
      "a missing key must take today's default")
