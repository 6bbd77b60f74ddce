"""`Batch`: what a train or eval step reads, with its loss mask.

A batch holds windows of `seq_len + 1` tokens. The label shift lives here and
only here (`split_window`): inputs are `window[:, :-1]`, targets
`window[:, 1:]`, so the logits at position i are scored against token i + 1.
Scored against token i, the task is copying and the loss falls "too fast"
(`experiments/copy_bug.py` reproduces it; the `copying` and `loss_too_fast`
alarms of `bitnet_jax.metrics.health` catch it).

`loss_mask` weights each target: every loss, metric and evaluation of a
batch weights its positions by it and only by it (Levanter's
`LmExample.loss_mask`). The data pipeline sets it: all ones for plain
windows, 0 where a packed window's target starts another document than its
input (`packed`); a chat template would set it to the assistant's tokens.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import struct


def split_window(window: Any) -> tuple[Any, Any]:
  """Splits int32 `[batch, seq_len + 1]` into inputs and targets.

  Returns:
    (inputs, targets), each int32 `[batch, seq_len]`, targets[:, i] being the
    token that follows inputs[:, i].

  Raises:
    ValueError: if the window is not 2-D with at least two tokens.
  """
  if window.ndim != 2 or window.shape[1] < 2:
    raise ValueError(f"expected a window [batch, seq_len + 1] with at least "
                     f"2 tokens, got shape {window.shape}")
  return window[:, :-1], window[:, 1:]


@struct.dataclass
class Batch:
  """Token windows and what the model and the loss need besides them.

  A pytree (numpy arrays from the data pipeline, `jax.Array`s on the mesh,
  or `jax.ShapeDtypeStruct`s to lower a step).

  Attributes:
    tokens: int32 `[batch, seq_len + 1]` windows.
    loss_mask: float32 `[batch, seq_len]`, the weight of target
      `tokens[:, i + 1]`: 1 where it counts, 0 where it does not.
    segment_ids: None, or int32 `[batch, seq_len + 1]`: the packed document
      of each token (attention stays within a document).
    positions: None, or int32 `[batch, seq_len + 1]`: each token's index in
      its document (RoPE positions restart at each document).
  """
  tokens: Any
  loss_mask: Any
  segment_ids: Any = None
  positions: Any = None

  @property
  def inputs(self) -> Any:
    """int32 `[batch, seq_len]`, the model's input tokens."""
    return split_window(self.tokens)[0]

  @property
  def targets(self) -> Any:
    """int32 `[batch, seq_len]`, the token after each input."""
    return split_window(self.tokens)[1]

  @property
  def features(self) -> dict[str, Any]:
    """The model's keyword arguments for `inputs`: `segment_ids` and
    `positions` of the input positions ({} without packing)."""
    if self.segment_ids is None:
      return {}
    return {"segment_ids": self.segment_ids[:, :-1],
            "positions": self.positions[:, :-1]}

  @classmethod
  def of_windows(cls, tokens: Any) -> Batch:
    """Plain windows (`data.packing="concat"`): every target counts."""
    tokens = np.asarray(tokens, np.int32)
    return cls(tokens=tokens, loss_mask=np.ones(
        (*tokens.shape[:-1], tokens.shape[-1] - 1), np.float32))

  @classmethod
  def packed(cls, tokens: Any, eot_id: int) -> Batch:
    """Windows of documents packed back to back, each ending with `eot_id`
    (`data.packing="document"`).

    segment id = 1 + the end-of-text tokens before the position; position =
    the distance from the start of its segment; the loss mask is 0 where the
    target lies in another document than its input (the first token of the
    next document is not predicted from the previous one).
    """
    tokens = np.asarray(tokens, np.int32)
    is_end = tokens == eot_id
    ends_before = np.cumsum(is_end, axis=-1) - is_end
    index = np.arange(tokens.shape[-1], dtype=np.int32)
    starts = np.concatenate([np.ones_like(is_end[..., :1]),
                             is_end[..., :-1]], axis=-1)
    segment_start = np.maximum.accumulate(np.where(starts, index, 0),
                                          axis=-1)
    segment_ids = (1 + ends_before).astype(np.int32)
    return cls(tokens=tokens,
               loss_mask=(segment_ids[..., 1:] == segment_ids[..., :-1]
                          ).astype(np.float32),
               segment_ids=segment_ids,
               positions=(index - segment_start).astype(np.int32))

  @classmethod
  def shapes(cls, batch_size: int, seq_len: int, packed: bool,
             sharding: Any = None) -> Batch:
    """The batch as `jax.ShapeDtypeStruct`s (ahead-of-time lowering)."""
    window = jax.ShapeDtypeStruct((batch_size, seq_len + 1), np.int32,
                                  sharding=sharding)
    mask = jax.ShapeDtypeStruct((batch_size, seq_len), np.float32,
                                sharding=sharding)
    if not packed:
      return cls(tokens=window, loss_mask=mask)
    return cls(tokens=window, loss_mask=mask, segment_ids=window,
               positions=window)


def make_batch(tokens: Any, packing: str, eot_id: int) -> Batch:
  """The `Batch` of windows `[..., seq_len + 1]` for `data.packing`."""
  if packing == "document":
    return Batch.packed(tokens, eot_id)
  return Batch.of_windows(tokens)
