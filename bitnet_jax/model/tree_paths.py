"""The one reader of parameter-tree paths: names, BitLinear kinds, layouts.

A path is what `jax.tree_util.tree_leaves_with_path` yields for a leaf: a
tuple of `DictKey` (`.key`), `GetAttrKey` (`.name`, e.g. optax's named
tuples) and `SequenceKey` (`.idx`) entries. The parameter tree is the pure
dict of `nnx.to_pure_dict` (`bitnet_jax.model.transformer`), in one of two
layer layouts:

  scanned   params["layers"]["self_attn"]["q_proj"]["kernel"]
            `[n_layers, in, out]` (a module name follows "layers")
  unrolled  params["layers"][i]["self_attn"]["q_proj"]["kernel"]
            `[in, out]` (an integer block index follows "layers")

The same paths recur inside the optimizer state (Adam's moments mirror the
parameters) and in orbax's checkpoint metadata.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# The ternary layers of a block, named as in HF `BitNetForCausalLM`.
BITLINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj",
                   "gate_proj", "up_proj", "down_proj")


def path_keys(path: Sequence[Any]) -> list[str | int]:
  """The keys of a tree path: dict keys, attribute names, sequence indices.

  A key keeps its type (the unrolled layout's block indices are ints).
  """
  keys = []
  for entry in path:
    for attribute in ("key", "name", "idx"):
      if hasattr(entry, attribute):
        keys.append(getattr(entry, attribute))
        break
    else:
      keys.append(entry)
  return keys


def path_name(path: Sequence[Any]) -> str:
  """'params/layers/0/self_attn/q_proj/kernel' for a tree path."""
  return "/".join(str(key) for key in path_keys(path))


def bitlinear_kind(path: Sequence[Any]) -> str | None:
  """The `BITLINEAR_NAMES` entry of a path that ends in a BitLinear `kernel`
  (either layer layout), None for any other leaf."""
  keys = [str(key) for key in path_keys(path)]
  if len(keys) >= 2 and keys[-1] == "kernel" and keys[-2] in BITLINEAR_NAMES:
    return keys[-2]
  return None


def in_stacked_layers(path: Sequence[Any]) -> bool:
  """Whether a leaf lies in scanned blocks (its leading axis is
  `[n_layers]`): "layers" followed by a module name, not a block index."""
  keys = path_keys(path)
  return any(key == "layers" and isinstance(after, str)
             for key, after in zip(keys, keys[1:]))


def is_stacked(params: Mapping[str, Any]) -> bool:
  """Whether a parameter tree (pure dict) has the scanned layout."""
  layers = params["layers"]
  return "self_attn" in layers or "mlp" in layers
