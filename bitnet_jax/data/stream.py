"""Streaming input: documents -> shuffle buffer -> tokens -> packed windows.

For file corpora (`data.mode="stream"`, the default for `parquet:`, `jsonl:`
and `arrayrecord:` datasets) nothing is tokenized before step 0. Per process:

  DocumentStream        files shuffled per epoch (seed data.shuffle_seed),
                        split across processes and grain workers, read
                        `data.read_concurrency` at a time (interleaved)
  WindowShuffle         documents shuffled within windows of
                        `data.shuffle_buffer_size` (grain)
  Tokenize              each document's ids + "<|endoftext|>", in the grain
                        worker processes (`data.worker_count`)
  ConcatThenSplit       packed without padding into windows of seq_len + 1
                        tokens (grain); a long document continues in the
                        next window
  batch, `batch.Batch` (loss mask, document features), prefetch (threads,
  or `mp_prefetch` workers)

Every stage is a grain iterator with exact `get_state`/`set_state`, so the
checkpoint's `data` item (one file per process) resumes the stream where it
stopped: file order, position in each open file, shuffle window and packer.
Windows do not overlap (MaxText's layout): the pair of tokens across two
windows is not trained on, 1 in seq_len + 1.

Document features (`data.packing="document"`, `batch.Batch.packed`) come
from the end-of-text tokens, in both modes: a document's segment ends with
its "<|endoftext|>",
segment ids count 1, 2, ... within a window and positions restart at 0 at
each segment start (also for a document continued from the previous window).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator

import grain
import numpy as np
import tokenizers

from bitnet_jax.config import ConfigError, window_length
from bitnet_jax.data import tokenizer as tokenizer_lib
from bitnet_jax.data.batch import make_batch
from bitnet_jax.data.corpus import TextSplit
from bitnet_jax.data.sources import DocumentStream

ENCODE_CHUNK = 1024  # documents per encode_batch call (bounds memory)


class Tokenize(grain.transforms.Map):
  """Maps {"text": str, ...} to {"tokens": int32 `[n + 1]`} (ids + EOT).

  Pickles as the tokenizer's JSON, so grain worker processes rebuild it.
  """

  def __init__(self, tokenizer_json: str, eot_id: int):
    self.tokenizer_json, self.eot_id = tokenizer_json, eot_id
    self._tokenizer = None

  def __getstate__(self) -> dict:
    return {**self.__dict__, "_tokenizer": None}

  def map(self, element: dict) -> dict:
    """{"text": str} -> {"tokens": int32 `[n_tokens + 1]`}, EOT last."""
    if self._tokenizer is None:
      self._tokenizer = tokenizers.Tokenizer.from_str(self.tokenizer_json)
    ids = self._tokenizer.encode(element["text"],
                                 add_special_tokens=False).ids
    ids.append(self.eot_id)
    return {"tokens": np.asarray(ids, np.int32)}


def _tokens_only(element: dict) -> np.ndarray:
  return element["tokens"]


def check_file_counts(split: TextSplit, process_count: int,
                      worker_count: int) -> None:
  """Every process and every worker must get at least one file.

  Raises:
    ConfigError: naming `data.dataset` when there are fewer files than
      processes, `data.worker_count` when a process has fewer files than
      workers, each with the fix.
  """
  n_files = len(split.files)
  if n_files < process_count:
    raise ConfigError(
        f"config.data.dataset: the train split has {n_files} files but "
        f"{process_count} processes read it, one file at least each; split "
        f"the corpus into >= {process_count} shards (or run fewer hosts)")
  if worker_count > n_files // process_count:
    raise ConfigError(
        f"config.data.worker_count={worker_count}: each process reads only "
        f"{n_files // process_count} of the {n_files} train files, fewer "
        f"than its workers; set data.worker_count<={n_files // process_count}"
        " or split the corpus into more shards")


def shuffled_documents(split: TextSplit, config, process_index: int,
                       process_count: int) -> grain.IterDataset:
  """This process's endless, shuffled documents `{"text", "epoch"}`.

  A `DocumentStream` (per-epoch file shuffle, process and worker split,
  interleaved reads) through grain's `WindowShuffleIterDataset`, which
  shuffles each run of `data.shuffle_buffer_size` documents and resumes
  exactly by re-reading the run from its saved start.
  """
  d = config.data
  documents = DocumentStream(
      split.scheme, list(split.files), split.text_feature,
      seed=d.shuffle_seed, process_index=process_index,
      process_count=process_count, read_concurrency=d.read_concurrency)
  return grain.experimental.WindowShuffleIterDataset(
      documents, window_size=d.shuffle_buffer_size, seed=d.shuffle_seed)


def train_stream(split: TextSplit, tokenizer: tokenizers.Tokenizer,
                 eot_id: int, config, local_batch: int, process_index: int,
                 process_count: int) -> grain.DatasetIterator:
  """This process's endless iterator of streamed, packed training batches.

  Yields:
    `batch.Batch`es of `[local_batch, seq_len + 1]` windows.

  Raises:
    ConfigError: see `check_file_counts`.
  """
  d = config.data
  check_file_counts(split, process_count, d.worker_count)
  ds = shuffled_documents(split, config, process_index, process_count)
  ds = ds.map(Tokenize(tokenizer.to_str(), eot_id))
  ds = grain.experimental.ConcatThenSplitIterDataset(
      ds, length_struct={"tokens": window_length(config)})
  ds = ds.map(_tokens_only).batch(local_batch, drop_remainder=True)
  ds = ds.map(functools.partial(make_batch, packing=d.packing,
                                eot_id=eot_id))
  if d.worker_count > 0:
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=d.worker_count,
        per_worker_buffer_size=d.prefetch_buffer_size))
  else:
    ds = grain.experimental.ThreadPrefetchIterDataset(
        ds, prefetch_buffer_size=d.prefetch_buffer_size)
  return iter(ds)


def _token_stream(split: TextSplit, tokenizer: tokenizers.Tokenizer,
                  eot_id: int) -> Iterator[int]:
  """The split's documents in file order, tokenized, each ending with EOT."""
  for texts in split.texts(ENCODE_CHUNK):
    for ids in tokenizer_lib.encode_documents(tokenizer, texts):
      yield from ids
      yield eot_id


def eval_stream_tokens(split: TextSplit, tokenizer: tokenizers.Tokenizer,
                       eot_id: int, config) -> np.ndarray:
  """The fixed eval windows of a file corpus, identical at every evaluation.

  The eval files are read in sorted order (no shuffle) and tokenized until
  `train.eval_batches x train.batch_size` non-overlapping windows are full.

  Returns:
    int32 `[eval_batches, batch_size, seq_len + 1]` (global batches).

  Raises:
    ConfigError: naming `train.eval_batches` (with the largest value that
      fits) when the eval files hold too few tokens.
  """
  t = config.train
  length = window_length(config)
  needed = t.eval_batches * t.batch_size * length
  tokens = np.fromiter(itertools.islice(  # reads no more than it needs
      _token_stream(split, tokenizer, eot_id), needed), np.int32)
  if tokens.size < needed:
    fits = tokens.size // (t.batch_size * length)
    raise ConfigError(
        f"config.train.eval_batches={t.eval_batches} is too large: the eval "
        f"files hold {tokens.size} tokens, room for {fits} batches of "
        f"train.batch_size={t.batch_size} windows of {length} tokens; set "
        f"train.eval_batches<={fits}, or give more eval data "
        "(data.eval_dataset, data.eval_fraction)")
  return tokens.reshape(t.eval_batches, t.batch_size, length)
