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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ACTIVATION_MAX = 127.0  # int8 absmax scale target
SCALE_EPS = 1e-5  # clamp on max|x| and mean|W|, from the FAQ's reference code


def _activation_quant_forward(x: jax.Array) -> jax.Array:
  x32 = x.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(x32), axis=-1, keepdims=True)
  scale = ACTIVATION_MAX / jnp.maximum(absmax, SCALE_EPS)
  quantized = jnp.clip(jnp.round(x32 * scale), -128.0, 127.0)
  return (quantized / scale).astype(x.dtype)


def _weight_quant_forward(w: jax.Array) -> jax.Array:
  w32 = w.astype(jnp.float32)
  gamma = jnp.maximum(jnp.mean(jnp.abs(w32)), SCALE_EPS)
  ternary = jnp.clip(jnp.round(w32 / gamma), -1.0, 1.0)
  return (ternary * gamma).astype(w.dtype)


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
