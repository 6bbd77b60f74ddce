"""Fake quantization follows the FAQ's formulas with straight-through grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax import quant


def _reference_activation_quant(x: np.ndarray) -> np.ndarray:
  scale = 127.0 / np.maximum(np.abs(x).max(axis=-1, keepdims=True), 1e-5)
  return np.clip(np.round(x * scale), -128, 127) / scale


def _reference_weight_quant(w: np.ndarray) -> np.ndarray:
  gamma = max(np.abs(w).mean(), 1e-5)
  return np.clip(np.round(w / gamma), -1, 1) * gamma


def test_activation_quant_matches_per_token_absmax_formula():
  x = np.random.default_rng(0).normal(size=(3, 5, 16)).astype(np.float32)
  x[0, 0] *= 100.0  # one token with a large range must not affect the others
  np.testing.assert_allclose(
      quant.activation_quant(jnp.asarray(x)), _reference_activation_quant(x),
      rtol=1e-6, atol=1e-7,
      err_msg="activation_quant is not per-token absmax int8 fake quant")


def test_activation_quant_levels_are_int8_per_token():
  x = jax.random.normal(jax.random.key(1), (4, 64))
  q = np.asarray(quant.activation_quant(x))
  scale = 127.0 / np.abs(np.asarray(x)).max(axis=-1, keepdims=True)
  levels = q * scale
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-3,
                             err_msg="dequantized activations are not k/scale")
  assert levels.max() <= 127.5 and levels.min() >= -128.5, "outside int8 range"


def test_weight_quant_is_ternary_times_absmean():
  w = np.random.default_rng(2).normal(size=(32, 48)).astype(np.float32) * 0.02
  q = np.asarray(quant.weight_quant(jnp.asarray(w)))
  gamma = np.abs(w).mean()
  np.testing.assert_allclose(q, _reference_weight_quant(w), rtol=1e-6,
                             err_msg="weight_quant differs from the formula")
  assert set(np.unique(np.round(q / gamma)).tolist()) == {-1.0, 0.0, 1.0}, (
      "quantized weights are not {-gamma, 0, +gamma}")


@pytest.mark.parametrize("fn", [quant.activation_quant, quant.weight_quant])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_quant_keeps_shape_and_dtype(fn, dtype):
  x = jax.random.normal(jax.random.key(3), (2, 3, 8), dtype)
  y = fn(x)
  assert y.shape == x.shape and y.dtype == x.dtype, (
      f"{fn.__name__} changed {x.shape}/{x.dtype} into {y.shape}/{y.dtype}")


@pytest.mark.parametrize("fn", [quant.activation_quant, quant.weight_quant])
def test_zero_input_gives_zero_not_nan(fn):
  y = fn(jnp.zeros((2, 8)))
  assert np.all(np.asarray(y) == 0), f"{fn.__name__}(0) is not 0 (eps clamp)"


@pytest.mark.parametrize("fn", [quant.activation_quant, quant.weight_quant])
def test_straight_through_gradient_is_identity(fn):
  x = jax.random.normal(jax.random.key(4), (4, 16))
  cotangent = jax.random.normal(jax.random.key(5), (4, 16))
  grad = jax.grad(lambda v: jnp.sum(fn(v) * cotangent))(x)
  np.testing.assert_allclose(
      grad, cotangent, rtol=0, atol=0,
      err_msg=f"{fn.__name__} backward is not the identity (STE)")


def _int8_and_fake_quant(x, kernel):
  """Outputs and gradients of both BitLinear matmuls on the same inputs."""
  def fake(x, kernel):
    return quant.activation_quant(x) @ quant.weight_quant(kernel)

  weights = jax.random.normal(jax.random.key(9), (x.shape[0], kernel.shape[1]))
  results = []
  for matmul in (quant.int8_matmul, fake):
    loss = lambda x, k, matmul=matmul: jnp.sum(matmul(x, k) * weights)
    results.append((matmul(x, kernel), jax.grad(loss, (0, 1))(x, kernel)))
  return results


def test_int8_matmul_equals_fake_quant_forward_and_gradient():
  x = jax.random.normal(jax.random.key(0), (6, 48)) * 3.0
  kernel = jax.random.normal(jax.random.key(1), (48, 24)) * 0.02
  (out, grads), (expected, expected_grads) = _int8_and_fake_quant(x, kernel)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6,
                             err_msg="int8 forward != fake-quant forward")
  assert not np.allclose(out, x @ kernel, rtol=1e-3), "int8 path not quantized"
  for name, grad, want in zip(("x", "kernel"), grads, expected_grads):
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7,
                               err_msg=f"int8 straight-through d{name} != "
                               "fake-quant d{name}")


def test_int8_matmul_multiplies_int8_codes_with_int32_accumulation():
  x = jnp.ones((2, 8), jnp.bfloat16)
  kernel = jnp.ones((8, 4), jnp.float32)
  jaxpr = jax.make_jaxpr(quant.int8_matmul)(x, kernel)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
  for eqn in jaxpr.jaxpr.eqns:  # the custom_vjp's forward
    for value in eqn.params.values():
      if isinstance(value, jax.extend.core.ClosedJaxpr):
        dots += [e for e in value.jaxpr.eqns
                 if e.primitive.name == "dot_general"]
  assert dots, f"no dot_general in {jaxpr}"
  for dot in dots:
    dtypes = [v.aval.dtype for v in dot.invars]
    assert dtypes == [jnp.int8, jnp.int8], f"dot inputs {dtypes}, not int8"
    assert dot.outvars[0].aval.dtype == jnp.int32, "accumulation not int32"
  assert quant.int8_matmul(x, kernel).dtype == jnp.bfloat16
