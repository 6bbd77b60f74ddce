"""BitNet b1.58 fake quantization with straight-through estimators.

Source: Microsoft, "The Era of 1-bit LLMs: Training Tips, Code and FAQ"
(microsoft/unilm, bitnet/):

  activations, per token:  s = 127 / max(max|x|, 1e-5)
                           x_q = clip(round(x * s), -128, 127) / s
  weights, per tensor:     g = max(mean|W|, 1e-5)
                           W_q = clip(round(W / g), -1, 1) * g

Both return dequantized values ("fake quant") in the input's dtype and shape,
so training runs in floating point while the forward pass sees exactly the
int8 / ternary values an inference kernel would. Their backward passes are the
identity (straight-through estimator), written as `jax.custom_vjp`: no clip
mask, no gradient through the scales.

`int8_matmul` is the inference form y = (x_int8 . W_ternary) * g / s on
integer units (int8 x int8 -> int32 dot), with the same straight-through
backward as the fake-quant pair.

Scales and rounding are computed in float32 whatever the compute dtype: the
reference rounds x * s in float32, and a bfloat16 product (8 significant bits)
would pick a different integer code for about one element in a hundred. The
codes themselves (|code| <= 128) are exact in bfloat16 and int8.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ACTIVATION_MAX = 127.0  # int8 absmax scale target
SCALE_EPS = 1e-5  # clamp on max|x| and mean|W|, from the FAQ's reference code


def activation_codes(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-token int8 codes of `x` `[..., features]` and their scales.

  Returns:
    (codes float32 `[..., features]` holding integers in [-128, 127],
    scale float32 `[..., 1]` = 127 / max(max|x|, 1e-5)); x ~ codes / scale.
  """
  x32 = x.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
  scale = ACTIVATION_MAX / jnp.maximum(absmax, SCALE_EPS)
  return jnp.clip(jnp.round(x32 * scale), -128.0, 127.0), scale


def weight_codes(w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per-tensor ternary codes of `w` and its scale.

  Returns:
    (codes float32 of `w`'s shape in {-1, 0, 1}, gamma float32 scalar =
    max(mean|w|, 1e-5)); w ~ codes * gamma.
  """
  w32 = w.astype(jnp.float32)
  gamma = jnp.maximum(jnp.mean(jnp.abs(w32)), SCALE_EPS)
  return jnp.clip(jnp.round(w32 / gamma), -1.0, 1.0), gamma


def _activation_quant_forward(x: jax.Array) -> jax.Array:
  codes, scale = activation_codes(x)
  return (codes / scale).astype(x.dtype)


def _weight_quant_forward(w: jax.Array) -> jax.Array:
  codes, gamma = weight_codes(w)
  return (codes * gamma).astype(w.dtype)


def _straight_through(forward):
  """Wraps `forward` in a custom_vjp whose backward pass is the identity."""

  @jax.custom_vjp
  def quantize(x):
    return forward(x)

  def quantize_fwd(x):
    return forward(x), None

  def quantize_bwd(_, grad):
    return (grad,)

  quantize.defvjp(quantize_fwd, quantize_bwd)
  return quantize


_activation_quant = _straight_through(_activation_quant_forward)
_weight_quant = _straight_through(_weight_quant_forward)


def activation_quant(x: jax.Array) -> jax.Array:
  """Per-token absmax int8 fake quantization with a straight-through gradient.

  Args:
    x: activations `[..., features]`, any float dtype; each vector along the
      last axis (one token) gets its own scale 127 / max|x|.

  Returns:
    Dequantized activations, same shape and dtype as `x`, each token taking at
    most 256 distinct values. The gradient is the identity.
  """
  return _activation_quant(x)


def weight_quant(w: jax.Array) -> jax.Array:
  """Per-tensor absmean ternary fake quantization with a straight-through grad.

  Args:
    w: a weight matrix `[in_features, out_features]` (any shape works: the
      scale is one mean over all elements), any float dtype.

  Returns:
    Dequantized weights, same shape and dtype as `w`, every element one of
    {-g, 0, +g} with g = max(mean|w|, 1e-5). The gradient is the identity.
  """
  return _weight_quant(w)


def _contract_last(a: jax.Array, b: jax.Array, **kwargs) -> jax.Array:
  """`a [..., k] . b [k, n] -> [..., n]` as one `dot_general`."""
  return jax.lax.dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())),
                             **kwargs)


@jax.custom_vjp
def int8_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """BitLinear on integer units: (x_int8 . W_ternary) * gamma / s.

  The forward pass quantizes `x` per token (`activation_codes`) and `kernel`
  per tensor (`weight_codes`) to int8 and multiplies the codes with int32
  accumulation (`jax.lax.dot_general(..., preferred_element_type=int32)`,
  exact), then rescales each output row by gamma / s in float32: the
  inference form in Microsoft's FAQ. The backward pass is the fake-quant
  pair's straight-through gradient, in `x.dtype`:
    dx = dy . (codes_W * gamma)^T,   dW = (codes_x / s)^T . dy.
  Only the int8 codes and the scales are kept for it.

  Args:
    x: activations `[..., in_features]` in the compute dtype.
    kernel: the latent weight, float32 `[in_features, out_features]`.

  Returns:
    `[..., out_features]` in `x.dtype`; equal to
    `activation_quant(x) @ weight_quant(kernel)` up to float rounding.
  """
  return _int8_matmul_forward(x, kernel)[0]


def _int8_matmul_forward(x, kernel):
  x_codes, scale = activation_codes(x)
  w_codes, gamma = weight_codes(kernel)
  x_codes, w_codes = x_codes.astype(jnp.int8), w_codes.astype(jnp.int8)
  accumulated = _contract_last(x_codes, w_codes,
                               preferred_element_type=jnp.int32)
  out = accumulated.astype(jnp.float32) * (gamma / scale)
  return out.astype(x.dtype), (x_codes, scale, w_codes, gamma)


def _int8_matmul_backward(residuals, grad):
  x_codes, scale, w_codes, gamma = residuals
  dtype = grad.dtype
  weight = (w_codes.astype(jnp.float32) * gamma).astype(dtype)
  grad_x = _contract_last(grad, weight.T)
  x_quant = (x_codes.astype(jnp.float32) / scale).astype(dtype)
  leading = tuple(range(grad.ndim - 1))
  grad_kernel = jax.lax.dot_general(
      x_quant, grad, ((leading, leading), ((), ())),
      preferred_element_type=jnp.float32)
  return grad_x, grad_kernel


int8_matmul.defvjp(_int8_matmul_forward, _int8_matmul_backward)
