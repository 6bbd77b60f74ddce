"""Data layer: corpora, tokenizer, token caches or streams, grain pipelines.

Usage (the train loop):

  prepared = data.prepare(config)  # builds/loads everything, idempotent
  batches = data.train_iterator(prepared, config, process_index, process_count)
  batch = next(batches)
  # batch: a data.Batch; batch.tokens np.int32 [batch_size // process_count,
  # seq_len + 1], batch.loss_mask float32 [..., seq_len]; with
  # data.packing="document" also batch.segment_ids, batch.positions
  held_out = data.eval_batches(prepared, config, process_index, process_count)
  # held_out: train.eval_batches such dicts, the same at every call

Modules: `batch` (the `Batch` a step reads, its loss mask), `corpus` (which
documents), `sources` (file formats, per-epoch file
order), `tokenizer`, `pipeline` (token caches, mode choice), `stream`
(streaming, packing, document features).
"""

from __future__ import annotations

from bitnet_jax.data.batch import Batch, make_batch
from bitnet_jax.data.pipeline import (
    PreparedData,
    TokenWindows,
    eval_batches,
    prepare,
    prepare_tokenizer,
    train_iterator,
)

__all__ = [
    "Batch",
    "PreparedData",
    "TokenWindows",
    "eval_batches",
    "make_batch",
    "prepare",
    "prepare_tokenizer",
    "train_iterator",
]
