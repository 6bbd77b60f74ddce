"""Autoregressive decoding with a KV cache: one prefill, then a decode loop.

`generate` left-pads a batch of prompts to a common length P, allocates a
cache of P + max_new_tokens slots per layer, runs the prompts through the
model once (prefill, writing slots 0..P-1), then a `jax.lax.scan` of
single-token steps (static shapes: one compilation per (batch, P,
max_new_tokens)). Row r's prompt starts at slot P - len_r: its RoPE
positions count from there, and its queries never see the padding slots.

The model runs the same `BitLinear` code it trained with (fake-quantized
ternary weights and int8 activations, per token), so cached decoding gives
the logits of the full forward pass (tested to 1e-5 in float32).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils


def sample_logits(logits: jax.Array, key: jax.Array, *, temperature: float,
                  top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Draws one token per row of `logits` float32 `[batch, vocab_size]`.

  temperature 0 is greedy (argmax). Otherwise the logits are divided by the
  temperature, cut to the `top_k` largest (0: all) and to the smallest set
  whose probability reaches `top_p` (nucleus sampling, Holtzman et al.,
  arXiv 1904.09751; 1.0: all), then sampled. Returns int32 `[batch]`.
  """
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    cumulative = jnp.cumsum(jax.nn.softmax(ordered, axis=-1), axis=-1)
    # the smallest logit still inside the nucleus (the first always is)
    inside = jnp.sum(cumulative - jax.nn.softmax(ordered, axis=-1) < top_p,
                     axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(ordered, inside - 1, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0,
             length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Right-aligns prompts in int32 `[batch, P]` (P = `length`, default the
  longest); returns it and int32 `[batch]` start slots (P - len).

  Raises:
    ValueError: on an empty prompt list or an empty prompt, or a prompt
      longer than `length`.
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token (--prompt)")
  longest = max(len(p) for p in prompts)
  if length is not None and longest > length:
    raise ValueError(f"a prompt of {longest} tokens does not fit in a "
                     f"padded length of {length}")
  length = longest if length is None else length
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  for row, prompt in enumerate(prompts):
    tokens[row, length - len(prompt):] = prompt
  return tokens, np.array([length - len(p) for p in prompts], np.int32)


def _mask(starts: jax.Array, first: jax.Array, seq: int, max_len: int
          ) -> jax.Array:
  """bool `[batch, 1, seq, max_len]`: query slot i (= first + row) sees key
  slot j when j <= i and j >= its row's start (a padding query only sees
  itself, so its softmax is defined)."""
  query = first + jnp.arange(seq)[None, :, None]  # [1, seq, 1]
  key = jnp.arange(max_len)[None, None, :]  # [1, 1, max_len]
  valid = (key <= query) & (key >= starts[:, None, None])  # [batch, ...]
  return (valid | (key == query))[:, None]


@functools.partial(jax.jit, static_argnames=(
    "graphdef", "max_new_tokens", "temperature", "top_k", "top_p",
    "return_logits"))
def _prefill_and_decode(state: Any, tokens: jax.Array, starts: jax.Array,
                        key: jax.Array, *,
                        graphdef: nnx.GraphDef, max_new_tokens: int,
                        temperature: float, top_k: int, top_p: float,
                        return_logits: bool
                        ) -> tuple[jax.Array, jax.Array | None]:
  """The prefill and the decode loop: (int32 `[batch, max_new_tokens]`
  tokens, float32 `[batch, max_new_tokens, vocab_size]` logits they were
  drawn from, or None without `return_logits`)."""
  model = nnx.merge(graphdef, state)
  batch, length = tokens.shape
  max_len = length + max_new_tokens
  cache = model.empty_cache(batch, max_len)
  positions = jnp.maximum(jnp.arange(length)[None] - starts[:, None], 0)
  logits, cache = model.decode(
      tokens, positions, _mask(starts, 0, length, max_len), cache,
      jnp.int32(0))

  def draw(logits, key):
    return sample_logits(logits, key, temperature=temperature, top_k=top_k,
                         top_p=top_p)

  def step(carry, index):  # feeds new token `index`, draws token index + 1
    cache, token, key = carry
    slot = length + index
    logits, cache = model.decode(
        token[:, None], (slot - starts)[:, None],
        _mask(starts, slot, 1, max_len), cache, slot)
    key, subkey = jax.random.split(key)
    following = draw(logits[:, 0], subkey)
    return (cache, following, key), (
        following, logits[:, 0] if return_logits else None)

  key, subkey = jax.random.split(key)
  first = draw(logits[:, -1], subkey)
  _, (rest, rest_logits) = jax.lax.scan(
      step, (cache, first, key), jnp.arange(max_new_tokens - 1))
  tokens = jnp.concatenate([first[:, None], rest.T], axis=1)
  if not return_logits:
    return tokens, None
  logits = jnp.concatenate([logits[:, -1:], jnp.swapaxes(rest_logits, 0, 1)],
                           axis=1)
  return tokens, logits


def generate(model: Any, prompts: Sequence[Sequence[int]],
             max_new_tokens: int, *, context_len: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, return_logits: bool = False,
             prompt_len: int | None = None) -> Any:
  """Continues each prompt by `max_new_tokens` tokens.

  Args:
    model: a `bitnet_jax.model.transformer.Transformer` (from
      `transformer.bind`: its step sets the quantization blend), or its
      `nnx.split` (graphdef, state).
    prompts: token id lists, one per row (any lengths >= 1).
    max_new_tokens: tokens to generate per row, >= 1.
    context_len: the longest sequence the model may see (its training
      `train.seq_len`): the longest prompt + max_new_tokens must fit.
    temperature, top_k, top_p: see `sample_logits` (0: greedy).
    seed: PRNG seed of the sampling.
    return_logits: also return the float32 logits each new token was drawn
      from.
    prompt_len: left-pad every prompt to this many slots (a static bucket
      shape, so batches of other prompt lengths reuse one compilation);
      default the longest prompt.

  Returns:
    int32 `[batch, max_new_tokens]` new tokens; with `return_logits`,
    (tokens, float32 `[batch, max_new_tokens, vocab_size]`).

  Raises:
    ValueError: naming the flag: `--max_new_tokens` when it is < 1 or the
      prompt plus it exceed `context_len`; `--prompt` / `--text_file` for an
      empty prompt or one of `context_len` tokens or more; `--temperature`
      < 0, `--top_p` outside (0, 1], `--top_k` < 0.
  """
  tokens, starts = left_pad(prompts, length=prompt_len)
  if max_new_tokens < 1:
    raise ValueError(f"--max_new_tokens={max_new_tokens} must be >= 1")
  if temperature < 0:
    raise ValueError(f"--temperature={temperature} must be >= 0 (0: greedy)")
  if not 0 < top_p <= 1:
    raise ValueError(f"--top_p={top_p} must lie in (0, 1] (1: no nucleus)")
  if top_k < 0:
    raise ValueError(f"--top_k={top_k} must be >= 0 (0: all tokens)")
  if tokens.shape[1] >= context_len:
    raise ValueError(
        f"the prompt has {tokens.shape[1]} tokens; the model's context is "
        f"{context_len} (train.seq_len): shorten --prompt / --text_file")
  if tokens.shape[1] + max_new_tokens > context_len:
    raise ValueError(
        f"--max_new_tokens={max_new_tokens} plus the prompt's "
        f"{tokens.shape[1]} tokens exceed the model's context of "
        f"{context_len} tokens (train.seq_len): lower --max_new_tokens to "
        f"{context_len - tokens.shape[1]} or shorten the prompt")
  graphdef, state = model if isinstance(model, tuple) else nnx.split(model)
  new_tokens, logits = _prefill_and_decode(
      state, jnp.asarray(tokens), jnp.asarray(starts), jax.random.key(seed),
      graphdef=graphdef, max_new_tokens=max_new_tokens,
      temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
      return_logits=return_logits)
  if return_logits:
    return np.asarray(_host(new_tokens)), np.asarray(_host(logits))
  return np.asarray(_host(new_tokens))


def greedy(model: Any, prompt: np.ndarray, max_new_tokens: int
           ) -> np.ndarray:
  """Greedy decoding (KV cache): each new token is the argmax; the context
  is exactly the prompt plus the new tokens.

  Args:
    model: the language model (as `generate`).
    prompt: int32 `[batch, prompt_len]` token ids, prompt_len >= 1.
    max_new_tokens: tokens to append, >= 1.

  Returns:
    int32 `[batch, max_new_tokens]`, the generated ids.

  Raises:
    ValueError: naming `--max_new_tokens` when it is < 1, or when the prompt
      is empty.
  """
  prompt = np.asarray(prompt, np.int32)
  if prompt.ndim != 2 or prompt.shape[1] == 0:
    raise ValueError(f"the prompt must be [batch, len >= 1], got shape "
                     f"{prompt.shape}")
  return generate(model, prompt.tolist(), max_new_tokens,
                  context_len=prompt.shape[1] + max(max_new_tokens, 0))


def _host(array: jax.Array) -> jax.Array:
  """`array` in full on every process (an allgather on several hosts)."""
  if jax.process_count() == 1 or array.is_fully_addressable:
    return array
  return multihost_utils.process_allgather(array, tiled=True)

