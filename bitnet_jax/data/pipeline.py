"""Token caches, the grain input pipeline, and the choice of mode.

`data.mode`: "stream" reads file corpora as they train (`data.stream`);
"prepared" tokenizes a split once into a token cache; "auto" streams
`parquet:`, `jsonl:` and `arrayrecord:` datasets and prepares the others.

In prepared mode, `prepare(config)` turns a corpus into two flat token files
(train, eval):

  DATA_DIR/tokens/<KEY>/tokens.bin   the split's documents, tokenized and
                                     concatenated with "<|endoftext|>" between
                                     them; uint16 (vocab <= 65536) or uint32
  DATA_DIR/tokens/<KEY>/meta.json    n_tokens, dtype, ...; written last, so
                                     its presence marks a complete cache

KEY hashes the split's identity and the tokenizer's JSON, so a new dataset or
tokenizer gets a new cache and an existing cache is never tokenized again.
A cache whose file size disagrees with its metadata (truncated, overwritten)
is logged and rebuilt.

A window is `seq_len + 1` consecutive tokens: window i is
tokens[i * seq_len : i * seq_len + seq_len + 1], so inputs are window[:-1] and
targets window[1:], and consecutive windows share one token. A split of
n_tokens tokens has (n_tokens - 1) // seq_len windows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import itertools
import json
import operator
import os
import re

import grain
import numpy as np
import tokenizers
from absl import logging

from bitnet_jax.config import STREAM_SCHEMES, ConfigError, window_length
from bitnet_jax.data import mirror, stream
from bitnet_jax.data import tokenizer as tokenizer_lib
from bitnet_jax.data.batch import make_batch
from bitnet_jax.data.corpus import TextSplit, open_splits
from bitnet_jax.storage import files

_CACHE_FORMAT = 1  # bump when the token file layout changes
# A token cache entry's files, its completion marker last (see `mirror`).
_CACHE_FILES = ("tokens.bin", "meta.json")
_READ_THREADS = 4  # grain threads slicing windows and stacking batches


@dataclasses.dataclass(frozen=True)
class PreparedData:
  """Everything `train_iterator` and `eval_batches` read, built by `prepare`.

  Attributes:
    tokenizer: the tokenizer the caches were made with.
    train_tokens: path of the train token file (flat `[train_n_tokens]`);
      "" in stream mode.
    eval_tokens: path of the eval token file (flat `[eval_n_tokens]`).
    dtype: numpy dtype name of both token files, "uint16" or "uint32".
    train_n_tokens: tokens in the train file (0 in stream mode).
    eval_n_tokens: tokens in the eval file.
    eot_id: id of the document separator "<|endoftext|>".
    tokenizer_path: the tokenizer.json the tokenizer was loaded from/cached at.
    mode: "prepared" or "stream" (`data.mode` resolved).
    train_split: the train documents (their files, in stream mode).
    eval_split: the eval documents.
  """
  tokenizer: tokenizers.Tokenizer = dataclasses.field(repr=False)
  train_tokens: str
  eval_tokens: str
  dtype: str
  train_n_tokens: int
  eval_n_tokens: int
  eot_id: int
  tokenizer_path: str
  mode: str = "prepared"
  train_split: TextSplit | None = dataclasses.field(
      default=None, repr=False, compare=False)
  eval_split: TextSplit | None = dataclasses.field(
      default=None, repr=False, compare=False)


def data_mode(config) -> str:
  """`data.mode` resolved: "auto" streams parquet/jsonl/arrayrecord globs."""
  if config.data.mode != "auto":
    return config.data.mode
  streams = config.data.dataset.partition(":")[0] in STREAM_SCHEMES
  return "stream" if streams else "prepared"


def data_root(config) -> str:
  """Returns the absolute local cache directory of `config.data.data_dir`.

  "" means `$XDG_CACHE_HOME/bitnet_jax`, or `~/.cache/bitnet_jax` when
  XDG_CACHE_HOME is unset; an object store (gs://…) its local mirror
  (`mirror.local_root`). The directory is created if missing.
  """
  root = config.data.data_dir
  remote = mirror.remote_root(config)
  if remote is not None:
    root = mirror.local_root(remote)
  elif not root:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    root = os.path.join(cache, "bitnet_jax")
  root = os.path.abspath(os.path.expanduser(root))
  os.makedirs(root, exist_ok=True)
  return root


def token_dtype(vocab_size: int) -> np.dtype:
  """Returns the narrowest unsigned dtype holding ids in [0, vocab_size)."""
  return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def read_tokens(path: str, n_tokens: int, dtype: str) -> np.ndarray:
  """Maps a token file read-only: returns a `[n_tokens]` array of `dtype`."""
  return np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,))


def _valid_cache(bin_path: str, meta_path: str) -> dict | None:
  """Returns the metadata of a complete cache, None if absent or damaged."""
  if not os.path.exists(meta_path):
    return None
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    expected = meta["n_tokens"] * np.dtype(meta["dtype"]).itemsize
    actual = os.path.getsize(bin_path)
  except (OSError, ValueError, KeyError, TypeError) as e:
    logging.warning("Token cache %s is unreadable (%s); rebuilding", meta_path,
                    e)
    return None
  if actual != expected:
    logging.warning("Token cache %s holds %d bytes but its metadata says %d "
                    "(truncated or overwritten); rebuilding", bin_path, actual,
                    expected)
    return None
  return meta


def token_cache(split: TextSplit, tokenizer: tokenizers.Tokenizer,
                eot_id: int, root: str, remote: str | None = None
                ) -> tuple[str, int, str]:
  """Tokenizes `split` into `root/tokens/<key>/` unless already done.

  Documents are encoded `stream.ENCODE_CHUNK` at a time and appended to a
  temporary file, so memory stays bounded; the file is then renamed into
  place and the metadata written last. With `remote` (a gs:// data_dir),
  the entry is first fetched from it if it has one, and uploaded to it
  when it has not (`mirror`).

  Returns:
    (path of tokens.bin, n_tokens, dtype name).
  """
  tokenizer_json = tokenizer.to_str()
  key = hashlib.sha256(f"{_CACHE_FORMAT}\0{split.key}\0{tokenizer_json}"
                       .encode()).hexdigest()[:20]
  relative = os.path.join("tokens", key)
  directory = os.path.join(root, relative)
  bin_path = os.path.join(directory, "tokens.bin")
  meta_path = os.path.join(directory, "meta.json")
  mirror.fetch(root, remote, relative, _CACHE_FILES)
  meta = _valid_cache(bin_path, meta_path)
  if meta is not None:
    logging.info("Using token cache %s (%d tokens)", bin_path, meta["n_tokens"])
    mirror.publish(root, remote, relative, _CACHE_FILES)
    return bin_path, meta["n_tokens"], meta["dtype"]

  dtype = token_dtype(tokenizer.get_vocab_size())
  logging.info("Tokenizing the documents of %s into %s", split.key, bin_path)
  os.makedirs(directory, exist_ok=True)
  tmp = files.temporary_path(bin_path)
  n_tokens = n_documents = 0
  with open(tmp, "wb") as f:
    for texts in split.texts(stream.ENCODE_CHUNK):
      pieces = []
      for ids in tokenizer_lib.encode_documents(tokenizer, texts):
        if n_documents:
          pieces.append((eot_id,))
        pieces.append(ids)
        n_documents += 1
      chunk = np.fromiter(itertools.chain.from_iterable(pieces), dtype=dtype)
      chunk.tofile(f)
      n_tokens += chunk.size
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, bin_path)
  meta = {"format": _CACHE_FORMAT, "split": split.key, "n_tokens": n_tokens,
          "n_documents": n_documents, "dtype": dtype.name,
          "vocab_size": tokenizer.get_vocab_size(), "eot_id": eot_id}
  files.write_atomically(meta_path, json.dumps(meta, indent=1).encode())
  logging.info("Wrote %d tokens of %d documents to %s", n_tokens, n_documents,
               bin_path)
  mirror.publish(root, remote, relative, _CACHE_FILES)
  return bin_path, n_tokens, dtype.name


@contextlib.contextmanager
def _data_dir_errors(config):
  """Turns a full or read-only `data.data_dir` (an OSError, or TFDS's
  RuntimeError around one) into a ConfigError naming the key and the fix."""
  try:
    yield
  except (OSError, RuntimeError) as e:
    full = (getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT,
                                          errno.EFBIG) or
            any(why in str(e) for why in ("No space left on device",
                                          "File too large")) or
            # a short write (io's BufferedWriter): the disk filled up
            bool(re.fullmatch(r"\d+ requested and \d+ written", str(e))))
    read_only = getattr(e, "errno", None) in (errno.EROFS, errno.EACCES,
                                              errno.EPERM)
    if not (full or read_only):
      raise
    # (not data_root(): it creates the directory, which may be what failed)
    where = config.data.data_dir or "the default, under $XDG_CACHE_HOME"
    raise ConfigError(
        f"config.data.data_dir ({where}): "
        + ("no space left on its disk" if full else
           f"cannot be written ({getattr(e, 'strerror', e)})")
        + " while preparing the data; free space there or set "
        "--config.data.data_dir=<a writable directory with room for the "
        "corpus and its token caches> (partial files were not kept)") from e


def prepare_tokenizer(config) -> tuple[tokenizers.Tokenizer, str]:
  """The first part of `prepare`: (the tokenizer, the path it was loaded
  from or cached at), trained on the train split and cached when absent.

  Cheap once cached, so that a run can check the tokenizer against its
  history before `prepare` spends minutes tokenizing with the wrong one.

  Raises:
    ConfigError: as `prepare`.
  """
  with _data_dir_errors(config):
    root = data_root(config)
    files.remove_stale_temporaries(os.path.join(root, "tokenizers"))
    train, _ = open_splits(config, root)
    return tokenizer_lib.get_tokenizer(config, root, train)


def prepare(config, tokenizer: tuple[tokenizers.Tokenizer, str] | None = None
            ) -> PreparedData:
  """Builds or loads the corpus, the tokenizer and both token caches.

  Idempotent: a second call with the same config reads everything from
  `data.data_dir` without tokenizing again. All files are written atomically,
  so an interrupted call leaves no partial cache behind; the temporary files
  of killed writers are deleted first (`remove_stale_temporaries`). In a
  multi-host run every process may call it; with a data_dir shared by the
  hosts, call it on one host first so the BPE is trained once.

  Args:
    config: the run config.
    tokenizer: what `prepare_tokenizer(config)` returned, if the caller
      already has it (it is then not loaded or fetched again).

  Raises:
    ConfigError: naming the offending key for a bad `data.dataset`,
      `data.tokenizer_path`, or a `model.vocab_size` below the tokenizer's;
      for a `data.data_dir` that is full or read-only.
  """
  with _data_dir_errors(config):
    return _prepare(config, tokenizer)


def _prepare(config, tokenizer: tuple[tokenizers.Tokenizer, str] | None
             ) -> PreparedData:
  root = data_root(config)
  # not tfds/: TFDS's own; tokenizers/: prepare_tokenizer's
  files.remove_stale_temporaries(os.path.join(root, "tokens"))
  tokenizer, tokenizer_path = tokenizer or prepare_tokenizer(config)
  train, held_out = open_splits(config, root)
  eot_id = tokenizer_lib.end_of_text_id(tokenizer, tokenizer_path)
  mode = data_mode(config)
  if mode == "stream":
    logging.info("Streaming %d train files and %d eval files of %s",
                 len(train.files), len(held_out.files), config.data.dataset)
    return PreparedData(
        tokenizer=tokenizer, train_tokens="", eval_tokens="",
        dtype=token_dtype(tokenizer.get_vocab_size()).name,
        train_n_tokens=0, eval_n_tokens=0, eot_id=eot_id,
        tokenizer_path=tokenizer_path, mode=mode, train_split=train,
        eval_split=held_out)
  remote = mirror.remote_root(config)
  train_path, train_n, dtype = token_cache(train, tokenizer, eot_id, root,
                                           remote)
  eval_path, eval_n, _ = token_cache(held_out, tokenizer, eot_id, root,
                                     remote)
  logging.info("Data ready: %d train tokens, %d eval tokens, vocab %d",
               train_n, eval_n, tokenizer.get_vocab_size())
  return PreparedData(tokenizer=tokenizer, train_tokens=train_path,
                      eval_tokens=eval_path, dtype=dtype,
                      train_n_tokens=train_n, eval_n_tokens=eval_n,
                      eot_id=eot_id, tokenizer_path=tokenizer_path,
                      train_split=train, eval_split=held_out)


class TokenWindows:
  """A grain random-access source of `[seq_len + 1]` windows of a token file.

  `windows[i]` is an int32 array `[seq_len + 1]`, tokens
  [i * seq_len, i * seq_len + seq_len]; IndexError outside [0, len). The file
  is mapped lazily and pickles by path, so grain worker processes map it
  themselves instead of receiving a copy.
  """

  def __init__(self, path: str, n_tokens: int, dtype: str, seq_len: int):
    self.path, self.n_tokens, self.dtype = path, n_tokens, dtype
    self.seq_len = seq_len
    self._tokens = None

  def __len__(self) -> int:
    return max(0, (self.n_tokens - 1) // self.seq_len)

  def __getitem__(self, index) -> np.ndarray:
    index = operator.index(index)
    if not 0 <= index < len(self):
      raise IndexError(f"window {index} out of range [0, {len(self)})")
    if self._tokens is None:
      self._tokens = read_tokens(self.path, self.n_tokens, self.dtype)
    start = index * self.seq_len
    return np.asarray(self._tokens[start:start + self.seq_len + 1], np.int32)

  def __getstate__(self) -> dict:
    return {**self.__dict__, "_tokens": None}

  def __repr__(self) -> str:
    return (f"TokenWindows({self.path!r}, n_tokens={self.n_tokens}, "
            f"seq_len={self.seq_len})")


def _local_batch_size(config, process_index: int, process_count: int) -> int:
  """Returns train.batch_size // process_count after checking the split."""
  batch_size = config.train.batch_size
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must lie in "
                     f"[0, process_count={process_count})")
  if batch_size % process_count:
    raise ConfigError(
        f"config.train.batch_size={batch_size} is invalid: it must be "
        f"divisible by the process count {process_count}")
  return batch_size // process_count


def train_iterator(prepared: PreparedData, config, process_index: int = 0,
                   process_count: int = 1) -> grain.DatasetIterator:
  """Returns this process's endless iterator of shuffled training batches.

  In stream mode see `stream.train_stream`. In prepared mode each epoch
  visits every train window once in a fresh order (grain's shuffle reseeds
  with `data.shuffle_seed + epoch`); global position j goes to process
  j % process_count, so the processes' batches stacked row-interleaved form
  the global batch. The iterator never raises StopIteration and supports
  `get_state()` / `set_state()` (checkpoint it with
  `grain.checkpoint.CheckpointSave` / `CheckpointRestore`).

  Yields:
    `batch.Batch`es of numpy arrays, `[train.batch_size // process_count,
    seq_len + 1]` windows with their loss mask (`batch.make_batch`).

  Raises:
    ConfigError: naming `train.batch_size` when it is not divisible by
      `process_count`, `train.seq_len` / `data.dataset` when the train split
      has fewer windows than one global batch, `data.dataset` /
      `data.worker_count` when a streamed corpus has too few files.
  """
  local_batch = _local_batch_size(config, process_index, process_count)
  if prepared.mode == "stream":
    return stream.train_stream(prepared.train_split, prepared.tokenizer,
                               prepared.eot_id, config, local_batch,
                               process_index, process_count)
  windows = TokenWindows(prepared.train_tokens, prepared.train_n_tokens,
                         prepared.dtype, config.train.seq_len)
  if len(windows) < config.train.batch_size:
    raise ConfigError(
        f"config.train.seq_len={config.train.seq_len}: the train split of "
        f"config.data.dataset={config.data.dataset!r} has "
        f"{prepared.train_n_tokens} tokens, {len(windows)} windows, fewer "
        f"than one batch of train.batch_size={config.train.batch_size}; use "
        f"a shorter seq_len, a smaller batch or a larger dataset")
  ds = grain.MapDataset.source(windows)
  ds = ds.shuffle(seed=config.data.shuffle_seed).repeat()
  ds = ds[process_index::process_count]
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.map(functools.partial(make_batch, packing=config.data.packing,
                                eot_id=prepared.eot_id))
  it = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=_READ_THREADS,
      prefetch_buffer_size=config.data.prefetch_buffer_size))
  if config.data.worker_count > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.data.worker_count))
  return iter(it)


def eval_batches(prepared: PreparedData, config, process_index: int = 0,
                 process_count: int = 1) -> list[dict]:
  """Returns this process's share of the fixed validation windows.

  Prepared mode: global batch b holds eval windows [b * batch_size,
  (b + 1) * batch_size) in file order (no shuffle); stream mode: the first
  windows of the eval files (`stream.eval_stream_tokens`). Identical at every
  evaluation; this process takes rows process_index, process_index +
  process_count, ... of each (the same interleaving as `train_iterator`).

  Returns:
    `train.eval_batches` `batch.Batch`es (see `train_iterator`) of
    `[train.batch_size // process_count, train.seq_len + 1]` windows.

  Raises:
    ConfigError: naming `train.batch_size` when not divisible by
      `process_count`, `train.eval_batches` (with the largest value that fits)
      when the eval split has too few windows.
  """
  local_batch = _local_batch_size(config, process_index, process_count)
  n_batches = config.train.eval_batches
  if prepared.mode == "stream":
    windows = stream.eval_stream_tokens(prepared.eval_split,
                                        prepared.tokenizer, prepared.eot_id,
                                        config)
  else:
    windows = _prepared_eval_windows(prepared, config)
  windows = windows[:, process_index::process_count]
  assert windows.shape == (n_batches, local_batch, window_length(config))
  return [make_batch(batch, config.data.packing, prepared.eot_id)
          for batch in windows]


def _prepared_eval_windows(prepared: PreparedData, config) -> np.ndarray:
  """The first eval_batches x batch_size windows of the eval token file."""
  seq_len, batch_size = config.train.seq_len, config.train.batch_size
  n_batches = config.train.eval_batches
  windows = TokenWindows(prepared.eval_tokens, prepared.eval_n_tokens,
                         prepared.dtype, seq_len)
  if len(windows) < n_batches * batch_size:
    raise ConfigError(
        f"config.train.eval_batches={n_batches} is too large: the eval split "
        f"has {len(windows)} windows of train.seq_len={seq_len}, room for "
        f"{len(windows) // batch_size} batches of train.batch_size="
        f"{batch_size}; set train.eval_batches<={len(windows) // batch_size} "
        f"(or raise data.eval_fraction, or lower train.seq_len)")
  rows = np.arange(n_batches * batch_size).reshape(n_batches, batch_size)
  tokens = read_tokens(prepared.eval_tokens, prepared.eval_n_tokens,
                       prepared.dtype)
  offsets = rows[..., None] * seq_len + np.arange(window_length(config))
  return np.asarray(tokens[offsets], dtype=np.int32)
