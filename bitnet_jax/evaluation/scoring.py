"""Scoring token rows on the run's mesh: the device side of the lm-eval
backend.

A row is a window of `n + 1 <= max_length + 1` tokens whose last `scored`
targets are summed: inputs `window[:-1]`, targets `window[1:]`, as lm-eval's
`hf` backend slices `(context + continuation)[-(max_length + 1):]`. Rows are
sorted by length (longest first, as the `hf` backend orders them), cut into
batches of `batch_size` rows, and padded on the right to a bucket length (a
power of two from `MIN_BUCKET`, capped at `max_length`) and to `batch_size`
rows, so the jitted function compiles once per bucket: at most
log2(max_length / MIN_BUCKET) + 2 shapes. Right padding changes nothing
before it (the model is causal) and padded positions have weight 0.

Each batch is one global array sharded over the mesh's batch axes (every
process supplies the shards of the rows it holds, from the same host rows),
and the per-row results come back replicated, so every process has them all.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from bitnet_jax.distributed import sharding
from bitnet_jax.model.transformer import bind

MIN_BUCKET = 16  # the shortest padded row length


def bucket_length(length: int, max_length: int) -> int:
  """The padded length of a batch whose longest row has `length` inputs:
  the next power of two >= max(length, MIN_BUCKET), at most `max_length`.

  Raises:
    ValueError: when `length` exceeds `max_length` (the caller truncates).
  """
  if length > max_length:
    raise ValueError(f"a row of {length} inputs exceeds the model's context "
                     f"of {max_length} tokens")
  bucket = MIN_BUCKET
  while bucket < length:
    bucket *= 2
  return min(bucket, max_length)


def _score(params: Any, tokens: jax.Array, targets: jax.Array,
           weights: jax.Array, step: jax.Array, *,
           graphdef: nnx.GraphDef) -> tuple[jax.Array, jax.Array]:
  """(float32 `[batch]` sums of weighted target log-probabilities in nats,
  bool `[batch]` whether every weighted target is the argmax)."""
  logits = bind(graphdef, params, step)(tokens)  # float32 [B, L, V]
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  target = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  greedy = (jnp.argmax(logits, axis=-1) == targets) | (weights == 0)
  return jnp.sum(target * weights, axis=-1), jnp.all(greedy, axis=-1)


class Scorer:
  """Sums target log-probabilities of token windows with a model on a mesh.

  Args:
    graphdef, params: the model (`nnx.split` of a `Transformer`); params
      already on `mesh` (train state shardings) or anywhere else (then they
      are placed with the FSDP shardings of `bitnet_jax.distributed.sharding`).
    mesh: the run's (data, fsdp) mesh.
    batch_size: rows per scoring call; rounded up to a multiple of the
      mesh's data-parallel devices.
    max_length: the model's context in tokens (rows hold at most this many
      inputs).
    step: the optimizer step of `params` (`transformer.bind`: the
      quantization blend of a warm-up).

  Attributes:
    shapes: the (rows, length) shapes compiled so far.

  Memory: one call holds float32 logits `[rows, bucket, vocab_size]` twice
  (logits and log-softmax), e.g. 8 x 2048 x 128,256 x 4 B = 8.4 GB each for
  2B-4T at batch 8: lower `batch_size` for long contexts and large
  vocabularies.
  """

  def __init__(self, graphdef: nnx.GraphDef, params: Any, *, mesh: Mesh,
               batch_size: int, max_length: int, step: int = 0):
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    self.rows = -(-max(batch_size, 1) // shards) * shards
    self.mesh, self.max_length, self.step = mesh, max_length, step
    self.graphdef = graphdef
    self.params = self._placed(params)
    self.shapes: set[tuple[int, int]] = set()
    self._batch_sharding = sharding.batch_sharding(mesh)
    self._jitted = jax.jit(functools.partial(_score, graphdef=graphdef),
                           out_shardings=sharding.replicated(mesh))

  def _placed(self, params: Any) -> Any:
    leaf = jax.tree.leaves(params)[0]
    if (isinstance(getattr(leaf, "sharding", None), jax.NamedSharding)
        and leaf.sharding.mesh == self.mesh):
      return params
    return jax.device_put(params, sharding.state_shardings(params, self.mesh))

  def set_params(self, params: Any, step: int) -> None:
    """Scores with other parameters of the same model (e.g. a later step)."""
    self.params, self.step = self._placed(params), step

  @property
  def model(self) -> Any:
    """The `Transformer` scored (`transformer.bind` of params and step)."""
    return bind(self.graphdef, self.params, self.step)

  def _global(self, rows: np.ndarray) -> jax.Array:
    return jax.make_array_from_callback(rows.shape, self._batch_sharding,
                                        lambda index: rows[index])

  def score(self, windows: Sequence[tuple[Sequence[int], int]]
            ) -> list[tuple[float, bool]]:
    """Scores each (window, scored) pair.

    Args:
      windows: token windows of 2 to `max_length + 1` ids, each with the
        number of final targets to score (1 .. len(window) - 1).

    Returns:
      One (sum of the scored targets' log-probabilities in nats, whether each
      of them is the argmax prediction) per window, in the input order.

    Raises:
      ValueError: for a window longer than `max_length + 1` tokens, shorter
        than 2, or with `scored` outside [1, len(window) - 1].
    """
    for window, scored in windows:
      if not 2 <= len(window) <= self.max_length + 1 or not (
          1 <= scored <= len(window) - 1):
        raise ValueError(f"cannot score {scored} targets of a window of "
                         f"{len(window)} tokens (context {self.max_length})")
    unique = {(tuple(w), s): None for w, s in windows}  # same row, once
    order = sorted(unique, key=lambda key: (-len(key[0]), key[0]))
    for start in range(0, len(order), self.rows):
      chunk = order[start:start + self.rows]
      results = self._score_batch(chunk)
      unique.update(zip(chunk, results))
    return [unique[(tuple(w), s)] for w, s in windows]

  def _score_batch(self, chunk: list[tuple[tuple[int, ...], int]]
                   ) -> list[tuple[float, bool]]:
    length = bucket_length(max(len(w) - 1 for w, _ in chunk), self.max_length)
    tokens = np.zeros((self.rows, length), np.int32)
    targets = np.zeros((self.rows, length), np.int32)
    weights = np.zeros((self.rows, length), np.float32)
    for row, (window, scored) in enumerate(chunk):
      n = len(window) - 1
      tokens[row, :n], targets[row, :n] = window[:-1], window[1:]
      weights[row, n - scored:n] = 1.0
    self.shapes.add(tokens.shape)
    sums, greedy = self._jitted(
        self.params, self._global(tokens), self._global(targets),
        self._global(weights), jnp.int32(self.step))
    sums, greedy = np.asarray(sums), np.asarray(greedy)
    return [(float(sums[r]), bool(greedy[r])) for r in range(len(chunk))]
