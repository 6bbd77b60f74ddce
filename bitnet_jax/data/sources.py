"""Sharded file corpora, read as endless streams of documents.

`data.dataset = "SCHEME:GLOB"` with SCHEME one of

  parquet      Parquet files (FineWeb, HF `datasets` shards); one document per
               row, text in the column `data.text_feature`.
  jsonl        JSON Lines, plain or compressed by suffix (`.gz`, `.zst`); one
               document per line, text in the field `data.text_feature`.
  arrayrecord  ArrayRecord files; one document per record: a serialized
               `tf.train.Example` (as TFDS and MaxText write them) with a bytes
               feature `data.text_feature`, else the record's UTF-8 bytes.

Every path goes through fsspec, so GLOB may be a local pattern or a
`gs://` / `s3://` URL once gcsfs / s3fs is installed. `**` recurses.

Bad input, decided once for all formats:
  - a glob that matches nothing, a file the reader cannot parse (corrupt
    parquet, invalid JSON line, damaged compression or ArrayRecord), a
    missing text column/field: `ConfigError` naming the file and the key;
  - an empty file (no bytes): skipped with one WARNING;
  - a document that is not valid UTF-8: skipped with a WARNING naming the
    file and the record (the first few per file), since one bad row must
    not stop a run over billions of documents.

`FileDocuments` reads one file and checkpoints the number of records it has
consumed; `DocumentStream` shuffles the file list every epoch, splits it
across processes and grain workers, and interleaves several files at once.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator
from typing import Any

import fsspec
import grain
import numpy as np
from absl import logging

from bitnet_jax.config import STREAM_SCHEMES, ConfigError

_WARNINGS_PER_FILE = 3  # skipped-document warnings logged per file
# Consecutive epochs in which a reader finds no document before it gives up:
# files move between workers every epoch, so one empty epoch is possible.
_MAX_EMPTY_EPOCHS = 8


def expand(scheme: str, pattern: str, key: str) -> dict[str, str]:
  """Returns the files matching `pattern` (recursive glob, any URL).

  One listing gives every file's size and modification time, so start-up
  makes no request per file.

  Returns:
    {path: "SIZE:MODIFIED"}, sorted by path; the fingerprint changes when a
    file is edited or replaced (see `corpus.listing_key`).

  Raises:
    ConfigError: naming `key` when nothing matches, or when the URL's
      filesystem package (gcsfs, s3fs) is not installed.
  """
  if "://" not in pattern:
    pattern = os.path.abspath(os.path.expanduser(pattern))
  try:
    fs, _ = fsspec.core.url_to_fs(pattern)
  except (ImportError, ValueError) as e:
    raise ConfigError(f"config.{key}='{scheme}:{pattern}': {e}") from e
  listing = fs.glob(pattern, detail=True)  # one listing, no stat per file
  files = {p: info for p, info in listing.items()
           if info.get("type") == "file"}
  if not files:
    where = "" if "://" in pattern else f" (resolved from {os.getcwd()})"
    raise ConfigError(f"config.{key}='{scheme}:{pattern}' matches no file"
                      f"{where}; check the glob ('**' recurses)")
  protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
  prefix = "" if protocol in ("file", "local") else f"{protocol}://"
  return {prefix + path: _fingerprint(files[path]) for path in sorted(files)}


def _fingerprint(info: dict) -> str:
  """"SIZE:MODIFIED" of an fsspec file info (keys differ by filesystem)."""
  modified = next((info[k] for k in ("mtime", "LastModified", "updated",
                                     "created") if k in info), "")
  return f"{info.get('size')}:{modified}"


def _bad_file(path: str, error: Exception) -> ConfigError:
  return ConfigError(
      f"config.data.dataset: {path} cannot be read ({type(error).__name__}: "
      f"{error}); the file is corrupt or not of its scheme's format: replace "
      f"or delete it, or narrow the glob")


def _missing_feature(path: str, feature: str, have: Any) -> ConfigError:
  return ConfigError(f"config.data.text_feature={feature!r}: {path} has no "
                     f"such column/field (it has {have}); set "
                     f"data.text_feature to the text's name")


def _parquet_records(path: str, feature: str, start: int
                     ) -> Iterator[str | bytes | None]:
  """Yields the text column from row `start` on, one row group at a time."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  with fsspec.open(path, "rb") as f:
    try:
      reader = pq.ParquetFile(f)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
      raise _bad_file(path, e) from e
    if feature not in reader.schema_arrow.names:
      raise _missing_feature(path, feature, reader.schema_arrow.names)
    first = 0
    for group in range(reader.num_row_groups):
      rows = reader.metadata.row_group(group).num_rows
      if first + rows > start:
        try:
          column = reader.read_row_group(group, columns=[feature]).column(0)
        except Exception as e:  # pylint: disable=broad-except
          raise _bad_file(path, e) from e
        yield from column.to_pylist()[max(0, start - first):]
      first += rows


def _decompressed(raw, path: str):
  """A line-iterable binary stream of `raw`, decompressed by suffix."""
  if path.endswith(".gz"):
    return gzip.GzipFile(fileobj=raw)
  if path.endswith(".zst"):
    import zstandard  # pylint: disable=g-import-not-at-top
    return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(
        raw, read_across_frames=True))
  return raw


def _jsonl_records(path: str, feature: str, start: int
                   ) -> Iterator[str | bytes | None]:
  """Yields the text field of each line from line `start` on."""
  with fsspec.open(path, "rb") as raw:
    try:
      f = _decompressed(raw, path)
      for number, line in enumerate(f):
        if number < start:
          continue
        if not line.strip():
          yield None  # a blank line: counted, skipped silently
          continue
        try:
          text = line.decode("utf-8")
        except UnicodeDecodeError:
          yield line  # bytes: reported as not UTF-8 by the caller
          continue
        try:
          record = json.loads(text)
        except json.JSONDecodeError as e:
          raise ConfigError(
              f"config.data.dataset: {path} line {number + 1} is not JSON "
              f"({e}); the file is corrupt or not JSON Lines: replace or "
              f"delete it, or narrow the glob") from e
        if not isinstance(record, dict) or feature not in record:
          have = sorted(record) if isinstance(record, dict) else "no fields"
          raise _missing_feature(f"{path} line {number + 1}", feature, have)
        yield record[feature]
    except ConfigError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise _bad_file(path, e) from e  # gzip / zlib / zstd damage


def _example_text(record: bytes, feature: str, where: str) -> bytes:
  """The `feature` bytes of a serialized tf.train.Example, else `record`.

  Raises:
    ConfigError: naming `data.text_feature` when the record is an Example
      with features but not `feature` (`where` names file and record).
  """
  # pylint: disable=g-import-not-at-top
  from google.protobuf.message import DecodeError
  from tensorflow_datasets.proto import tf_example_pb2
  try:
    example = tf_example_pb2.Example.FromString(record)
  except DecodeError:
    return record  # raw UTF-8 text
  features = example.features.feature
  if not features:
    return record
  if feature not in features or not features[feature].bytes_list.value:
    raise _missing_feature(where, feature, sorted(features))
  return features[feature].bytes_list.value[0]


def _arrayrecord_records(path: str, feature: str, start: int
                         ) -> Iterator[str | bytes | None]:
  """Yields each record's text from record `start` on (random access)."""
  # pylint: disable-next=g-import-not-at-top
  from array_record.python import array_record_module
  if "://" in path:
    raise ConfigError(f"config.data.dataset: {path}: ArrayRecord reads local "
                      f"files only; copy the shards to a local disk")
  try:
    reader = array_record_module.ArrayRecordReader(
        path, "readahead_buffer_size:0")
    count = reader.num_records()
  except Exception as e:  # pylint: disable=broad-except
    raise _bad_file(path, e) from e
  completed = False
  try:
    for index in range(start, count):
      try:
        record = reader.read([index])[0]
      except Exception as e:  # pylint: disable=broad-except
        raise _bad_file(path, e) from e
      yield _example_text(record, feature, f"{path} record {index}")
    completed = True
  finally:
    try:
      reader.close()  # verifies the file's trailer: may fail on damage
    except Exception as e:  # pylint: disable=broad-except
      if completed:  # (not while the generator is closed or failing)
        raise _bad_file(path, e) from e


_READERS = {"parquet": _parquet_records, "jsonl": _jsonl_records,
            "arrayrecord": _arrayrecord_records}
assert tuple(_READERS) == STREAM_SCHEMES


class _FileDocumentsIterator(grain.DatasetIterator):
  """Documents of one file; state: records consumed (skipped ones too)."""

  def __init__(self, source: FileDocuments):
    super().__init__()
    self._source = source
    self._consumed = 0
    self._records = None
    self._skipped = 0

  def _open(self) -> Iterator:
    source = self._source
    fs, local = fsspec.core.url_to_fs(source.path)
    if fs.size(local) == 0:
      logging.warning("skipping the empty file %s", source.path)
      return iter(())
    return _READERS[source.scheme](source.path, source.feature,
                                   self._consumed)

  def __next__(self) -> str:
    if self._records is None:
      self._records = self._open()
    while True:
      record = next(self._records)
      self._consumed += 1
      if record is None:  # blank line
        continue
      if isinstance(record, bytes):
        try:
          record = record.decode("utf-8")
        except UnicodeDecodeError as e:
          self._skip(f"is not UTF-8 ({e})")
          continue
      if not isinstance(record, str):
        self._skip(f"has no text ({type(record).__name__})")
        continue
      return record

  def _skip(self, why: str) -> None:
    self._skipped += 1
    if self._skipped <= _WARNINGS_PER_FILE:
      logging.warning("skipping record %d of %s: it %s%s", self._consumed - 1,
                      self._source.path, why,
                      " (further skips in this file are not logged)"
                      if self._skipped == _WARNINGS_PER_FILE else "")

  def get_state(self) -> dict:
    return {"consumed": self._consumed}

  def set_state(self, state: dict) -> None:
    self.close()
    self._consumed = state["consumed"]

  def close(self) -> None:
    """Closes the open file (a later `next` reopens it where it was)."""
    if self._records is not None and hasattr(self._records, "close"):
      self._records.close()
    self._records = None


class FileDocuments(grain.IterDataset):
  """The documents (`str`) of one corpus file, in file order.

  The iterator's state is the number of records consumed, so a restore
  reopens the file there (parquet seeks by row group, ArrayRecord by index,
  JSONL re-reads and skips lines).
  """

  def __init__(self, scheme: str, path: str, feature: str):
    super().__init__()
    self.scheme, self.path, self.feature = scheme, path, feature

  def __iter__(self) -> _FileDocumentsIterator:
    return _FileDocumentsIterator(self)


def epoch_files(paths: list[str], seed: int, epoch: int, process_index: int,
                process_count: int) -> list[str]:
  """This process's files in `epoch`: a seeded global shuffle, then a slice.

  Every process computes the same permutation of `paths` (seeded by `seed`
  and `epoch`) and takes positions process_index, process_index +
  process_count, ..., so the processes read disjoint files that together
  cover the corpus, in a new order each epoch.
  """
  order = np.random.default_rng([seed, epoch]).permutation(len(paths))
  return [paths[i] for i in order][process_index::process_count]


class _DocumentStreamIterator(grain.DatasetIterator):
  """Endless: epoch after epoch of interleaved files."""

  def __init__(self, stream: DocumentStream):
    super().__init__()
    self._stream = stream
    self._epoch = 0
    self._files = stream.epoch_iterator(0)
    self._served_this_epoch = False
    self._empty_epochs = 0  # consecutive, ending with the previous epoch

  def __next__(self) -> dict:
    while True:
      try:
        text = next(self._files)
      except StopIteration:
        self._empty_epochs = 0 if self._served_this_epoch else (
            self._empty_epochs + 1)
        if self._empty_epochs >= _MAX_EMPTY_EPOCHS:
          raise ConfigError(
              f"config.data.dataset: the files of this reader ("
              f"{self._stream.describe()}) held no document in "
              f"{_MAX_EMPTY_EPOCHS} epochs in a row; add data or lower "
              "data.worker_count") from None
        self._start_epoch(self._epoch + 1)
        continue
      self._served_this_epoch = True
      return {"text": text, "epoch": self._epoch}

  def _start_epoch(self, epoch: int) -> None:
    self._files.close()  # its prefetch threads and open files
    self._epoch, self._served_this_epoch = epoch, False
    self._files = self._stream.epoch_iterator(epoch)

  def get_state(self) -> dict:
    return {"epoch": self._epoch, "files": self._files.get_state()}

  def set_state(self, state: dict) -> None:
    self._start_epoch(state["epoch"])
    self._files.set_state(state["files"])

  def close(self) -> None:
    self._files.close()


class DocumentStream(grain.IterDataset):
  """Endless documents of a file corpus, as `{"text": str, "epoch": int}`.

  Epoch e reads `epoch_files(paths, seed, e, ...)`, `read_concurrency` files
  at a time interleaved (grain's `InterleaveIterDataset`); every document of
  those files comes exactly once per epoch. Under `mp_prefetch`, grain calls
  `set_slice` so that worker w reads files w, w + workers, ... of the
  process's list. Never raises StopIteration; raises ConfigError when its
  files hold no document for `_MAX_EMPTY_EPOCHS` epochs in a row, and the
  errors of `FileDocuments` (corrupt file, missing text feature).
  """

  def __init__(self, scheme: str, paths: list[str], feature: str, *,
               seed: int, process_index: int, process_count: int,
               read_concurrency: int):
    super().__init__()
    self.scheme, self.paths, self.feature = scheme, list(paths), feature
    self.seed, self.read_concurrency = seed, read_concurrency
    self.process_index, self.process_count = process_index, process_count
    self.worker_slice = slice(None)

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    """Restricts this copy to one grain worker's share of the files."""
    del sequential_slice
    self.worker_slice = sl

  def describe(self) -> str:
    return (f"{len(self.paths)} files, process {self.process_index} of "
            f"{self.process_count}, worker slice {self.worker_slice}")

  def epoch_iterator(self, epoch: int) -> grain.DatasetIterator:
    """An iterator over the documents of this reader's files in `epoch`.

    Raises:
      ConfigError: naming `data.worker_count` when this reader gets no file.
    """
    files = epoch_files(self.paths, self.seed, epoch, self.process_index,
                        self.process_count)[self.worker_slice]
    if not files:
      raise ConfigError(f"config.data.worker_count: a reader got no files ("
                        f"{self.describe()}); use at most as many workers as "
                        "each process has files")
    readers = [FileDocuments(self.scheme, p, self.feature) for p in files]
    return iter(grain.experimental.InterleaveIterDataset(
        readers, cycle_length=self.read_concurrency))

  def __iter__(self) -> _DocumentStreamIterator:
    return _DocumentStreamIterator(self)
