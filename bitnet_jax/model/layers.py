"""Building blocks: BitLinear, RMSNorm and rotary position embeddings.

BitLinear follows Microsoft's "The Era of 1-bit LLMs: Training Tips, Code and
FAQ": y = activation_quant(x) @ weight_quant(W), no bias. The RMSNorm that
precedes every BitLinear lives in the caller (the BitNet b1.58 2B4T layout
shares one norm across q/k/v and across gate/up), see
`bitnet_jax.model.block`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from bitnet_jax.config.choices import BitLinearMatmul, Quantization, RopeScaling
from bitnet_jax.quant import quantizers


class BitLinear(nnx.Module):
  """A linear layer with ternary weights and int8 activations.

  `quantization="ternary"`: y = activation_quant(x) @ weight_quant(kernel),
  both fake-quantized with straight-through gradients
  (`bitnet_jax.quant.quantizers`).
  `quantization="none"`: y = x @ kernel, the same parameters in full precision
  (the baseline every comparison needs).

  `quant_blend` (a call argument, `model.quantization_warmup_steps`) blends
  full precision into the fake-quantized values, v + lambda (Q(v) - v) for
  the activations and the weights alike, with the straight-through gradient
  (the identity); lambda = 1 is plain ternary, 0 full precision.

  `matmul` picks how a ternary layer multiplies, once at build time from
  `BITLINEAR_MATMULS`: "fake_quant" multiplies the dequantized values in the
  compute dtype; "int8" multiplies the int8 codes with int32 accumulation
  and rescales (`quantizers.int8_matmul`). Both have the same straight-through
  gradient and agree to float rounding.

  `quantization` and `matmul` are values of `Quantization` and
  `BitLinearMatmul` (`bitnet_jax.config.validate` checks a config's; another
  string fails the enum's or the table's lookup, ValueError / KeyError).

  `use_bias` adds a full-precision bias after the product (BitNet has
  none; Qwen2's q/k/v projections do, `model.attention_bias`).

  Attributes:
    kernel: `nnx.Param` float32 `[in_features, out_features]`; the latent
      full-precision weight the optimizer updates.
    bias: `nnx.Param` float32 `[out_features]` (zeros), with `use_bias`.
  """

  def __init__(self, in_features: int, out_features: int, *,
               quantization: str, init_std: float, dtype: jnp.dtype,
               rngs: nnx.Rngs, matmul: str = "fake_quant",
               use_bias: bool = False):
    init = nnx.initializers.normal(stddev=init_std)
    self.kernel = nnx.Param(
        init(rngs.params(), (in_features, out_features), jnp.float32))
    self.bias = (nnx.Param(jnp.zeros((out_features,), jnp.float32))
                 if use_bias else None)
    # Chosen once here, not branched on in every call.
    self.multiply = (full_precision_matmul
                     if Quantization(quantization) is Quantization.NONE
                     else BITLINEAR_MATMULS[matmul])
    self.dtype = dtype

  def __call__(self, x: jax.Array,
               quant_blend: jax.Array | None = None) -> jax.Array:
    """Maps `[..., in_features]` to `[..., out_features]` in `self.dtype`.

    `quant_blend`: None (plain ternary) or a float32 scalar lambda in [0, 1]
    (fake-quant path only; ignored without ternary quantization).
    """
    y = self.multiply(x.astype(self.dtype), self.kernel[...], quant_blend)
    if self.bias is None:
      return y
    return y + self.bias[...].astype(y.dtype).reshape((1,) * (y.ndim - 1)
                                                      + (-1,))


def full_precision_matmul(x: jax.Array, kernel: jax.Array,
                          quant_blend: jax.Array | None) -> jax.Array:
  """x @ kernel in x's dtype (`model.quantization="none"`); no quantizer, so
  `quant_blend` is ignored. x `[..., in]`, kernel float32 `[in, out]`."""
  del quant_blend
  return jnp.dot(x, kernel.astype(x.dtype))


def fake_quant_matmul(x: jax.Array, kernel: jax.Array,
                      quant_blend: jax.Array | None) -> jax.Array:
  """activation_quant(x) @ weight_quant(kernel) on dequantized values in x's
  dtype, each blended with full precision by `quant_blend` (`_blend`)."""
  x = _blend(x, quantizers.activation_quant(x), quant_blend)
  kernel = _blend(kernel, quantizers.weight_quant(kernel), quant_blend)
  return jnp.dot(x, kernel.astype(x.dtype))


def int8_codes_matmul(x: jax.Array, kernel: jax.Array,
                      quant_blend: jax.Array | None) -> jax.Array:
  """int8 codes x ternary codes, int32 accumulation (`quantizers.int8_matmul`);
  during a quantization warm-up (`quant_blend` set) the blend needs the
  dequantized values, so it multiplies as `fake_quant_matmul`."""
  if quant_blend is None:
    return quantizers.int8_matmul(x, kernel)
  return fake_quant_matmul(x, kernel, quant_blend)


# `model.bitlinear_matmul` -> how a ternary BitLinear multiplies, one entry
# per `BitLinearMatmul` (tests/unit/test_model.py checks none is missing).
BITLINEAR_MATMULS = {BitLinearMatmul.FAKE_QUANT: fake_quant_matmul,
                     BitLinearMatmul.INT8: int8_codes_matmul}


def _blend(value: jax.Array, quantized: jax.Array,
           quant_blend: jax.Array | None) -> jax.Array:
  """value + lambda (quantized - value); `quantized` when lambda is None."""
  if quant_blend is None:
    return quantized
  return value + quant_blend.astype(value.dtype) * (quantized - value)


def bitlinear_arguments(config: ml_collections.ConfigDict,
                        rngs: nnx.Rngs) -> dict[str, Any]:
  """The `BitLinear` keyword arguments `config.model` sets."""
  return {"quantization": config.quantization,
          "matmul": config.bitlinear_matmul, "init_std": config.init_std,
          "dtype": jnp.dtype(config.dtype), "rngs": rngs}


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
  """Inverted dropout (Srivastava et al., JMLR 2014): zeroes each element
  with probability `rate` and scales the rest by 1 / (1 - rate), so the
  expectation is unchanged. Same shape and dtype as `x`."""
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def rms_norm(features: int, *, eps: float, dtype: jnp.dtype,
             rngs: nnx.Rngs) -> nnx.RMSNorm:
  """An RMSNorm over the last axis with a float32 scale initialized to 1."""
  return nnx.RMSNorm(features, epsilon=eps, dtype=dtype,
                     param_dtype=jnp.float32, rngs=rngs)


def head_dim(config: ml_collections.ConfigDict) -> int:
  """Per-head width: `config.head_dim`, or d_model / n_heads when it is 0."""
  return config.head_dim or config.d_model // config.n_heads


def sub_norm(features: int, config: ml_collections.ConfigDict,
             rngs: nnx.Rngs) -> nnx.RMSNorm | None:
  """The RMSNorm before o_proj / down_proj (BitNet b1.58 2B4T's
  attn_sub_norm / ffn_sub_norm, BitDistill's SubLN, arXiv 2510.13998), or
  None when `config.sub_norms` is False (a Llama-shaped block)."""
  if not config.sub_norms:
    return None
  return rms_norm(features, eps=config.norm_eps,
                  dtype=jnp.dtype(config.dtype), rngs=rngs)


def apply_norm(norm: nnx.RMSNorm | None, x: jax.Array) -> jax.Array:
  """`norm(x)`, or `x` when the norm is absent (`sub_norm`)."""
  return x if norm is None else norm(x)


def rope_frequencies(head_dim: int, config: ml_collections.ConfigDict
                     ) -> tuple[float, ...]:
  """RoPE inverse frequencies `[head_dim / 2]` (radians per position).

  theta^(-2i / head_dim) (RoFormer, arXiv 2104.09864); with
  `config.rope_scaling="llama3"`, Llama 3.1's scaling as transformers'
  `_compute_llama3_parameters` (modeling_rope_utils.py) and Meta's
  llama-models `apply_scaling` compute it: wavelengths 2 pi / f above
  original_context / low_freq_factor are divided by `factor`, those below
  original_context / high_freq_factor kept, and those between interpolated
  with s = (original_context / wavelength - low) / (high - low):
  (1 - s) f / factor + s f. Computed once on the host, in float64, and
  returned as a tuple (a static module attribute).
  """
  half = head_dim // 2
  inv_freq = config.rope_theta ** (-np.arange(half, dtype=np.float64) / half)
  if config.rope_scaling == RopeScaling.NONE:
    return tuple(float(f) for f in inv_freq)
  factor = config.rope_scaling_factor
  low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
  context = config.rope_original_context
  wavelength = 2 * np.pi / inv_freq
  scaled = np.where(wavelength > context / low, inv_freq / factor, inv_freq)
  smooth = (context / wavelength - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelength >= context / high) & (wavelength <= context / low)
  return tuple(float(f) for f in np.where(medium, smoothed, scaled))


def apply_rope(x: jax.Array, positions: jax.Array,
               inv_freq: tuple[float, ...]) -> jax.Array:
  """Rotary position embedding, rotate-half form (as HF Llama and BitNet).

  Source: Su et al., "RoFormer" (arXiv 2104.09864).

  Args:
    x: queries or keys `[batch, seq, n_heads, head_dim]`, head_dim even.
    positions: int32 `[seq]` or `[batch, seq]`, each token's position (its
      index in its document when documents are packed).
    inv_freq: `[head_dim / 2]` frequencies (`rope_frequencies`: base 10000
      in RoFormer, 5e5 in BitNet b1.58 2B4T).

  Returns:
    The rotated `x`, same shape and dtype.
  """
  inv_freq = jnp.asarray(inv_freq, jnp.float32)
  positions = jnp.broadcast_to(positions, x.shape[:2])  # [batch, seq]
  angles = positions.astype(jnp.float32)[..., None] * inv_freq[None, None]
  sin = jnp.sin(angles)[:, :, None, :]  # [batch, seq, 1, half]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
  return rotated.astype(x.dtype)
