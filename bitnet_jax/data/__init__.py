"""Data layer: corpora, tokenizer, token caches and the grain pipeline.

Usage (the train loop):

  prepared = data.prepare(config)  # builds/loads everything, idempotent
  batches = data.train_iterator(prepared, config, process_index, process_count)
  batch = next(batches)  # np.int32 [batch_size // process_count, seq_len + 1]
  held_out = data.eval_batches(prepared, config, process_index, process_count)
  # held_out: np.int32 [eval_batches, batch_size // process_count, seq_len + 1]
"""

from __future__ import annotations

from bitnet_jax.data.pipeline import (
    PreparedData,
    TokenWindows,
    eval_batches,
    prepare,
    train_iterator,
)

__all__ = [
    "PreparedData",
    "TokenWindows",
    "eval_batches",
    "prepare",
    "train_iterator",
]
