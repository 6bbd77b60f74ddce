"""The BitNet b1.58 decoder-only transformer (Flax NNX).

Layout and parameter names follow "BitNet b1.58 2B4T Technical Report"
(arXiv 2504.12285) as mirrored by HF `BitNetForCausalLM`, so an export maps
1:1 (`kernel` -> `weight` transposed, RMSNorm `scale` -> `weight`):

  layers[i].input_layernorm -> self_attn.{q,k,v}_proj -> attention
      -> self_attn.attn_sub_norm -> self_attn.o_proj
  layers[i].post_attention_layernorm -> mlp.{gate,up}_proj
      -> mlp.ffn_sub_norm -> mlp.down_proj

Every block linear is a `BitLinear`; embed_tokens, lm_head, the norms and the
residual stream (float32) stay in high precision.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from bitnet_jax.layers import BitLinear, apply_rope, rms_norm

BITLINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj",
                   "gate_proj", "up_proj", "down_proj")


def attention_implementation(requested: str, dtype: jnp.dtype) -> str:
  """Resolves `model.attention_implementation`: "auto" is cudnn on GPU+bf16."""
  if requested != "auto":
    return requested
  on_gpu = jax.default_backend() == "gpu"
  return "cudnn" if on_gpu and dtype == jnp.bfloat16 else "xla"


def document_mask(segment_ids: jax.Array) -> jax.Array:
  """Which keys each query may see besides causality: its own segment's.

  Args:
    segment_ids: int32 `[batch, seq]`, the packed document of each token.

  Returns:
    bool `[batch, 1, seq (query), seq (key)]`, broadcast over heads (query
    and key/value heads alike under GQA).
  """
  return segment_ids[:, None, :, None] == segment_ids[:, None, None, :]


def kv_heads(config: ml_collections.ConfigDict) -> int:
  """Key/value heads of `config.model`: `n_kv_heads`, or n_heads when 0."""
  return config.n_kv_heads or config.n_heads


class Attention(nnx.Module):
  """Causal self-attention with RoPE and a sub-norm before o_proj.

  Grouped-query attention (Ainslie et al., "GQA", arXiv 2305.13245) when
  `n_kv_heads < n_heads`: k_proj and v_proj map d_model to
  n_kv_heads x head_dim, and query head h attends with key/value head
  h // (n_heads / n_kv_heads), the grouping of HF's `repeat_kv`.
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    d, dtype = config.d_model, jnp.dtype(config.dtype)
    linear = {"quantization": config.quantization,
              "init_std": config.init_std, "dtype": dtype, "rngs": rngs}
    self.n_heads, self.n_kv_heads = config.n_heads, kv_heads(config)
    kv_width = self.n_kv_heads * (d // self.n_heads)
    self.q_proj = BitLinear(d, d, **linear)
    self.k_proj = BitLinear(d, kv_width, **linear)
    self.v_proj = BitLinear(d, kv_width, **linear)
    self.attn_sub_norm = rms_norm(d, eps=config.norm_eps, dtype=dtype,
                                  rngs=rngs)
    self.o_proj = BitLinear(d, d, **linear)
    self.rope_theta = config.rope_theta
    self.implementation = attention_implementation(
        config.attention_implementation, dtype)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    """Maps normalized `[batch, seq, d_model]` to `[batch, seq, d_model]`.

    Args:
      x: the normalized residual stream `[batch, seq, d_model]`.
      mask: optional bool `[batch, 1, seq, seq]` (`document_mask`), applied
        on top of the causal mask.
      positions: optional int32 `[batch, seq]` RoPE positions; default
        0..seq-1.
    """
    batch, seq, d_model = x.shape
    head_dim = d_model // self.n_heads
    q_heads = (batch, seq, self.n_heads, head_dim)
    kv_shape = (batch, seq, self.n_kv_heads, head_dim)
    if positions is None:
      positions = jnp.arange(seq, dtype=jnp.int32)
    q = apply_rope(self.q_proj(x).reshape(q_heads), positions,
                   self.rope_theta)
    k = apply_rope(self.k_proj(x).reshape(kv_shape), positions,
                   self.rope_theta)
    v = self.v_proj(x).reshape(kv_shape)
    out = jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=True,
        implementation=self.implementation)
    return self.o_proj(self.attn_sub_norm(out.reshape(batch, seq, d_model)))


class FeedForward(nnx.Module):
  """Gated FFN: down(ffn_sub_norm(act(gate(x)) * up(x))).

  act is SiLU ("swiglu", the b1.58 paper) or squared ReLU ("relu2", 2B4T).
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    d, f, dtype = config.d_model, config.ffn_dim, jnp.dtype(config.dtype)
    linear = {"quantization": config.quantization,
              "init_std": config.init_std, "dtype": dtype, "rngs": rngs}
    self.gate_proj = BitLinear(d, f, **linear)
    self.up_proj = BitLinear(d, f, **linear)
    self.ffn_sub_norm = rms_norm(f, eps=config.norm_eps, dtype=dtype,
                                 rngs=rngs)
    self.down_proj = BitLinear(f, d, **linear)
    self.activation = config.ffn_activation

  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps normalized `[batch, seq, d_model]` to `[batch, seq, d_model]`."""
    gate = self.gate_proj(x)
    if self.activation == "swiglu":
      gate = jax.nn.silu(gate)
    elif self.activation == "relu2":
      gate = jnp.square(jax.nn.relu(gate))
    else:
      raise ValueError(f"model.ffn_activation={self.activation!r}: use "
                       "'swiglu' or 'relu2'")
    return self.down_proj(self.ffn_sub_norm(gate * self.up_proj(x)))


class Block(nnx.Module):
  """A pre-norm transformer block on a float32 residual stream."""

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.dtype)
    self.input_layernorm = rms_norm(config.d_model, eps=config.norm_eps,
                                    dtype=dtype, rngs=rngs)
    self.self_attn = Attention(config, rngs=rngs)
    self.post_attention_layernorm = rms_norm(
        config.d_model, eps=config.norm_eps, dtype=dtype, rngs=rngs)
    self.mlp = FeedForward(config, rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    """Maps float32 `[batch, seq, d_model]` to the same shape and dtype.

    `mask` and `positions` (optional) are passed to attention (see
    `Attention.__call__`).
    """
    x = x + self.self_attn(self.input_layernorm(x), mask,
                           positions).astype(jnp.float32)
    return x + self.mlp(self.post_attention_layernorm(x)).astype(jnp.float32)


class Transformer(nnx.Module):
  """BitNet b1.58 language model: tokens `[batch, seq]` -> logits.

  Args:
    config: `config.model` (see `bitnet_jax.config.base_config`).
    rngs: `nnx.Rngs` with a `params` stream for initialization.
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.dtype)
    init = nnx.initializers.normal(stddev=config.init_std)
    self.embed_tokens = nnx.Embed(
        config.vocab_size, config.d_model, embedding_init=init,
        param_dtype=jnp.float32, rngs=rngs)
    self.layers = nnx.List([Block(config, rngs=rngs)
                            for _ in range(config.n_layers)])
    self.norm = rms_norm(config.d_model, eps=config.norm_eps, dtype=dtype,
                         rngs=rngs)
    self.lm_head = None if config.tie_embeddings else nnx.Linear(
        config.d_model, config.vocab_size, use_bias=False, kernel_init=init,
        dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    """Computes next-token logits.

    Args:
      tokens: int32 `[batch, seq]`, ids in [0, vocab_size).
      segment_ids: optional int32 `[batch, seq]`, the document of each token
        in a packed window; attention never crosses documents.
      positions: optional int32 `[batch, seq]`, each token's index in its
        document (RoPE); default 0..seq-1.

    Returns:
      float32 logits `[batch, seq, vocab_size]`; position i depends only on
      tokens[:, :i + 1] (causal), and of those only on its own segment's.
    """
    x = self.embed_tokens(tokens).astype(jnp.float32)
    mask = None if segment_ids is None else document_mask(segment_ids)
    for block in self.layers:
      x = block(x, mask, positions)
    x = self.norm(x)
    if self.lm_head is None:
      logits = self.embed_tokens.attend(x)
    else:
      logits = self.lm_head(x)
    return logits.astype(jnp.float32)
