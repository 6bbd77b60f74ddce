"""The transformer block: a pre-norm attention and gated feed-forward pair.

Layout and parameter names follow "BitNet b1.58 2B4T Technical Report"
(arXiv 2504.12285) as mirrored by HF `BitNetForCausalLM`:

  input_layernorm -> self_attn (q/k/v BitLinears, attention, attn_sub_norm,
      o_proj), added to the stream
  post_attention_layernorm -> mlp (gate/up BitLinears, activation,
      ffn_sub_norm, down_proj), added to the stream

Shape legend for the suffixed names (`gate_BxLxF`): B batch, L seq, M
d_model, F ffn_dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from bitnet_jax.config.choices import FfnActivation, Residual
from bitnet_jax.model import residual
from bitnet_jax.model.attention import Attention
from bitnet_jax.model.layers import (
  BitLinear,
  apply_norm,
  bitlinear_arguments,
  dropout,
  rms_norm,
  sub_norm,
)


def squared_relu(x: jax.Array) -> jax.Array:
  """relu(x)^2, the FFN activation of BitNet b1.58 2B4T (arXiv 2504.12285,
  Sec. 2); same shape and dtype as `x`."""
  return jnp.square(jax.nn.relu(x))


# `model.ffn_activation` -> the gate's activation, one entry per
# `FfnActivation` (tests/unit/test_model.py checks none is missing).
FFN_ACTIVATIONS = {FfnActivation.SWIGLU: jax.nn.silu,
                   FfnActivation.RELU2: squared_relu}


class FeedForward(nnx.Module):
  """Gated FFN: down(ffn_sub_norm(act(gate(x)) * up(x))) (no sub-norm with
  `model.sub_norms=False`).

  act is SiLU ("swiglu", the b1.58 paper) or squared ReLU ("relu2", 2B4T),
  chosen once from `FFN_ACTIVATIONS` when the module is built (KeyError for
  a name that is not an `FfnActivation`; `config.validate` names the key).
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    d, f = config.d_model, config.ffn_dim
    linear = bitlinear_arguments(config, rngs)
    self.gate_proj = BitLinear(d, f, **linear)
    self.up_proj = BitLinear(d, f, **linear)
    self.ffn_sub_norm = sub_norm(f, config, rngs)
    self.down_proj = BitLinear(f, d, **linear)
    self.activation = FFN_ACTIVATIONS[config.ffn_activation]

  def __call__(self, x: jax.Array,
               quant_blend: jax.Array | None = None) -> jax.Array:
    """Maps normalized `[B, L, M]` to `[B, L, M]` through `[B, L, F]`
    (`quant_blend`: see `BitLinear`)."""
    gate_BxLxF = self.activation(self.gate_proj(x, quant_blend))
    return self.down_proj(
        apply_norm(self.ffn_sub_norm,
                   gate_BxLxF * self.up_proj(x, quant_blend)),
        quant_blend)


def _rms(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))


class Block(nnx.Module):
  """A pre-norm transformer block on a float32 residual stream.

  With `model.residual="mhc_lite"` the stream is `[batch, seq, n, d_model]`
  and each sublayer reads and writes it through a `residual.HyperConnection`
  (`attn_hc`, `mlp_hc`); otherwise x + attention(norm(x)), then
  x + ffn(norm(x)). With a dropout key, each sublayer's output is dropped
  out (`model.dropout_rate`) before it joins the stream.
  """

  def __init__(self, config: ml_collections.ConfigDict,
               index: int | jax.Array = 0, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.dtype)
    self.input_layernorm = rms_norm(config.d_model, eps=config.norm_eps,
                                    dtype=dtype, rngs=rngs)
    self.self_attn = Attention(config, rngs=rngs)
    self.post_attention_layernorm = rms_norm(
        config.d_model, eps=config.norm_eps, dtype=dtype, rngs=rngs)
    self.mlp = FeedForward(config, rngs=rngs)
    self.dropout_rate = config.dropout_rate
    hyper = config.residual == Residual.MHC_LITE  # index: the block's depth
    self.attn_hc = residual.HyperConnection(
        config.residual_streams, 2 * index) if hyper else None
    self.mlp_hc = residual.HyperConnection(
        config.residual_streams, 2 * index + 1) if hyper else None

  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               positions: jax.Array | None = None, *,
               quant_blend: jax.Array | None = None,
               dropout_key: jax.Array | None = None,
               cache: dict[str, jax.Array] | None = None,
               cache_index: jax.Array | None = None,
               capture: bool = False
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Maps the float32 stream to the same shape and dtype.

    Args:
      x: float32 `[batch, seq, d_model]` (or `[batch, seq, n, d_model]`
        with mHC-lite).
      mask, positions, quant_blend, cache, cache_index: see
        `Attention.__call__`.
      dropout_key: a PRNG key for dropout (training only), or None.
      capture: also return the attention's q/k/v projections
        (`Attention.__call__`) as extras["captured"].

    Returns:
      (the new stream, extras): extras holds float32 scalars
      `attention_rms` and `ffn_rms`, the RMS of what each sublayer adds
      to the stream, the updated `cache` when one was given, and
      "captured" with `capture`.
    """
    keys = [None] * 3 if dropout_key is None else list(
        jax.random.split(dropout_key, 3))
    extras = {}

    def sublayer(x, hyper, norm, apply, key):
      h = x if hyper is None else hyper.read(x)
      out = apply(norm(h)).astype(jnp.float32)
      if key is not None and self.dropout_rate > 0:
        out = dropout(out, self.dropout_rate, key)
      return (x + out if hyper is None else hyper.write(x, out)), _rms(out)

    def attend(h):
      out = self.self_attn(h, mask, positions, quant_blend=quant_blend,
                           dropout_key=keys[0], cache=cache,
                           cache_index=cache_index, capture=capture)
      if cache is not None:
        out, extras["cache"] = out
      elif capture:
        out, extras["captured"] = out
      return out

    x, extras["attention_rms"] = sublayer(
        x, self.attn_hc, self.input_layernorm, attend, keys[1])
    x, extras["ffn_rms"] = sublayer(
        x, self.mlp_hc, self.post_attention_layernorm,
        lambda h: self.mlp(h, quant_blend), keys[2])
    return x, extras
