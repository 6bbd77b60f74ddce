"""The two parameter layouts of the blocks, and conversion between them.

"scanned": every block parameter stacked on a leading `[n_layers]` axis,
`params["layers"]["self_attn"]["q_proj"]["kernel"]` `[n_layers, in, out]`;
"unrolled": one subtree per block, `params["layers"][i]` (see
`bitnet_jax.model.transformer`). The functions work on pure-dict trees of jax
arrays,
numpy arrays or `jax.ShapeDtypeStruct`s.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.model.tree_paths import is_stacked


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
