"""Hugging Face tensor layout: ternary packing, scales and the 2B-4T shapes,
checked against transformers' own functions (torch on CPU)."""

import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # HF's packed path compiles

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import BitNetConfig, BitNetForCausalLM
from transformers.integrations.bitnet import pack_weights, unpack_weights

from bitnet_jax.interop import hf, importer
from bitnet_jax.model.layout import unstack_layers
from bitnet_jax.quant import quantizers
from bitnet_jax.runs import reader

from drivers import load_config


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


def test_a_config_with_n_kv_heads_0_matches_an_hf_model_without_gqa(
    tmp_path):
  fields = {"n_heads": 2, "n_kv_heads": 2}  # HF: num_key_value_heads = heads
  config = importer.run_config(fields, "configs/tiny.py", str(tmp_path))
  assert config.model.n_kv_heads == 0, "the config's own value was replaced"

