"""Causal self-attention: RoPE, GQA, document masks, dropout and a KV cache.

`Attention` is the BitNet b1.58 2B4T attention (q/k/v BitLinears, RoPE, a
sub-norm before o_proj). It runs three ways:

- training and evaluation: the whole window, `jax.nn.dot_product_attention`
  (cuDNN or XLA, `attention_implementation`), causal plus an optional
  document mask;
- training with `model.dropout_rate` > 0: the same math written out, with
  dropout on the attention probabilities (the fused kernels have none);
- decoding (`bitnet_jax.model.decode`): keys and values are written into a
  preallocated cache `[batch, max_len, n_kv_heads, head_dim]` at
  `cache_index`, and the queries attend over the whole cache under an
  explicit mask (left padding, causality).

Shape legend for the suffixed names (`q_BxLxHxD`): B batch, L query length
(the window, or the tokens decoded this call), S key length (L, or the
cache's max_len), H n_heads, K n_kv_heads, D head_dim, M d_model.

The implementation ("xla" or "cudnn") of `model.attention_implementation`
is resolved per traced shape, not once at build: "auto" and cuDNN's limits
depend on the sequence length and the mask, which differ between training
and decoding (`attention_implementation`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from bitnet_jax.config import ConfigError
from bitnet_jax.config.choices import AttentionImplementation
from bitnet_jax.model.layers import (
  BitLinear,
  apply_norm,
  apply_rope,
  bitlinear_arguments,
  dropout,
  head_dim,
  rms_norm,
  rope_frequencies,
  sub_norm,
)

_LOGGED: set[str] = set()  # attention choices already logged
# The platform ("gpu", "tpu", "cpu") of the devices a step is traced for
# (None: the host's default backend, `target_platform`) and the sharding of
# its batch rows (None: not constrained).
_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "bitnet_jax_target_platform", default=None)
_BATCH_SHARDING: contextvars.ContextVar[jax.sharding.NamedSharding | None] = (
    contextvars.ContextVar("bitnet_jax_batch_sharding", default=None))


@contextlib.contextmanager
def compiling_for(platform: str,
                  batch_sharding: jax.sharding.NamedSharding | None = None
                  ) -> Iterator[None]:
  """Traces inside this context resolve backend-dependent choices for
  `platform` (a `jax.Device.platform`: "gpu", "tpu", "cpu"), not for the
  host's default backend: a step built for a mesh of H100s on a CPU host
  (`bitnet_jax.aot`) takes cuDNN attention as it would on the GPUs.
  `batch_sharding` (a `[batch, ...]` array's sharding over the step's mesh)
  pins cuDNN attention's queries, keys and values to one sharding, which
  its partitioner requires ("Query, key and value should have same
  sharding": with FSDP, XLA may shard q by heads and k by batch).
  `training.steps` enters it with its mesh's platform and batch sharding."""
  tokens = (_TARGET_PLATFORM.set(platform),
            _BATCH_SHARDING.set(batch_sharding))
  try:
    yield
  finally:
    _TARGET_PLATFORM.reset(tokens[0])
    _BATCH_SHARDING.reset(tokens[1])


def _one_sharding(*arrays: jax.Array) -> tuple[jax.Array, ...]:
  """`arrays` constrained to `compiling_for`'s batch sharding (rows over
  the data-parallel devices, the rest replicated), where one is set on a
  mesh of several devices."""
  batch_sharding = _BATCH_SHARDING.get()
  if batch_sharding is None or batch_sharding.mesh.size == 1:
    return arrays
  return tuple(jax.lax.with_sharding_constraint(x, batch_sharding)
               for x in arrays)


def target_platform() -> str:
  """The platform being traced for: `compiling_for`'s, else
  `jax.default_backend()`."""
  return _TARGET_PLATFORM.get() or jax.default_backend()


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
  given. `backend` defaults to `target_platform()`.
  """
  backend = backend or target_platform()
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
  """Resolves `model.attention_implementation` for one attention call, on
  the platform being traced for (`target_platform`).

  "auto" is cuDNN on a GPU when `cudnn_unsupported` names no reason, and
  XLA elsewhere (a WARNING names the reason on a GPU). An explicit "cudnn"
  that cannot run is refused on a GPU (`check_cudnn`, called when a step is
  built, raises it first as a `ConfigError`) and falls back to XLA with a
  WARNING elsewhere (a GPU run's config evaluated on a CPU). The choice is
  logged once (INFO).

  Returns:
    "xla" or "cudnn", `jax.nn.dot_product_attention`'s `implementation`.

  Raises:
    ValueError: `requested` is not an `AttentionImplementation` (the enum's
      lookup; `config.validate` names the key), or "cudnn" was asked for
      on a GPU with shapes cuDNN cannot run (the reason).
  """
  choice = AttentionImplementation(requested)
  reason = cudnn_unsupported(dtype, head_dim, seq_len, masked)
  if choice is AttentionImplementation.AUTO:
    on_gpu = target_platform() == "gpu"
    if on_gpu and reason:
      _log_once(logging.WARNING, f"attention: cuDNN cannot run this model "
                f"({reason}); using the XLA implementation")
    choice = (AttentionImplementation.CUDNN if on_gpu and not reason
              else AttentionImplementation.XLA)
  elif choice is AttentionImplementation.CUDNN and reason:
    if target_platform() == "gpu":
      raise ValueError(cudnn_refusal(reason))
    _log_once(logging.WARNING, f"attention: cuDNN cannot run here "
              f"({reason}); using the XLA implementation")
    choice = AttentionImplementation.XLA
  _log_once(logging.INFO, f"attention implementation: {choice} "
            f"({jnp.dtype(dtype).name}, head dim {head_dim}, seq {seq_len}"
            f"{', document mask' if masked else ''})")
  return choice.value


def cudnn_refusal(reason: str) -> str:
  """The one-line refusal of an explicit cuDNN request that cannot run."""
  return (f"config.model.attention_implementation=cudnn cannot run: "
          f"{reason}; use auto (cuDNN where it can run) or xla")


def check_cudnn(model_config: ml_collections.ConfigDict, seq_len: int,
                masked: bool, platform: str) -> None:
  """Refuses, before compiling, an explicit cuDNN request that would
  compile XLA attention on `platform`.

  Args:
    model_config: `config.model`.
    seq_len: the training window (`train.seq_len`).
    masked: document masks are applied (`data.packing="document"`).
    platform: the platform of the step's devices ("gpu", "tpu", "cpu").

  Raises:
    ConfigError: naming `model.attention_implementation` and the reason
      (dtype, head dim, mask, platform) where the step is for a GPU, or for
      a TPU (cuDNN does not exist there).
  """
  if model_config.attention_implementation != AttentionImplementation.CUDNN:
    return
  if platform == "tpu":
    raise ConfigError(
        "config.model.attention_implementation=cudnn is NVIDIA's fused "
        "kernel and does not exist on TPU; use auto or xla")
  if platform != "gpu":
    return  # falls back to XLA with a warning (a GPU config on a CPU)
  reason = cudnn_unsupported(jnp.dtype(model_config.dtype),
                             head_dim(model_config), seq_len, masked, platform)
  if reason:
    raise ConfigError(cudnn_refusal(reason))


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


def explicit_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                       mask: jax.Array, dropout_rate: float = 0.0,
                       dropout_key: jax.Array | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(head_dim) + mask) v, written out (Vaswani et al.,
  arXiv 1706.03762), with optional dropout on the probabilities.

  Args:
    q: `[batch, q_len, n_heads, head_dim]`.
    k, v: `[batch, kv_len, n_kv_heads, head_dim]`; n_kv_heads divides n_heads
      (query head h reads key/value head h // (n_heads / n_kv_heads)).
    mask: bool, broadcastable to `[batch, n_heads, q_len, kv_len]`; every
      query row must allow at least one key.

  Returns:
    `[batch, q_len, n_heads, head_dim]` in q's dtype; softmax in float32.
  """
  groups = q.shape[2] // k.shape[2]
  k_BxSxHxD = jnp.repeat(k, groups, axis=2)
  v_BxSxHxD = jnp.repeat(v, groups, axis=2)
  scores_BxHxLxS = jnp.einsum("bqhd,bkhd->bhqk", q, k_BxSxHxD,
                              preferred_element_type=jnp.float32)
  scores_BxHxLxS = scores_BxHxLxS / jnp.sqrt(jnp.float32(q.shape[-1]))
  scores_BxHxLxS = jnp.where(mask, scores_BxHxLxS,
                             jnp.finfo(jnp.float32).min)
  probs_BxHxLxS = jax.nn.softmax(scores_BxHxLxS, axis=-1)
  if dropout_key is not None and dropout_rate > 0:
    probs_BxHxLxS = dropout(probs_BxHxLxS, dropout_rate, dropout_key)
  return jnp.einsum("bhqk,bkhd->bqhd", probs_BxHxLxS.astype(v.dtype),
                    v_BxSxHxD)


class Attention(nnx.Module):
  """Causal self-attention with RoPE and a sub-norm before o_proj (none
  with `model.sub_norms=False`).

  Grouped-query attention (Ainslie et al., "GQA", arXiv 2305.13245) when
  `n_kv_heads < n_heads`: k_proj and v_proj map d_model to
  n_kv_heads x head_dim, and query head h attends with key/value head
  h // (n_heads / n_kv_heads), the grouping of HF's `repeat_kv`.

  Imported full-precision families add (all off by default): q/k/v biases
  (`model.attention_bias`, Qwen2), a per-head RMSNorm of queries and keys
  before RoPE (`model.qk_norm`, Qwen3, shared by the heads: `q_norm`,
  `k_norm` `[head_dim]`) and a head width other than d_model / n_heads
  (`model.head_dim`: q_proj is `[d_model, n_heads x head_dim]`, o_proj its
  transpose).
  """

  def __init__(self, config: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    d, self.head_dim = config.d_model, head_dim(config)
    linear = bitlinear_arguments(config, rngs)
    self.n_heads, self.n_kv_heads = config.n_heads, kv_heads(config)
    width, kv_width = (self.n_heads * self.head_dim,
                       self.n_kv_heads * self.head_dim)
    biased = {**linear, "use_bias": config.attention_bias}
    self.q_proj = BitLinear(d, width, **biased)
    self.k_proj = BitLinear(d, kv_width, **biased)
    self.v_proj = BitLinear(d, kv_width, **biased)
    self.q_norm, self.k_norm = (
        (rms_norm(self.head_dim, eps=config.norm_eps,
                  dtype=jnp.dtype(config.dtype), rngs=rngs)
         for _ in range(2)) if config.qk_norm else (None, None))
    self.attn_sub_norm = sub_norm(width, config, rngs)
    self.o_proj = BitLinear(width, d, **linear)
    self.rope_frequencies = rope_frequencies(self.head_dim, config)
    self.requested_implementation = config.attention_implementation
    self.dropout_rate = config.dropout_rate

  def __call__(self, x: jax.Array, mask: jax.Array | None = None,
               positions: jax.Array | None = None, *,
               quant_blend: jax.Array | None = None,
               dropout_key: jax.Array | None = None,
               cache: dict[str, jax.Array] | None = None,
               cache_index: jax.Array | None = None,
               capture: bool = False) -> Any:
    """Maps normalized `[batch, seq, d_model]` to `[batch, seq, d_model]`.

    Args:
      x: the normalized residual stream `[batch, seq, d_model]`.
      mask: optional bool `[batch, 1, seq, seq]` (`document_mask`), applied
        on top of the causal mask; with a cache, the whole mask
        `[batch, 1, seq, max_len]` (causality included).
      positions: optional int32 `[batch, seq]` RoPE positions; default
        0..seq-1.
      quant_blend: optional float32 scalar in [0, 1], see `BitLinear`.
      dropout_key: a PRNG key for attention dropout (training only).
      cache: optional {"key", "value"} `[batch, max_len, n_kv_heads,
        head_dim]` in the compute dtype; x's keys and values are written at
        `cache_index` (int32 scalar) and the queries attend over the cache.
      capture: also return the q/k/v_proj outputs split into heads
        (before QK-norm and RoPE), in the compute dtype: {"query" `[batch,
        seq, n_heads, head_dim]`, "key", "value" `[batch, seq, n_kv_heads,
        head_dim]`} (what attention-relation distillation compares). Not
        with a cache.

    Returns:
      The output `[batch, seq, d_model]`; with a cache, (output, new cache);
      with `capture`, (output, projections).
    """
    batch, seq, _ = x.shape
    head_dim = self.head_dim
    kv_shape = (batch, seq, self.n_kv_heads, head_dim)
    if positions is None:
      positions = jnp.arange(seq, dtype=jnp.int32)
    q_BxLxM = checkpoint_name(self.q_proj(x, quant_blend), "query_proj")
    k_BxLxKD = checkpoint_name(self.k_proj(x, quant_blend), "key_proj")
    v_BxLxKD = checkpoint_name(self.v_proj(x, quant_blend), "value_proj")
    q_BxLxHxD = apply_rope(apply_norm(
        self.q_norm, q_BxLxM.reshape(batch, seq, self.n_heads, head_dim)),
                           positions, self.rope_frequencies)
    k_BxLxKxD = apply_rope(apply_norm(self.k_norm,
                                      k_BxLxKD.reshape(kv_shape)),
                           positions, self.rope_frequencies)
    v_BxLxKxD = v_BxLxKD.reshape(kv_shape)
    if cache is not None:  # cache["key"], cache["value"]: [B, S, K, D]
      start = (0, cache_index, 0, 0)
      cache = {"key": jax.lax.dynamic_update_slice(
                   cache["key"], k_BxLxKxD.astype(cache["key"].dtype), start),
               "value": jax.lax.dynamic_update_slice(
                   cache["value"], v_BxLxKxD.astype(cache["value"].dtype),
                   start)}
      out_BxLxHxD = explicit_attention(
          q_BxLxHxD, cache["key"].astype(q_BxLxHxD.dtype),
          cache["value"].astype(q_BxLxHxD.dtype), mask)
    elif dropout_key is not None and self.dropout_rate > 0:
      _log_once(logging.INFO, "attention: model.dropout_rate > 0 trains "
                "with the written-out attention (float32 [batch, heads, seq, "
                "seq] scores; the fused kernels have no dropout)")
      causal_1x1xLxL = jnp.tril(jnp.ones((seq, seq), bool))[None, None]
      out_BxLxHxD = explicit_attention(
          q_BxLxHxD, k_BxLxKxD, v_BxLxKxD,
          causal_1x1xLxL if mask is None else causal_1x1xLxL & mask,
          self.dropout_rate, dropout_key)
    else:
      implementation = attention_implementation(
          self.requested_implementation, q_BxLxHxD.dtype, head_dim, seq,
          mask is not None)
      if implementation == AttentionImplementation.CUDNN:
        q_BxLxHxD, k_BxLxKxD, v_BxLxKxD = _one_sharding(
            q_BxLxHxD, k_BxLxKxD, v_BxLxKxD)
      out_BxLxHxD = jax.nn.dot_product_attention(
          q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, mask=mask, is_causal=True,
          implementation=implementation)
    out = self.o_proj(
        apply_norm(self.attn_sub_norm,
                   out_BxLxHxD.reshape(batch, seq, -1)),
        quant_blend)
    out = checkpoint_name(out, "out_proj")
    if capture:
      return out, {"query": q_BxLxM.reshape(batch, seq, self.n_heads,
                                            head_dim),
                   "key": k_BxLxKD.reshape(kv_shape),
                   "value": v_BxLxKxD}
    return out if cache is None else (out, cache)
