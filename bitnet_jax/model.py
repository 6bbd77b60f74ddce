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

Two parameter layouts (`model.scan_layers`): "scanned" stacks every block
parameter on a leading `[n_layers]` axis (`params["layers"]["self_attn"]...`)
and runs the blocks with one `jax.lax.scan`, so the program (and compile
time, nearly) does not grow with depth; "unrolled" keeps one subtree per
block (`params["layers"][i]`) and a Python loop. Both draw block i's weights
from the same key, so a seed gives the same model in both; `to_layout`
converts.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from bitnet_jax.layers import BitLinear, apply_rope, rms_norm

BITLINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj",
                   "gate_proj", "up_proj", "down_proj")
# Activations named for `model.remat_policy = "save_qkv_out"`.
SAVED_BY_QKV_OUT = ("query_proj", "key_proj", "value_proj", "out_proj")


def checkpoint_policy(name: str) -> Any:
  """The `jax.checkpoint` policy of `model.remat_policy` (None: no remat).

  - "none": no rematerialization; the backward pass reads every activation
    the forward pass kept (fastest, most memory).
  - "full": `nothing_saveable`; each block keeps only its input and recomputes
    its whole forward pass during the backward pass (least memory, about one
    extra forward: ~33% more FLOPs).
  - "dots_saveable": keeps every matmul output, recomputes the elementwise
    work (norms, quantizers, activations, softmax) in between.
  - "save_qkv_out": keeps the q/k/v projections and the o_proj output
    (`SAVED_BY_QKV_OUT`, MaxText's save_qkv_proj + save_out_proj), recomputes
    the rest (attention and the feed-forward).

  Raises:
    ValueError: naming `model.remat_policy` for an unknown name.
  """
  policies = jax.checkpoint_policies
  table = {"none": None, "full": policies.nothing_saveable,
           "dots_saveable": policies.dots_saveable,
           "save_qkv_out": policies.save_only_these_names(*SAVED_BY_QKV_OUT)}
  if name not in table:
    raise ValueError(f"model.remat_policy={name!r}: use one of "
                     f"{', '.join(table)}")
  return table[name]


_LOGGED: set[str] = set()  # attention choices already logged


def _log_once(level: int, message: str) -> None:
  if message not in _LOGGED:
    _LOGGED.add(message)
    logging.log(level, message)


def cudnn_unsupported(dtype: jnp.dtype, head_dim: int, seq_len: int,
                      masked: bool, backend: str | None = None) -> str:
  """Why cuDNN fused attention cannot run these shapes ("" if it can).

  The conditions of `jax._src.cudnn.fused_attention_stablehlo`
  (`check_layout`, `check_is_flash_attention`): a GPU, bf16/fp16 inputs, a
  head dim that is a multiple of 8 and at most 128 (256 from Hopper on; 128
  is checked), an even sequence length when a mask (a bias to cuDNN) is
  given. `backend` defaults to `jax.default_backend()`.
  """
  backend = backend or jax.default_backend()
  if backend != "gpu":
    return f"no GPU (backend {backend})"
  if jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
    return f"cuDNN attention needs bfloat16 or float16, not {dtype}"
  if head_dim % 8 or head_dim > 128:
    return f"head dim {head_dim} (d_model / n_heads) must be a multiple of 8 " \
        "and at most 128"
  if masked and seq_len % 2:
    return f"document masks need an even sequence length, not {seq_len}"
  return ""


def attention_implementation(requested: str, dtype: jnp.dtype, head_dim: int,
                             seq_len: int, masked: bool) -> str:
  """Resolves `model.attention_implementation` for one attention call.

  "auto" is cuDNN on a GPU in bfloat16 and XLA elsewhere; "cudnn" (asked
  for, or chosen by "auto") falls back to XLA with a WARNING when
  `cudnn_unsupported` names a reason. The choice is logged once (INFO).
  """
  choice = requested
  if requested == "auto":
    on_gpu = jax.default_backend() == "gpu"
    choice = "cudnn" if on_gpu and dtype == jnp.bfloat16 else "xla"
  if choice == "cudnn":
    reason = cudnn_unsupported(dtype, head_dim, seq_len, masked)
    if reason:
      _log_once(logging.WARNING, f"attention: cuDNN cannot run this model "
                f"({reason}); using the XLA implementation")
      choice = "xla"
  _log_once(logging.INFO, f"attention implementation: {choice} "
            f"({jnp.dtype(dtype).name}, head dim {head_dim}, seq {seq_len}"
            f"{', document mask' if masked else ''})")
  return choice


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


def is_stacked(params: Any) -> bool:
  """Whether a parameter tree (pure dict) has the scanned layout."""
  layers = params["layers"]
  return "self_attn" in layers or "mlp" in layers


def _leaf_slice(leaf: Any, i: int) -> Any:
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
  return leaf[i]


def unstack_layers(params: Any) -> Any:
  """A scanned-layout parameter tree in the unrolled layout (a no-op on one).

  Args:
    params: a pure-dict tree (arrays, numpy arrays or `jax.ShapeDtypeStruct`s,
      the latter returned without sharding) whose `layers` leaves are
      `[n_layers, ...]`.
  """
  if not is_stacked(params):
    return params
  n_layers = jax.tree.leaves(params["layers"])[0].shape[0]
  return {**params, "layers": {
      i: jax.tree.map(lambda x, i=i: _leaf_slice(x, i), params["layers"])
      for i in range(n_layers)}}


def stack_layers(params: Any) -> Any:
  """An unrolled-layout parameter tree in the scanned layout (a no-op on one).

  Leaves are stacked with numpy for numpy inputs, jax otherwise;
  `jax.ShapeDtypeStruct`s get the leading `[n_layers]` axis (no sharding).
  """
  if is_stacked(params):
    return params
  blocks = [params["layers"][i] for i in sorted(params["layers"], key=int)]

  def stack(*leaves):
    first = leaves[0]
    if isinstance(first, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype)
    return (np.stack if isinstance(first, np.ndarray) else jnp.stack)(leaves)

  return {**params, "layers": jax.tree.map(stack, *blocks)}


def to_layout(params: Any, like: Any) -> Any:
  """`params` (either layout) in the layer layout of the tree `like`."""
  return stack_layers(params) if is_stacked(like) else unstack_layers(params)


def _linear_arguments(config: ml_collections.ConfigDict,
                      rngs: nnx.Rngs) -> dict[str, Any]:
  """The `BitLinear` keyword arguments `config.model` sets."""
  return {"quantization": config.quantization,
          "matmul": config.bitlinear_matmul, "init_std": config.init_std,
          "dtype": jnp.dtype(config.dtype), "rngs": rngs}


class Attention(nnx.Module):
  """Causal self-attention with RoPE and a sub-norm before o_proj.

  Grouped-query attention (Ainslie et al., "GQA", arXiv 2305.13245) when
  `n_kv_heads < n_heads`: k_proj and v_proj map d_model to
  n_kv_heads x head_dim, and query head h attends with key/value head
  h // (n_heads / n_kv_heads), the grouping of HF's `repeat_kv`.
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    d, dtype = config.d_model, jnp.dtype(config.dtype)
    linear = _linear_arguments(config, rngs)
    self.n_heads, self.n_kv_heads = config.n_heads, kv_heads(config)
    kv_width = self.n_kv_heads * (d // self.n_heads)
    self.q_proj = BitLinear(d, d, **linear)
    self.k_proj = BitLinear(d, kv_width, **linear)
    self.v_proj = BitLinear(d, kv_width, **linear)
    self.attn_sub_norm = rms_norm(d, eps=config.norm_eps, dtype=dtype,
                                  rngs=rngs)
    self.o_proj = BitLinear(d, d, **linear)
    self.rope_theta = config.rope_theta
    self.requested_implementation = config.attention_implementation

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
    q = checkpoint_name(self.q_proj(x), "query_proj")
    k = checkpoint_name(self.k_proj(x), "key_proj")
    v = checkpoint_name(self.v_proj(x), "value_proj")
    q = apply_rope(q.reshape(q_heads), positions, self.rope_theta)
    k = apply_rope(k.reshape(kv_shape), positions, self.rope_theta)
    implementation = attention_implementation(
        self.requested_implementation, q.dtype, head_dim, seq,
        mask is not None)
    out = jax.nn.dot_product_attention(
        q, k, v.reshape(kv_shape), mask=mask, is_causal=True,
        implementation=implementation)
    out = self.o_proj(self.attn_sub_norm(out.reshape(batch, seq, d_model)))
    return checkpoint_name(out, "out_proj")


class FeedForward(nnx.Module):
  """Gated FFN: down(ffn_sub_norm(act(gate(x)) * up(x))).

  act is SiLU ("swiglu", the b1.58 paper) or squared ReLU ("relu2", 2B4T).
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    d, f, dtype = config.d_model, config.ffn_dim, jnp.dtype(config.dtype)
    linear = _linear_arguments(config, rngs)
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
    config: `config.model` (see `bitnet_jax.config.base_config`);
      `scan_layers` picks the parameter layout (module docstring),
      `remat_policy` what the backward pass recomputes (`checkpoint_policy`).
    rngs: `nnx.Rngs` with a `params` stream for initialization.
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.dtype)
    init = nnx.initializers.normal(stddev=config.init_std)
    self.embed_tokens = nnx.Embed(
        config.vocab_size, config.d_model, embedding_init=init,
        param_dtype=jnp.float32, rngs=rngs)
    keys = jax.random.split(rngs.params(), config.n_layers)

    def block(key: jax.Array) -> Block:  # block i's weights come from keys[i]
      return Block(config, rngs=nnx.Rngs(params=key))

    if config.scan_layers:
      self.layers = nnx.vmap(block, in_axes=0, out_axes=0)(keys)
    else:
      self.layers = nnx.List([block(keys[i]) for i in range(config.n_layers)])
    self.scan_layers = config.scan_layers
    self.remat_policy = config.remat_policy
    self.norm = rms_norm(config.d_model, eps=config.norm_eps, dtype=dtype,
                         rngs=rngs)
    self.lm_head = None if config.tie_embeddings else nnx.Linear(
        config.d_model, config.vocab_size, use_bias=False, kernel_init=init,
        dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

  def hidden(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
             positions: jax.Array | None = None) -> jax.Array:
    """The final-norm output `[batch, seq, d_model]` in the compute dtype.

    Arguments as for `__call__`; `logits` maps the result to logits.
    """
    x = self.embed_tokens(tokens).astype(jnp.float32)
    mask = None if segment_ids is None else document_mask(segment_ids)
    policy = checkpoint_policy(self.remat_policy)

    def run_block(graphdef: nnx.GraphDef, x: jax.Array, state: Any):
      def apply(x, state):
        return nnx.merge(graphdef, state)(x, mask, positions)
      if self.remat_policy != "none":
        apply = jax.checkpoint(apply, policy=policy)
      return apply(x, state)

    if self.scan_layers:
      graphdef, state = nnx.split(self.layers)
      x, _ = jax.lax.scan(lambda x, s: (run_block(graphdef, x, s), None),
                          x, state)
    else:
      for layer in self.layers:
        graphdef, state = nnx.split(layer)
        x = run_block(graphdef, x, state)
    return self.norm(x)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """float32 logits `[..., vocab_size]` of `hidden` `[..., d_model]`."""
    if self.lm_head is None:
      return self.embed_tokens.attend(hidden).astype(jnp.float32)
    return self.lm_head(hidden).astype(jnp.float32)

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
    return self.logits(self.hidden(tokens, segment_ids, positions))
