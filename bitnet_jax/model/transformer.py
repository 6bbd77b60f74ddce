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
from the same key, so a seed gives the same model in both;
`bitnet_jax.model.layout.to_layout` converts.

The block itself is `bitnet_jax.model.block`; attention's shape legend is in
`bitnet_jax.model.attention`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from bitnet_jax.config.choices import RematPolicy, Residual
from bitnet_jax.model import residual
from bitnet_jax.model.attention import document_mask, kv_heads
from bitnet_jax.model.block import Block
from bitnet_jax.model.layers import head_dim, rms_norm

# Activations named for `model.remat_policy = "save_qkv_out"`.
SAVED_BY_QKV_OUT = ("query_proj", "key_proj", "value_proj", "out_proj")

# `model.remat_policy` -> `jax.checkpoint` policy (None: no remat), one entry
# per `RematPolicy` (tests/unit/test_model.py checks none is missing).
REMAT_POLICIES = {
    RematPolicy.NONE: None,
    RematPolicy.FULL: jax.checkpoint_policies.nothing_saveable,
    RematPolicy.DOTS_SAVEABLE: jax.checkpoint_policies.dots_saveable,
    RematPolicy.SAVE_QKV_OUT: jax.checkpoint_policies.save_only_these_names(
        *SAVED_BY_QKV_OUT)}


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
    KeyError: for a name that is not a `RematPolicy` (`config.validate`
      names the key).
  """
  return REMAT_POLICIES[name]


class OptimizerStep(nnx.Variable):
  """The optimizer updates a model's parameters received: int32 scalar.

  Not an `nnx.Param` (never trained, never in a checkpoint's `params`); set
  by `bind`."""


class Transformer(nnx.Module):
  """BitNet b1.58 language model: tokens `[batch, seq]` -> logits.

  Args:
    config: `config.model` (see `bitnet_jax.config.defaults.base_config`);
      `scan_layers` picks the parameter layout (module docstring),
      `remat_policy` what the backward pass recomputes (`checkpoint_policy`),
      `residual` the residual stream (standard or mHC-lite).
    rngs: `nnx.Rngs` with a `params` stream for initialization.
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.dtype)
    init = nnx.initializers.normal(stddev=config.init_std)
    self.embed_tokens = nnx.Embed(
        config.vocab_size, config.d_model, embedding_init=init,
        param_dtype=jnp.float32, rngs=rngs)
    keys = jax.random.split(rngs.params(), config.n_layers)

    def block(key: jax.Array, index) -> Block:  # block i: keys[i]
      return Block(config, index, rngs=nnx.Rngs(params=key))

    if config.scan_layers:
      self.layers = nnx.vmap(block, in_axes=0, out_axes=0)(
          keys, jnp.arange(config.n_layers))
    else:
      self.layers = nnx.List([block(keys[i], i)
                              for i in range(config.n_layers)])
    self.n_layers = config.n_layers
    self.cache_entry = (kv_heads(config), head_dim(config))
    self.dtype = jnp.dtype(config.dtype)
    self.scan_layers = config.scan_layers
    self.remat = checkpoint_policy(config.remat_policy)  # once, at build
    self.streams = config.residual_streams if (
        config.residual == Residual.MHC_LITE) else 0
    self.norm = rms_norm(config.d_model, eps=config.norm_eps, dtype=dtype,
                         rngs=rngs)
    self.quantization_warmup_steps = config.quantization_warmup_steps
    self.step = OptimizerStep(jnp.zeros((), jnp.int32))
    self.lm_head = None if config.tie_embeddings else nnx.Linear(
        config.d_model, config.vocab_size, use_bias=False, kernel_init=init,
        dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

  def _blocks(self, x: jax.Array, per_layer: dict,
              capture_layer: int | None = None, **block_args
              ) -> tuple[jax.Array, dict]:
    """Runs every block on the stream `x`.

    `per_layer` holds arrays with a leading `[n_layers]` axis (dropout keys,
    KV caches) handed one slice to each block; the blocks' extras come back
    stacked the same way. With `capture_layer` (an index in [0, n_layers)),
    extras["captured"] also holds that one block's attention projections
    (unstacked; with scanned layers the scan carries one copy, so the other
    blocks' projections are never stacked).
    """
    def run_block(graphdef: nnx.GraphDef, state: Any, x: jax.Array,
                  layer: dict, **extra) -> tuple[jax.Array, dict]:
      def apply(x, state, layer):
        return nnx.merge(graphdef, state)(x, **block_args, **extra, **layer)
      if self.remat is not None:
        apply = jax.checkpoint(apply, policy=self.remat)
      return apply(x, state, layer)

    if self.scan_layers:
      graphdef, state = nnx.split(self.layers)
      if capture_layer is None:
        return jax.lax.scan(
            lambda x, xs: run_block(graphdef, xs[0], x, xs[1]), x,
            (state, per_layer))

      def body(carry, xs):
        x, kept = carry
        layer_state, layer, index = xs
        x, extras = run_block(graphdef, layer_state, x, layer, capture=True)
        chosen = index == capture_layer
        kept = jax.tree.map(lambda k, n: jnp.where(chosen, n, k), kept,
                            extras.pop("captured"))
        return (x, kept), extras

      first = jax.tree.map(lambda a: a[0], (state, per_layer))
      shapes = jax.eval_shape(
          lambda s, layer, x: run_block(graphdef, s, x, layer,
                                        capture=True)[1]["captured"], *first,
          x)
      zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
      (x, kept), extras = jax.lax.scan(
          body, (x, zeros),
          (state, per_layer, jnp.arange(self.n_layers, dtype=jnp.int32)))
      return x, {**extras, "captured": kept}
    outputs, kept = [], None
    for i, layer in enumerate(self.layers):
      graphdef, state = nnx.split(layer)
      extra = {"capture": True} if i == capture_layer else {}
      x, extras = run_block(graphdef, state, x,
                            jax.tree.map(lambda a, i=i: a[i], per_layer),
                            **extra)
      if extra:
        kept = extras.pop("captured")
      outputs.append(extras)
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *outputs)
    return x, stacked if kept is None else {**stacked, "captured": kept}

  def _stream(self, tokens: jax.Array) -> jax.Array:
    x = self.embed_tokens(tokens).astype(jnp.float32)
    return residual.expand(x, self.streams) if self.streams else x

  def _final_norm(self, x: jax.Array) -> jax.Array:
    return self.norm(residual.collapse(x) if self.streams else x)

  def hidden_and_statistics(
      self, tokens: jax.Array, segment_ids: jax.Array | None = None,
      positions: jax.Array | None = None, *,
      dropout_key: jax.Array | None = None,
      capture_layer: int | None = None
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The final-norm output and per-block statistics.

    Args:
      tokens, segment_ids, positions: see `__call__`.
      dropout_key: a PRNG key to apply `model.dropout_rate` (training);
        None evaluates without dropout.
      capture_layer: None, or a block index in [0, n_layers): statistics
        also holds "captured", that block's attention projections
        ("query", "key", "value" before QK-norm and RoPE, see
        `Attention.__call__`), e.g. for attention-relation distillation or
        probes.

    Returns:
      (hidden `[batch, seq, d_model]` in the compute dtype, statistics):
      float32 `[n_layers]` arrays `attention_rms` and `ffn_rms`, the RMS of
      each block's attention and FFN outputs added to the residual stream
      (and "captured" with `capture_layer`).

    Raises:
      ValueError: `capture_layer` outside [0, n_layers).
    """
    if capture_layer is not None and not 0 <= capture_layer < self.n_layers:
      raise ValueError(f"capture_layer={capture_layer}: the model has "
                       f"{self.n_layers} blocks (0 .. {self.n_layers - 1})")
    mask = None if segment_ids is None else document_mask(segment_ids)
    per_layer = {} if dropout_key is None else {
        "dropout_key": jax.random.split(dropout_key, self.n_layers)}
    x, extras = self._blocks(self._stream(tokens), per_layer, capture_layer,
                             mask=mask, positions=positions,
                             quant_blend=self.quantization_blend())
    return self._final_norm(x), extras

  def hidden(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
             positions: jax.Array | None = None, **kwargs) -> jax.Array:
    """The final-norm output `[batch, seq, d_model]` in the compute dtype.

    Arguments as for `hidden_and_statistics`; `logits` maps the result to
    logits.
    """
    return self.hidden_and_statistics(tokens, segment_ids, positions,
                                      **kwargs)[0]

  def quantization_blend(self) -> jax.Array | None:
    """The quantization blend of these weights: float32 lambda =
    min(step / model.quantization_warmup_steps, 1) (`quantization_blend`),
    or None without a warm-up (plain ternary)."""
    return quantization_blend(self.step[...], self.quantization_warmup_steps)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """float32 logits `[..., vocab_size]` of `hidden` `[..., d_model]`."""
    if self.lm_head is None:
      return self.embed_tokens.attend(hidden).astype(jnp.float32)
    return self.lm_head(hidden).astype(jnp.float32)

  def empty_cache(self, batch: int, max_len: int) -> dict[str, jax.Array]:
    """A zero KV cache for `decode`: {"key", "value"} `[n_layers, batch,
    max_len, n_kv_heads, head_dim]` in the compute dtype."""
    shape = (self.n_layers, batch, max_len, *self.cache_entry)
    return {"key": jnp.zeros(shape, self.dtype),
            "value": jnp.zeros(shape, self.dtype)}

  def decode(self, tokens: jax.Array, positions: jax.Array, mask: jax.Array,
             cache: dict[str, jax.Array], cache_index: jax.Array
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Logits of `tokens` that continue a KV cache (`bitnet_jax.model.decode`).

    Args:
      tokens: int32 `[batch, seq]` (the prompt at prefill, then one token).
      positions: int32 `[batch, seq]` RoPE positions.
      mask: bool `[batch, 1, seq, max_len]`, the cache entries each query
        may attend to (causality and padding included).
      cache: {"key", "value"} `[n_layers, batch, max_len, n_kv_heads,
        head_dim]`; entries `cache_index .. cache_index + seq - 1` are
        written.
      cache_index: int32 scalar, the cache slot of `tokens[:, 0]`.

    Returns:
      (float32 logits `[batch, seq, vocab_size]`, the updated cache).
    """
    x, extras = self._blocks(self._stream(tokens), {"cache": cache},
                             mask=mask, positions=positions,
                             quant_blend=self.quantization_blend(),
                             cache_index=cache_index)
    return self.logits(self._final_norm(x)), extras["cache"]

  def __call__(self, tokens: jax.Array, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, **kwargs) -> jax.Array:
    """Computes next-token logits.

    Args:
      tokens: int32 `[batch, seq]`, ids in [0, vocab_size).
      segment_ids: optional int32 `[batch, seq]`, the document of each token
        in a packed window; attention never crosses documents.
      positions: optional int32 `[batch, seq]`, each token's index in its
        document (RoPE); default 0..seq-1.
      **kwargs: `dropout_key` (`hidden_and_statistics`).

    Returns:
      float32 logits `[batch, seq, vocab_size]`; position i depends only on
      tokens[:, :i + 1] (causal), and of those only on its own segment's.
    """
    return self.logits(self.hidden(tokens, segment_ids, positions, **kwargs))


def quantization_blend(step: jax.Array | int,
                       warmup_steps: int) -> jax.Array | None:
  """lambda = min(step / warmup_steps, 1), float32, or None when
  `warmup_steps` (`model.quantization_warmup_steps`) is 0 (plain ternary from
  step 0).

  `step` counts the optimizer updates already applied (0 for the first
  step), so the first step trains in full precision.
  """
  if not warmup_steps:
    return None
  return jnp.minimum(jnp.asarray(step, jnp.float32) / warmup_steps, 1.0)


def bind(graphdef: nnx.GraphDef, params: Any,
         step: jax.Array | int) -> Transformer:
  """The model of `params` as trained at optimizer step `step`.

  Every consumer of parameters (train and eval steps, samples, generation,
  lm-eval, a distillation teacher) builds its model here: the step is part
  of the model's state (`Transformer.step`), so its quantization blend
  (`Transformer.quantization_blend`) is decided inside the model, once, and
  `nnx.merge(graphdef, params)` without a step fails instead of evaluating
  another model.

  Args:
    graphdef: the Transformer's structure (`nnx.split`).
    params: its `nnx.Param`s as a pure dict (`nnx.to_pure_dict`), e.g. a
      train state's or a checkpoint's, on any devices.
    step: int32 scalar (or int), the optimizer updates `params` received.
  """
  return nnx.merge(graphdef, params, {"step": jnp.asarray(step, jnp.int32)})
