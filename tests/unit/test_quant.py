"""Fake quantization follows the FAQ's formulas with straight-through grads."""

import jax
import jax.extend  # jax.extend.core.ClosedJaxpr; not imported by jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bitnet_jax.quant import quantizers


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
      quantizers.activation_quant(jnp.asarray(x)), _reference_activation_quant(x),
      rtol=1e-6, atol=1e-7,
      err_msg="activation_quant is not per-token absmax int8 fake quant")


def test_activation_quant_levels_are_int8_per_token():
  x = jax.random.normal(jax.random.key(1), (4, 64))
  q = np.asarray(quantizers.activation_quant(x))
  scale = 127.0 / np.abs(np.asarray(x)).max(axis=-1, keepdims=True)
  levels = q * scale
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-3,
                             err_msg="dequantized activations are not k/scale")
  assert levels.max() <= 127.5 and levels.min() >= -128.5, "outside int8 range"


def test_weight_quant_is_ternary_times_absmean():
  w = np.random.default_rng(2).normal(size=(32, 48)).astype(np.float32) * 0.02
  q = np.asarray(quantizers.weight_quant(jnp.asarray(w)))
  gamma = np.abs(w).mean()
  np.testing.assert_allclose(q, _reference_weight_quant(w), rtol=1e-6,
                             err_msg="weight_quant differs from the formula")
  assert set(np.unique(np.round(q / gamma)).tolist()) == {-1.0, 0.0, 1.0}, (
      "quantized weights are not {-gamma, 0, +gamma}")


@pytest.mark.parametrize("fn", [quantizers.activation_quant, quantizers.weight_quant])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_quant_keeps_shape_and_dtype(fn, dtype):
  x = jax.random.normal(jax.random.key(3), (2, 3, 8), dtype)
  y = fn(x)
  assert y.shape == x.shape and y.dtype == x.dtype, (
      f"{fn.__name__} changed {x.shape}/{x.dtype} into {y.shape}/{y.dtype}")


@pytest.mark.parametrize("fn", [quantizers.activation_quant, quantizers.weight_quant])
def test_zero_input_gives_zero_not_nan(fn):
  y = fn(jnp.zeros((2, 8)))
  assert np.all(np.asarray(y) == 0), f"{fn.__name__}(0) is not 0 (eps clamp)"


@pytest.mark.parametrize("fn", [quantizers.activation_quant, quantizers.weight_quant])
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
    return quantizers.activation_quant(x) @ quantizers.weight_quant(kernel)

  weights = jax.random.normal(jax.random.key(9), (x.shape[0], kernel.shape[1]))
  results = []
  for matmul in (quantizers.int8_matmul, fake):
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
  jaxpr = jax.make_jaxpr(quantizers.int8_matmul)(x, kernel)
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
  assert quantizers.int8_matmul(x, kernel).dtype == jnp.bfloat16


# Property tests (hypothesis). Shapes are fixed so each jitted quantizer
# compiles once; examples are derandomized (the same ones every run, so CI
# is not flaky) and no example database is written.
_PROPERTY = settings(max_examples=30, deadline=None, derandomize=True,
                     database=None)
_X_SHAPE, _W_SHAPE = (4, 16), (16, 8)  # [tokens, features], [in, out]
_activation_quant = jax.jit(quantizers.activation_quant)
_weight_quant = jax.jit(quantizers.weight_quant)
_activation_codes = jax.jit(quantizers.activation_codes)
_weight_codes = jax.jit(quantizers.weight_codes)
_int8_matmul = jax.jit(quantizers.int8_matmul)


def _finite(low, high):
  return st.floats(low, high, width=32, allow_nan=False,
                   allow_infinity=False)


def _flush_tiny(a: np.ndarray) -> np.ndarray:
  """Zeroes |a| < 2**-60, so that 2**k * a (|k| <= 16) is never subnormal
  (a subnormal drops mantissa bits, and equivariance is then not exact)."""
  return np.where(np.abs(a) < 2.0**-60, np.float32(0), a).astype(np.float32)


@st.composite
def _activations(draw):
  """`[4, 16]` float32 whose every row has max|x| in [1, 1000]: above the
  1e-5 clamp even after a 2**-16 rescale (2**-16 ~ 1.5e-5), and far from
  overflow after 2**16."""
  x = _flush_tiny(draw(hnp.arrays(np.float32, _X_SHAPE,
                                  elements=_finite(-1.0, 1.0))))
  peaks = draw(hnp.arrays(np.float32, (_X_SHAPE[0],),
                          elements=_finite(1.0, 1000.0)))
  signs = draw(hnp.arrays(np.float32, (_X_SHAPE[0],),
                          elements=st.sampled_from([-1.0, 1.0])))
  x[:, draw(st.integers(0, _X_SHAPE[1] - 1))] = peaks * signs
  return x


@st.composite
def _weights(draw):
  """`[16, 8]` float32 with mean|w| >= 2**-8 (above the 1e-5 clamp after a
  2**-8 rescale) and |w| <= 4 (no overflow)."""
  w = _flush_tiny(draw(hnp.arrays(np.float32, _W_SHAPE,
                                  elements=_finite(-4.0, 4.0))))
  assume(np.abs(w).mean() >= 2.0**-8)
  return w


@_PROPERTY
@given(x=_activations())
def test_activation_codes_are_int8_integers_and_each_row_peak_is_127(x):
  codes, _ = map(np.asarray, _activation_codes(jnp.asarray(x)))
  assert np.array_equal(codes, np.round(codes)), (
      f"activation codes are not integers: {codes}")
  assert codes.min() >= -128 and codes.max() <= 127, (
      f"activation codes outside int8 [-128, 127]: {codes}")
  peak = np.abs(codes).max(axis=-1)
  assert np.all(peak == 127), (
      f"a row's absmax element is not code +-127 ({peak}): the absmax scale "
      "is not 127 / max|x|")


@_PROPERTY
@given(w=_weights())
def test_weight_codes_are_ternary(w):
  codes, _ = _weight_codes(jnp.asarray(w))
  values = set(np.unique(np.asarray(codes)).tolist())
  assert values <= {-1.0, 0.0, 1.0}, f"weight codes {values} not ternary"
  assert values - {0.0}, "every weight code is 0: the example is vacuous"


@pytest.mark.parametrize("name,quantize,examples,largest_power", [
    ("activation_quant", _activation_quant, _activations, 16),
    ("weight_quant", _weight_quant, _weights, 8)])
@_PROPERTY
@given(data=st.data())
def test_each_quantizer_commutes_exactly_with_powers_of_two(
    name, quantize, examples, largest_power, data):
  """Q(2^k v) = 2^k Q(v): the absmax (per token) and absmean scales follow
  the input's magnitude, and a power of two rescales without rounding."""
  v = data.draw(examples(), label="v")
  k = data.draw(st.integers(-largest_power, largest_power), label="k")
  scaled = quantize(jnp.asarray(np.float32(2.0**k) * v))
  expected = np.float32(2.0**k) * np.asarray(quantize(v))
  np.testing.assert_array_equal(
      scaled, expected, err_msg=f"{name}(2**{k} v) != 2**{k} {name}(v): the "
      "scale does not follow the input's magnitude")


@_PROPERTY
@given(x=_activations(), w=_weights(), k=st.integers(-16, 16),
       j=st.integers(-8, 8))
def test_int8_matmul_commutes_exactly_with_powers_of_two_of_each_input(
    x, w, k, j):
  scaled = _int8_matmul(jnp.asarray(np.float32(2.0**k) * x),
                        jnp.asarray(np.float32(2.0**j) * w))
  expected = np.float32(2.0**(k + j)) * np.asarray(_int8_matmul(x, w))
  np.testing.assert_array_equal(
      scaled, expected,
      err_msg=f"int8_matmul(2**{k} x, 2**{j} W) != 2**{k + j} "
      "int8_matmul(x, W): the integer product is not rescaled exactly")


@_PROPERTY
@given(x=_activations())
def test_activation_quant_is_idempotent_on_codes_and_to_one_ulp_on_values(x):
  """Exact on the codes; on the values only to the float rounding of the
  scale: q = c / s has max|q| = 127 / s, and 127 / (127 / s) is s only to
  within an ulp (x = [-740.3076, 0, ...] moves q by one ulp, 6.1e-5)."""
  once = _activation_quant(jnp.asarray(x))
  codes, _ = _activation_codes(jnp.asarray(x))
  requantized_codes, _ = _activation_codes(once)
  np.testing.assert_array_equal(
      requantized_codes, codes,
      err_msg="re-quantizing quantized activations changed their int8 codes")
  np.testing.assert_allclose(
      _activation_quant(once), once, rtol=2.0**-22, atol=0,
      err_msg="activation_quant(activation_quant(x)) differs from "
      "activation_quant(x) by more than 2 ulp")


@_PROPERTY
@given(w=_weights())
def test_weight_quant_keeps_codes_and_shrinks_by_the_nonzero_fraction(w):
  """Absmean quantization is idempotent on the codes only: for W_q = c * g,
  mean|W_q| = f * g with f the fraction of nonzero codes, so
  W_q / (f g) = c / f clips back to c and weight_quant(W_q) = f * W_q. It is
  a fixed point exactly when no code is 0."""
  codes, gamma = _weight_codes(jnp.asarray(w))
  once = _weight_quant(jnp.asarray(w))
  requantized_codes, _ = _weight_codes(once)
  np.testing.assert_array_equal(
      requantized_codes, codes,
      err_msg="re-quantizing ternary weights changed their codes")
  fraction = np.mean(np.asarray(codes) != 0)
  np.testing.assert_allclose(
      _weight_quant(once), fraction * np.asarray(once), rtol=1e-6,
      err_msg=f"weight_quant(weight_quant(w)) != {fraction} (the nonzero "
      "fraction) * weight_quant(w)")
  assert float(gamma) > 0, "gamma is 0: the example is vacuous"


def _vjp(fn, *primals):
  """`fn`'s outputs and its vjp at `primals`, jitted (one compile)."""
  return jax.jit(lambda cotangent, *p: jax.vjp(fn, *p)[1](cotangent))


_activation_vjp = _vjp(quantizers.activation_quant)
_weight_vjp = _vjp(quantizers.weight_quant)
_int8_matmul_vjp = _vjp(quantizers.int8_matmul)


@_PROPERTY
@given(x=_activations(), cotangent=hnp.arrays(np.float32, _X_SHAPE,
                                             elements=_finite(-10, 10)))
def test_activation_quant_vjp_returns_the_cotangent_unchanged(x, cotangent):
  """Every element: the absmax scale maps each token into [-127, 127], so
  the clip never binds and there is no clip region to mask."""
  (grad,) = _activation_vjp(jnp.asarray(cotangent), jnp.asarray(x))
  np.testing.assert_array_equal(
      grad, cotangent, err_msg="activation_quant's vjp is not the identity "
      "(straight-through estimator)")


@_PROPERTY
@given(w=_weights(), cotangent=hnp.arrays(np.float32, _W_SHAPE,
                                         elements=_finite(-10, 10)))
def test_weight_quant_vjp_returns_the_cotangent_unchanged(w, cotangent):
  """Every element, those clipped to +-1 (|w| > 1.5 gamma) included: the
  STE has no clip mask (`test_weight_quant_passes_gradient_to_clipped_...`
  shows the clip binds)."""
  (grad,) = _weight_vjp(jnp.asarray(cotangent), jnp.asarray(w))
  np.testing.assert_array_equal(
      grad, cotangent, err_msg="weight_quant's vjp is not the identity "
      "(straight-through estimator)")


def test_weight_quant_passes_gradient_to_clipped_weights():
  w = np.full(_W_SHAPE, 0.01, np.float32)
  w[0, 0] = 10.0  # gamma ~ 0.09: |w / gamma| ~ 100, clipped to 1
  codes, gamma = _weight_codes(jnp.asarray(w))
  assert abs(w[0, 0] / float(gamma)) > 1.5 and codes[0, 0] == 1, (
      "the outlier is not clipped: the test is vacuous")
  cotangent = np.ones(_W_SHAPE, np.float32)
  (grad,) = _weight_vjp(jnp.asarray(cotangent), jnp.asarray(w))
  assert grad[0, 0] == 1.0, (
      f"a clipped weight got gradient {grad[0, 0]}, not 1: the STE masks "
      "the clip region")


@_PROPERTY
@given(x=_activations(), w=_weights(),
       cotangent=hnp.arrays(np.float32, (_X_SHAPE[0], _W_SHAPE[1]),
                            elements=_finite(-10, 10)))
def test_int8_matmul_vjp_passes_the_cotangent_through_both_quantizers(
    x, w, cotangent):
  """The quantizers' Jacobians are the identity, so the vjp is that of the
  plain product x_q . W_q: dx = dy . W_q^T and dW = x_q^T . dy, with
  x_q = activation_quant(x) and W_q = weight_quant(W) (float64 reference)."""
  grad_x, grad_w = _int8_matmul_vjp(jnp.asarray(cotangent), jnp.asarray(x),
                                    jnp.asarray(w))
  x_q = np.asarray(_activation_quant(x), np.float64)
  w_q = np.asarray(_weight_quant(w), np.float64)
  dy = cotangent.astype(np.float64)
  np.testing.assert_allclose(grad_x, dy @ w_q.T, rtol=1e-5, atol=1e-5,
                             err_msg="int8_matmul's dx != dy . W_q^T")
  np.testing.assert_allclose(grad_w, x_q.T @ dy, rtol=1e-5, atol=1e-5,
                             err_msg="int8_matmul's dW != x_q^T . dy")
