"""The seeds' remedies: entropy bonus, dropout, quantization warmup, mHC-lite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitnet_jax.model import residual
from bitnet_jax.model.layers import BitLinear
from bitnet_jax.model.transformer import Transformer, bind, quantization_blend
from bitnet_jax.quant import quantizers
from bitnet_jax.training import loss

from drivers import next_token_loss, params_of


def _model(tiny_config, **overrides):
  config = tiny_config.model
  config.update(overrides)
  return Transformer(config, rngs=nnx.Rngs(0))


def _tokens(tiny_config, shape=(2, 16), seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 0,
                            tiny_config.model.vocab_size)


@pytest.mark.slow
def test_entropy_weight_subtracts_beta_times_the_entropy():
  logits = jax.random.normal(jax.random.key(0), (3, 5, 11)) * 3
  targets = jax.random.randint(jax.random.key(1), (3, 5), 0, 11)
  plain = loss.logit_outputs(logits, targets)
  bonus = loss.logit_outputs(logits, targets, entropy_weight=0.3)
  probs = jax.nn.softmax(logits, -1)
  entropy = -jnp.sum(probs * jnp.log(probs), -1)
  np.testing.assert_allclose(plain["entropy"], entropy, rtol=1e-5,
                             err_msg="entropy is not -sum p log p")
  np.testing.assert_allclose(bonus["loss"], plain["nll"] - 0.3 * entropy,
                             rtol=1e-5, err_msg="loss != nll - beta H")
  np.testing.assert_array_equal(bonus["nll"], plain["nll"])


def test_entropy_bonus_gradient_flattens_the_prediction():
  logits = jnp.array([[4.0, 0.0, 0.0, 0.0]])
  targets = jnp.array([0])

  def objective(x, weight):
    return loss.logit_outputs(x, targets, entropy_weight=weight)["loss"][0]

  step = logits - 1.0 * jax.grad(objective)(logits, 5.0)
  entropy = loss.logit_outputs(step, targets)["entropy"][0]
  before = loss.logit_outputs(logits, targets)["entropy"][0]
  assert entropy > before, f"a step on a big entropy bonus lowered the " \
      f"entropy {before:.3f} -> {entropy:.3f}"


@pytest.mark.slow
def test_dropout_acts_in_training_only(tiny_config):
  model = _model(tiny_config, dropout_rate=0.3)
  tokens = _tokens(tiny_config)
  reference = _model(tiny_config, dropout_rate=0.0)(tokens)
  np.testing.assert_array_equal(model(tokens), reference,
                                "without a key (eval) dropout must be off")
  first = model(tokens, dropout_key=jax.random.key(1))
  again = model(tokens, dropout_key=jax.random.key(1))
  other = model(tokens, dropout_key=jax.random.key(2))
  np.testing.assert_array_equal(first, again, "same key, other masks")
  assert not np.allclose(first, reference, atol=1e-3), "dropout has no effect"
  assert not np.allclose(first, other, atol=1e-3), "the key is ignored"


def test_quantization_blend_ramps_from_0_to_1(tiny_config):
  values = [float(quantization_blend(s, 100)) for s in (0, 25, 100, 500)]
  assert values == [0.0, 0.25, 1.0, 1.0], values
  assert quantization_blend(7, 0) is None, "warmup off: no blend"


def test_the_models_step_sets_its_blend_from_full_precision_to_ternary(
    tiny_config):
  plain = _model(tiny_config, quantization="ternary")
  full = _model(tiny_config, quantization="none")  # same seed, same weights
  warming = _model(tiny_config, quantization="ternary",
                   quantization_warmup_steps=100)
  graphdef, params = params_of(warming)
  tokens = _tokens(tiny_config)
  np.testing.assert_allclose(bind(graphdef, params, 0)(tokens), full(tokens),
                             rtol=1e-5, atol=1e-5,
                             err_msg="step 0 of a warm-up is not the fp model")
  np.testing.assert_allclose(bind(graphdef, params, 100)(tokens),
                             plain(tokens), rtol=1e-5, atol=1e-5,
                             err_msg="the warm-up's end is not ternary")
  halfway = bind(graphdef, params, 50)
  assert float(halfway.quantization_blend()) == 0.5
  assert not np.allclose(halfway(tokens), plain(tokens), atol=1e-4), (
      "halfway through the warm-up the model is already ternary")


def test_parameters_without_a_step_are_not_a_model(tiny_config):
  graphdef, params = params_of(
      _model(tiny_config, quantization_warmup_steps=100))
  with pytest.raises(ValueError):  # the step cannot be forgotten
    nnx.merge(graphdef, params)


def test_blend_mixes_values_and_keeps_the_straight_through_gradient():
  layer = BitLinear(8, 4, quantization="ternary", init_std=0.5,
                    dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (3, 8))
  w = layer.kernel[...]
  lam = jnp.float32(0.25)
  x_mix = x + lam * (quantizers.activation_quant(x) - x)
  w_mix = w + lam * (quantizers.weight_quant(w) - w)
  np.testing.assert_allclose(layer(x, lam), x_mix @ w_mix, rtol=1e-5,
                             err_msg="not (x + l(Q(x)-x)) @ (W + l(Q(W)-W))")
  grad = jax.grad(lambda x: jnp.sum(layer(x, lam)))(x)
  np.testing.assert_allclose(grad, jnp.broadcast_to(
      jnp.sum(w_mix, axis=1), x.shape), rtol=1e-5,
                             err_msg="the input gradient is not the STE's")


@pytest.mark.parametrize("streams", [2, 3, 4])
def test_mixing_matrix_is_doubly_stochastic(streams):
  count = len(residual.permutation_matrices(streams))
  for seed in range(5):
    logits = 3 * jax.random.normal(jax.random.key(seed), (count,))
    h = np.asarray(residual.mixing_matrix(logits))
    assert (h >= 0).all(), f"negative entries:\n{h}"
    np.testing.assert_allclose(h.sum(0), 1, rtol=1e-6, err_msg="columns")
    np.testing.assert_allclose(h.sum(1), 1, rtol=1e-6, err_msg="rows")


def test_two_streams_mix_identity_and_swap_by_a_sigmoid():
  h = np.asarray(residual.mixing_matrix(jnp.array([1.3, -0.4])))
  alpha = 1 / (1 + np.exp(-(1.3 + 0.4)))
  np.testing.assert_allclose(h, [[alpha, 1 - alpha], [1 - alpha, alpha]],
                             rtol=1e-6)


def test_the_product_over_many_layers_has_gain_at_most_1():
  keys = jax.random.split(jax.random.key(0), 64)
  product = np.eye(4)
  for key in keys:
    h = residual.mixing_matrix(4 * jax.random.normal(key, (24,)))
    product = np.asarray(h) @ product
  gain = np.linalg.norm(product, 2)
  assert gain <= 1 + 1e-5, f"spectral norm {gain} of 64 mixed layers > 1"


@pytest.mark.slow
def test_mhc_lite_starts_at_alpha_half_and_bypasses_no_block(tiny_config):
  model = _model(tiny_config, residual="mhc_lite", residual_streams=2,
                 scan_layers=False)
  for i, block in enumerate(model.layers):
    for hyper in (block.attn_hc, block.mlp_hc):
      np.testing.assert_allclose(
          residual.mixing_matrix(hyper.res_logits[...]),
          [[0.5, 0.5], [0.5, 0.5]], err_msg=f"block {i}: alpha != 0.5")
  graphdef, params = params_of(model)
  tokens = _tokens(tiny_config)
  window = jnp.concatenate([tokens, tokens[:, :1]], axis=1)

  def objective(params):
    return next_token_loss(bind(graphdef, params, 0), window)[0]

  grads = jax.grad(objective)(params)
  for i, block in grads["layers"].items():
    for part, name in (("self_attn", "q_proj"), ("mlp", "down_proj")):
      norm = float(jnp.linalg.norm(block[part][name]["kernel"]))
      assert norm > 1e-6, f"block {i} {name}: no gradient (bypassed)"


def test_mhc_lite_streams_separate_and_their_mixing_learns(tiny_config):
  model = _model(tiny_config, residual="mhc_lite", residual_streams=2,
                 scan_layers=False)
  graphdef, params = params_of(model)
  tokens = _tokens(tiny_config)
  window = jnp.concatenate([tokens, tokens[:, :1]], axis=1)

  def objective(params):
    return next_token_loss(bind(graphdef, params, 0), window)[0]

  params = jax.tree.map(lambda p, g: p - 0.5 * g, params,
                        jax.grad(objective)(params))  # one SGD step
  grads = jax.grad(objective)(params)
  for i, block in grads["layers"].items():
    for name in ("attn_hc", "mlp_hc"):
      # The first H_res mixes n copies of the embedding and the last one
      # feeds the streams' sum: doubly stochastic, they act as the identity.
      if (i, name) in ((0, "attn_hc"), (len(grads["layers"]) - 1, "mlp_hc")):
        continue
      norm = float(jnp.linalg.norm(block[name]["res_logits"]))
      assert norm > 1e-7, (
          f"block {i} {name}: no gradient on the mixing logits after a "
          "step: the streams are still identical copies")


def test_an_mhc_lite_model_refuses_the_hf_export(tiny_config):
  from bitnet_jax.interop import hf  # pylint: disable=g-import-not-at-top
  tiny_config.model.residual = "mhc_lite"
  with pytest.raises(hf.ConversionError, match="config.model.residual"):
    hf.hf_config(tiny_config.model, max_position_embeddings=32,
                 bos_token_id=0, eos_token_id=0, torch_dtype="float32",
                 quantization=None)


def test_mhc_lite_logits_get_no_weight_decay(tiny_config):
  from bitnet_jax.optim import optimizer  # pylint: disable=g-import-not-at-top
  model = _model(tiny_config, residual="mhc_lite")
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  mask = optimizer.weight_decay_mask(params, decay_embeddings=True)
  hyper = mask["layers"]["attn_hc"]
  assert not any(jax.tree.leaves(hyper)), f"mHC logits decayed: {hyper}"
  assert mask["layers"]["self_attn"]["q_proj"]["kernel"], (
      "the BitLinear kernels must still be decayed")
