"""mHC-lite residual streams: manifold-constrained hyper-connections.

Hyper-connections (Zhu et al., arXiv 2409.19606) widen the residual stream
into n parallel streams `[batch, seq, n, d_model]`. Each sublayer (attention,
feed-forward) reads one input from them and writes its output back:

  h = sum_i pre_i x_i                       (pre  = sigmoid(pre_logits))
  x_i <- sum_j H_res[i, j] x_j + post_i F(norm(h))
                                            (post = 2 sigmoid(post_logits))

mHC (Xie et al., "mHC: Manifold-Constrained Hyper-Connections", arXiv
2512.24880) constrains H_res to the doubly stochastic matrices, so the
product of H_res over any number of layers keeps a gain <= 1 (the signal can
neither blow up nor vanish through the mixing), and keeps pre/post
non-negative. mHC-lite builds H_res exactly (no Sinkhorn iterations) as a
convex combination of the n! permutation matrices (Birkhoff-von Neumann):

  H_res = sum_k softmax(res_logits)_k P_k

For 2 streams this is alpha I + (1 - alpha) S with S the swap and
alpha = sigmoid(res_logits[identity] - res_logits[swap]).

The mixing logits start at 0: alpha = 0.5 (H_res averages the streams)
and post = 1. A large start would be an identity bypass: an identity-minus-
swap logit of 5 gives alpha = sigmoid(5) ~ 0.993, H_res ~ I, and the
streams hardly exchange what the sublayers wrote. From 0, alpha is
0.41-0.55 after 600 steps of d20 (experiments/residual.py, cpu preset;
experiments/RESULTS.md, "residual: standard vs mhc_lite").
The streams start as copies of the embedding, so identical reads would keep
them identical forever (and every H_res gradient 0); as in hyper-
connections' init (A_m = e_{k mod n}), sublayer k reads mainly from stream
k mod n: pre_logits = +2 there and -2 elsewhere (pre 0.88 / 0.12), which
makes the streams' gradients, then the streams, differ from the first
update on. (The first sublayer's H_res mixes identical copies and the
last one's feeds the streams' sum, which a doubly stochastic matrix keeps:
those two have no effect.) The logits are static learned parameters (one set per
sublayer); the papers' input-dependent terms are left out.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def permutation_matrices(n: int) -> np.ndarray:
  """All n! permutation matrices, float32 `[n!, n, n]`, the identity first."""
  perms = list(itertools.permutations(range(n)))
  return np.stack([np.eye(n, dtype=np.float32)[list(p)] for p in perms])


def mixing_matrix(res_logits: jax.Array) -> jax.Array:
  """H_res = sum_k softmax(res_logits)_k P_k: doubly stochastic `[n, n]`.

  Args:
    res_logits: float32 `[n!]` (n = 2, 3 or 4), one logit per permutation
      in `permutation_matrices` order.

  Raises:
    ValueError: when the length is not n! for n in 2..4.
  """
  sizes = {2: 2, 6: 3, 24: 4}
  if res_logits.shape[-1] not in sizes:
    raise ValueError(f"res_logits has {res_logits.shape[-1]} entries; "
                     "mHC-lite needs n! for n = 2, 3 or 4 "
                     "(config key model.residual_streams)")
  perms = jnp.asarray(permutation_matrices(sizes[res_logits.shape[-1]]))
  weights = jax.nn.softmax(res_logits.astype(jnp.float32), axis=-1)
  return jnp.einsum("k,kij->ij", weights, perms)


READ_LOGIT = 2.0  # pre logit of a sublayer's own stream (-2 elsewhere)


class HyperConnection(nnx.Module):
  """The mHC-lite read (pre) and write (H_res, post) of one sublayer.

  Args:
    streams: n, 2 to 4.
    sublayer: the sublayer's index k in the whole model (2 x block index,
      +1 for the FFN); an int, or an int32 scalar under `nnx.vmap`.

  Attributes:
    res_logits: float32 `[n!]`, the mixing logits (init 0).
    pre_logits: float32 `[n]`, input weights pre = sigmoid (init +2 on
      stream k mod n, -2 elsewhere).
    post_logits: float32 `[n]`, output weights post = 2 sigmoid (init 0: 1).

  `streams` is `model.residual_streams`, which `config.validate` keeps in
  [2, 4]; `mixing_matrix` refuses another count.
  """

  def __init__(self, streams: int, sublayer: int | jax.Array):
    count = len(permutation_matrices(streams))
    own = jnp.arange(streams) == jnp.asarray(sublayer) % streams
    self.res_logits = nnx.Param(jnp.zeros((count,), jnp.float32))
    self.pre_logits = nnx.Param(
        jnp.where(own, READ_LOGIT, -READ_LOGIT).astype(jnp.float32))
    self.post_logits = nnx.Param(jnp.zeros((streams,), jnp.float32))

  def read(self, streams: jax.Array) -> jax.Array:
    """The sublayer input sum_i pre_i x_i: float32 `[batch, seq, n, d]` ->
    `[batch, seq, d]`."""
    pre = jax.nn.sigmoid(self.pre_logits[...])
    return jnp.einsum("bsnd,n->bsd", streams, pre)

  def write(self, streams: jax.Array, output: jax.Array) -> jax.Array:
    """x_i <- sum_j H_res[i, j] x_j + post_i output.

    Args:
      streams: float32 `[batch, seq, n, d]`.
      output: the sublayer's output `[batch, seq, d]` (cast to float32).

    Returns:
      float32 `[batch, seq, n, d]`.
    """
    mixed = jnp.einsum("ij,bsjd->bsid", mixing_matrix(self.res_logits[...]),
                       streams)
    post = 2.0 * jax.nn.sigmoid(self.post_logits[...])  # [n]
    return mixed + (post[None, None, :, None] *
                    output.astype(jnp.float32)[:, :, None, :])


def expand(x: jax.Array, streams: int) -> jax.Array:
  """The embedding `[batch, seq, d]` copied into `[batch, seq, n, d]`."""
  return jnp.broadcast_to(x[:, :, None, :], (*x.shape[:2], streams,
                                             x.shape[-1]))


def collapse(streams: jax.Array) -> jax.Array:
  """The streams' sum `[batch, seq, d]`, the input of the final norm."""
  return jnp.sum(streams, axis=2)
