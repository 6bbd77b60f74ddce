"""Text sources: the embedded stdlib corpus, TFDS datasets, file corpora.

`open_splits(config)` turns `config.data.dataset` into two `TextSplit`s (train
and eval), each the documents (Python `str`) of one side:

  "stdlib"  the `.py` files of the running interpreter's standard library,
            built once (~0.5 s, no download) into the TFDS ArrayRecord dataset
            `python_stdlib/py<MAJOR><MINOR>` in `DATA_DIR/tfds`
            (`bitnet_jax.data.stdlib`), then read like any TFDS dataset.
  "tfds:NAME[/CONFIG]"  a TFDS dataset already prepared in ArrayRecord format
            in `DATA_DIR/tfds`: splits `data.train_split`/`data.eval_split`,
            text `data.text_feature`. Nothing is downloaded at run time.
  "files:GLOB"  local UTF-8 text files, one document per file.
  "parquet:GLOB", "jsonl:GLOB", "arrayrecord:GLOB"  sharded corpora
            (`bitnet_jax.data.sources`), read in order or streamed.

For all but "tfds:" a file is held out for evaluation when a stable hash
of its relative path falls below `data.eval_fraction`, so no file is on both
sides and a file keeps its side across rebuilds and machines.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import itertools
import json
import os
import shlex
import sys
from collections.abc import Callable, Iterable, Iterator

import fsspec
import tensorflow_datasets as tfds
from absl import logging

from bitnet_jax.config import STREAM_SCHEMES, ConfigError
from bitnet_jax.data import sources
from bitnet_jax.data.stdlib import is_eval_path, prepare_stdlib

_READ_CHUNK = 256  # documents fetched per random-access read


@dataclasses.dataclass(frozen=True)
class TextSplit:
  """One side (train or eval) of a corpus: its documents, and their files.

  Attributes:
    key: stable identity of the split's content (dataset, split, version,
      size); part of the tokenizer and token-cache keys.
    size: number of documents; None for file corpora (parquet, jsonl,
      arrayrecord), whose count is known only once read.
    read: maps a list of document indices (each in [0, size)) to their texts
      (random-access sources); None for file corpora.
    scheme: "parquet", "jsonl" or "arrayrecord" for a file corpus, else "".
    files: a file corpus's files, sorted; read in this order by `texts`.
    text_feature: the column / field holding a file corpus's text.
  """
  key: str
  size: int | None
  read: Callable[[list[int]], list[str]] | None = None
  scheme: str = ""
  files: tuple[str, ...] = ()
  text_feature: str = "text"

  def __len__(self) -> int:
    if self.size is None:
      raise TypeError(f"{self.key}: a file corpus's size is unknown")
    return self.size

  def texts(self, chunk: int = _READ_CHUNK) -> Iterator[list[str]]:
    """Yields the documents in order, as lists of at most `chunk` strings."""
    if self.read is not None:
      for start in range(0, self.size, chunk):
        yield self.read(list(range(start, min(start + chunk, self.size))))
      return
    documents = itertools.chain.from_iterable(
        sources.FileDocuments(self.scheme, path, self.text_feature)
        for path in self.files)
    while batch := list(itertools.islice(documents, chunk)):
      yield batch


# --- generic sources ---------------------------------------------------------


def prepare_command(name: str, tfds_dir: str) -> str:
  """Returns a shell command preparing TFDS `name` in `tfds_dir` as ArrayRecord.

  Unlike `tfds build`, it needs no TensorFlow: ArrayRecord files are written
  by tensorflow_datasets alone (the default TFRecord format needs
  TensorFlow). The command runs this interpreter (`sys.executable`) and is
  quoted for a POSIX shell.
  """
  code = (f"import tensorflow_datasets as tfds; "
          f"tfds.builder({json.dumps(name)}, data_dir={json.dumps(tfds_dir)})"
          f".download_and_prepare(file_format=\"array_record\")")
  return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"


def tfds_split(name: str, split: str, text_feature: str, tfds_dir: str,
               split_key: str) -> TextSplit:
  """Opens a prepared ArrayRecord TFDS split as a `TextSplit`; never downloads.

  Raises:
    ConfigError: naming `data.dataset` when the dataset is unknown or not
      prepared in ArrayRecord format under `tfds_dir` (the message ends with
      the `prepare_command`, which needs no TensorFlow), `split_key`
      (`data.train_split` / `data.eval_split`) for an unknown split,
      `data.text_feature` when the dataset has no such feature.
  """
  build = ("prepare it once (no TensorFlow needed; some builders need extra "
           "packages, and their error names them) with: "
           f"{prepare_command(name, tfds_dir)}")
  try:
    builder = tfds.builder(name, data_dir=tfds_dir)
  except tfds.core.registered.DatasetNotFoundError:  # its text lists 1000s
    raise ConfigError(f"config.data.dataset='tfds:{name}': unknown TFDS "
                      f"dataset, not in {tfds_dir}; {build}") from None
  if not builder.is_prepared():
    raise ConfigError(f"config.data.dataset='tfds:{name}' is not prepared in "
                      f"{tfds_dir} (nothing is downloaded at run time); "
                      f"{build}")
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ConfigError(f"config.data.dataset='tfds:{name}' is stored as "
                      f"{builder.info.file_format.value} in {builder.data_dir},"
                      f" but random access needs ArrayRecord; delete it and "
                      f"{build}")
  if text_feature not in builder.info.features:
    raise ConfigError(
        f"config.data.text_feature={text_feature!r} is not a feature of "
        f"tfds:{name}; use one of {sorted(builder.info.features.keys())}")
  try:
    source = builder.as_data_source(split=split)
  except ValueError as e:  # unknown split or bad slice syntax
    raise ConfigError(f"config.{split_key}={split!r} is invalid for "
                      f"tfds:{name}: {e}") from e

  def read(indices: list[int]) -> list[str]:
    return [ex[text_feature].decode("utf-8", errors="replace")
            for ex in source.__getitems__(indices)]

  key = f"tfds:{builder.info.full_name}:{split}:{text_feature}:{len(source)}"
  return TextSplit(key=key, size=len(source), read=read)


def glob_root(pattern: str) -> str:
  """Returns the longest leading directory of `pattern` without wildcards."""
  parts = os.path.expanduser(pattern).split(os.sep)
  fixed = []
  for part in parts[:-1]:
    if glob.has_magic(part):
      break
    fixed.append(part)
  return os.sep.join(fixed) or ("/" if pattern.startswith(os.sep) else ".")


def split_by_path_hash(paths: Iterable[str], pattern: str,
                       eval_fraction: float, dataset: str, *,
                       eval_dataset_allowed: bool = True
                       ) -> tuple[list[str], list[str]]:
  """Splits `paths` into (train, eval) by `is_eval_path`.

  Each path is hashed relative to `glob_root(pattern)`, the glob's fixed
  directory, so a corpus keeps its split wherever it is stored.

  Args:
    eval_dataset_allowed: whether `data.eval_dataset` can give the eval
      files instead (stream corpora; not `files:`), for the advice.

  Raises:
    ConfigError: naming `dataset` and `data.eval_fraction` when one side is
      empty.
  """
  root = glob_root(pattern)
  if "://" not in root:
    root = os.path.abspath(root)
  sides = {False: [], True: []}
  for path in paths:
    relative = path[len(root):].lstrip("/") if path.startswith(root) else path
    sides[is_eval_path(relative, eval_fraction)].append(path)
  for held_out, name in ((False, "train"), (True, "eval")):
    if not sides[held_out]:
      raise ConfigError(
          f"{dataset}: the {name} side of the split is empty ({len(paths)} "
          f"files, config.data.eval_fraction={eval_fraction}); add files"
          + (", change data.eval_fraction or set data.eval_dataset"
             if eval_dataset_allowed else " or change data.eval_fraction"))
  return sides[False], sides[True]


def listing_key(paths: list[str], fingerprints: dict[str, str]) -> str:
  """A hash of the files' names, sizes and modification times.

  Part of a split's key, so an edited or replaced file invalidates the
  tokenizer and token caches built from it. `fingerprints` comes from
  `sources.expand` (no file is stat'ed again here).
  """
  listing = hashlib.sha256()
  for path in paths:
    listing.update(f"{path}\0{fingerprints[path]}\n".encode())
  return listing.hexdigest()[:16]


def files_splits(pattern: str, eval_fraction: float
                 ) -> tuple[TextSplit, TextSplit]:
  """Splits the files matching `pattern` (recursive glob, any fsspec URL).

  Paths are hashed relative to `glob_root(pattern)`. Split keys include each
  file's size and mtime, so edited files invalidate the caches.

  Empty files (0 bytes) are skipped, with one warning naming how many.

  Raises:
    ConfigError: naming `data.dataset` when nothing (or only empty files)
      matches, one side of the split is empty, or a file is not valid UTF-8.
  """
  dataset = f"config.data.dataset='files:{pattern}'"
  paths = sources.expand("files", pattern, "data.dataset")
  empty = [p for p, fingerprint in paths.items()
           if fingerprint.startswith("0:")]
  if empty:
    if len(empty) == len(paths):
      raise ConfigError(f"{dataset}: all {len(paths)} matching files are "
                        "empty; point the glob at text files")
    logging.warning("%s: skipping %d empty files of %d (e.g. %s)", dataset,
                    len(empty), len(paths), empty[0])
    paths = {p: f for p, f in paths.items() if p not in set(empty)}
  sides = split_by_path_hash(paths, pattern, eval_fraction, dataset,
                             eval_dataset_allowed=False)

  def read(side: list[str], indices: list[int]) -> list[str]:
    texts = []
    for i in indices:
      try:
        with fsspec.open(side[i], "rb") as f:
          texts.append(f.read().decode("utf-8"))
      except UnicodeDecodeError as e:
        raise ConfigError(f"{dataset}: {side[i]} is not UTF-8 text ({e}); "
                          f"narrow the glob to text files") from e
    return texts

  splits = []
  for side, name in zip(sides, ("train", "eval")):
    key = (f"files:{pattern}:{name}:{eval_fraction}:"
           f"{listing_key(side, paths)}")
    splits.append(TextSplit(key=key, size=len(side),
                            read=lambda idx, side=side: read(side, idx)))
  return splits[0], splits[1]


def stream_splits(config) -> tuple[TextSplit, TextSplit]:
  """The (train, eval) file lists of a parquet / jsonl / arrayrecord corpus.

  Eval files are `data.eval_dataset`'s when set, else the files held out by
  path hash (`data.eval_fraction`, paths relative to the glob's fixed
  directory).

  Raises:
    ConfigError: naming `data.dataset` / `data.eval_dataset` for a glob that
      matches nothing, or one side of the split being empty.
  """
  d = config.data
  scheme, _, pattern = d.dataset.partition(":")
  paths = sources.expand(scheme, pattern, "data.dataset")
  if d.eval_dataset:
    train = paths
    held_out = sources.expand(scheme, d.eval_dataset.partition(":")[2],
                              "data.eval_dataset")
    overlap = sorted(set(train) & set(held_out))
    paths = {**paths, **held_out}
    if overlap:
      raise ConfigError(f"config.data.eval_dataset={d.eval_dataset!r} shares "
                        f"{len(overlap)} files with data.dataset (e.g. "
                        f"{overlap[0]}); evaluation data must be held out")
    how = f"eval:{d.eval_dataset}"
  else:
    train, held_out = split_by_path_hash(
        paths, pattern, d.eval_fraction,
        f"config.data.dataset={d.dataset!r}")
    how = f"fraction:{d.eval_fraction}"
  splits = []
  for side, name in ((train, "train"), (held_out, "eval")):
    key = (f"{d.dataset}:{name}:{how}:{d.text_feature}:"
           f"{listing_key(side, paths)}")
    splits.append(TextSplit(key=key, size=None, scheme=scheme,
                            files=tuple(side), text_feature=d.text_feature))
  return splits[0], splits[1]


def open_splits(config, root: str) -> tuple[TextSplit, TextSplit]:
  """Returns the (train, eval) documents of `config.data.dataset`.

  `root` is the data directory (see `pipeline.data_root`); TFDS datasets live
  in `root/tfds`.

  "stdlib" is built on first use. For "stdlib" and "files:" the split comes
  from `data.eval_fraction` (data.train_split / data.eval_split are ignored);
  for "tfds:" from data.train_split / data.eval_split.

  Raises:
    ConfigError: naming `data.dataset` for an unknown scheme, a dataset that
      is not prepared, or an empty glob / split (see `tfds_split`,
      `files_splits`).
  """
  d = config.data
  tfds_dir = os.path.join(root, "tfds")
  if d.dataset == "stdlib":
    name = prepare_stdlib(tfds_dir, d.eval_fraction)
    return (tfds_split(name, "train", "text", tfds_dir, "data.dataset"),
            tfds_split(name, "validation", "text", tfds_dir, "data.dataset"))
  scheme, _, rest = d.dataset.partition(":")
  if scheme == "tfds" and rest:
    return (tfds_split(rest, d.train_split, d.text_feature, tfds_dir,
                       "data.train_split"),
            tfds_split(rest, d.eval_split, d.text_feature, tfds_dir,
                       "data.eval_split"))
  if scheme == "files" and rest:
    return files_splits(rest, d.eval_fraction)
  if scheme in STREAM_SCHEMES and rest:
    return stream_splits(config)
  raise ConfigError(f"config.data.dataset={d.dataset!r} is invalid: use "
                    "'stdlib', 'tfds:NAME[/CONFIG]', 'files:GLOB', "
                    "'parquet:GLOB', 'jsonl:GLOB' or 'arrayrecord:GLOB'.")

