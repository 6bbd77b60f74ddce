"""Text sources: the embedded stdlib corpus, prepared TFDS datasets, files.

`open_splits(config)` turns `config.data.dataset` into two `TextSplit`s (train
and eval), each a random-access sequence of documents (Python `str`):

  "stdlib"  the `.py` files of the running interpreter's standard library,
            built once (~0.5 s, no download) into the TFDS ArrayRecord dataset
            `python_stdlib/py<MAJOR><MINOR>` in `DATA_DIR/tfds`, then read
            like any TFDS dataset.
  "tfds:NAME[/CONFIG]"  a TFDS dataset already prepared in ArrayRecord format
            in `DATA_DIR/tfds`: splits `data.train_split`/`data.eval_split`,
            text `data.text_feature`. Nothing is downloaded at run time.
  "files:GLOB"  local UTF-8 text files, one document per file.

For "stdlib" and "files:" a file is held out for evaluation when a stable hash
of its relative path falls below `data.eval_fraction`, so no file is on both
sides and a file keeps its side across rebuilds and machines.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import shlex
import sys
import sysconfig
from collections.abc import Callable, Iterator
from typing import ClassVar

import tensorflow_datasets as tfds
from absl import logging

from bitnet_jax.config import ConfigError

STDLIB_DATASET = "python_stdlib"  # TFDS name of the embedded corpus
DEFAULT_EVAL_FRACTION = 0.05  # base_config's data.eval_fraction; see below
_EXCLUDED_DIRS = ("site-packages", "dist-packages")  # third-party code
_READ_CHUNK = 256  # documents fetched per random-access read


def is_eval_path(relative_path: str, eval_fraction: float) -> bool:
  """True when a file belongs to the eval split (stable across runs/hosts).

  The first 8 bytes of sha256(relative_path, UTF-8, "/" separators) read as a
  fraction in [0, 1) are compared with `eval_fraction`.
  """
  name = relative_path.replace(os.sep, "/").encode("utf-8")
  digest = hashlib.sha256(name).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64 < eval_fraction


@dataclasses.dataclass(frozen=True)
class TextSplit:
  """One side (train or eval) of a corpus: documents readable by index.

  Attributes:
    key: stable identity of the split's content (dataset, split, version,
      size); part of the tokenizer and token-cache keys.
    size: number of documents.
    read: maps a list of document indices (each in [0, size)) to their texts.
  """
  key: str
  size: int
  read: Callable[[list[int]], list[str]]

  def __len__(self) -> int:
    return self.size

  def texts(self, chunk: int = _READ_CHUNK) -> Iterator[list[str]]:
    """Yields the documents in order, as lists of at most `chunk` strings."""
    for start in range(0, self.size, chunk):
      yield self.read(list(range(start, min(start + chunk, self.size))))


# --- the embedded corpus -----------------------------------------------------


def stdlib_root() -> str:
  """Returns the running interpreter's standard-library directory."""
  return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str) -> list[str]:
  """Returns the sorted `.py` paths under `root`, relative to it ("/"-joined).

  Directories named site-packages / dist-packages are skipped.
  """
  found = []
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if d not in _EXCLUDED_DIRS)
    for name in sorted(files):
      if name.endswith(".py"):
        relative = os.path.relpath(os.path.join(directory, name), root)
        found.append(relative.replace(os.sep, "/"))
  return found


class PythonStdlibConfig(tfds.core.BuilderConfig):
  """A corpus of one interpreter version at one eval fraction."""

  def __init__(self, *, eval_fraction: float = DEFAULT_EVAL_FRACTION,
               **kwargs):
    super().__init__(**kwargs)
    self.eval_fraction = eval_fraction


def stdlib_config(eval_fraction: float) -> PythonStdlibConfig:
  """Returns the builder config of this interpreter at `eval_fraction`.

  Named `py311` (for CPython 3.11) at the default fraction 0.05, otherwise
  e.g. `py311_eval0.1`, so different interpreters or splits never mix.
  """
  name = f"py{sys.version_info.major}{sys.version_info.minor}"
  if eval_fraction != DEFAULT_EVAL_FRACTION:
    name += f"_eval{eval_fraction:g}"
  return PythonStdlibConfig(
      name=name, eval_fraction=eval_fraction,
      description=f"Python {sys.version.split()[0]} stdlib, "
      f"{eval_fraction:g} of files held out by path hash.")


class PythonStdlib(tfds.core.GeneratorBasedBuilder):
  """The `.py` files of the running interpreter's standard library.

  Features: "text" (the file's content, UTF-8 with invalid bytes replaced)
  and "path" (relative to the stdlib root). Splits: "train", "validation".
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS: ClassVar[list[PythonStdlibConfig]] = [
      stdlib_config(DEFAULT_EVAL_FRACTION)]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "path": tfds.features.Text(),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    expected = stdlib_config(self.builder_config.eval_fraction).name
    if self.builder_config.name != expected:
      raise ValueError(
          f"{STDLIB_DATASET}/{self.builder_config.name} can only be built by "
          f"its own Python version; this interpreter builds {expected}.")
    return {"train": self._generate_examples(held_out=False),
            "validation": self._generate_examples(held_out=True)}

  def _generate_examples(self, held_out: bool):
    root = stdlib_root()
    fraction = self.builder_config.eval_fraction
    for relative in stdlib_files(root):
      if is_eval_path(relative, fraction) == held_out:
        with open(os.path.join(root, relative), "rb") as f:
          text = f.read().decode("utf-8", errors="replace")
        yield relative, {"text": text, "path": relative}


def prepare_stdlib(tfds_dir: str, eval_fraction: float) -> str:
  """Builds the stdlib corpus in `tfds_dir` unless present; returns its name.

  Returns:
    The TFDS name, e.g. "python_stdlib/py311", readable with
    `tfds.data_source(name, split="train" | "validation", data_dir=tfds_dir)`.
  """
  config = stdlib_config(eval_fraction)
  registered = config.name in PythonStdlib.builder_configs
  builder = PythonStdlib(data_dir=tfds_dir,
                         config=config.name if registered else config,
                         file_format="array_record")
  if not builder.is_prepared():
    logging.info("Building the %s/%s corpus from %s into %s", STDLIB_DATASET,
                 config.name, stdlib_root(), tfds_dir)
    tfds.disable_progress_bar()
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return f"{STDLIB_DATASET}/{config.name}"


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


def files_splits(pattern: str, eval_fraction: float
                 ) -> tuple[TextSplit, TextSplit]:
  """Splits the files matching `pattern` (recursive glob) by path hash.

  Paths are hashed relative to `glob_root(pattern)`. Split keys include each
  file's size and mtime, so edited files invalidate the caches.

  Raises:
    ConfigError: naming `data.dataset` when nothing matches, one side of the
      split is empty, or a file is not valid UTF-8.
  """
  dataset = f"config.data.dataset='files:{pattern}'"
  root = glob_root(pattern)
  paths = sorted(p for p in glob.glob(os.path.expanduser(pattern),
                                      recursive=True) if os.path.isfile(p))
  if not paths:
    raise ConfigError(f"{dataset} matches no file; check the glob (it is "
                      f"resolved from {os.getcwd()}, '**' recurses)")
  sides = {False: [], True: []}
  for path in paths:
    sides[is_eval_path(os.path.relpath(path, root), eval_fraction)].append(path)

  def read(side: list[str], indices: list[int]) -> list[str]:
    texts = []
    for i in indices:
      try:
        with open(side[i], encoding="utf-8") as f:
          texts.append(f.read())
      except UnicodeDecodeError as e:
        raise ConfigError(f"{dataset}: {side[i]} is not UTF-8 text ({e}); "
                          f"narrow the glob to text files") from e
    return texts

  splits = []
  for held_out, name in ((False, "train"), (True, "eval")):
    side = sides[held_out]
    if not side:
      raise ConfigError(
          f"{dataset}: the {name} side of the split is empty ({len(paths)} "
          f"files, config.data.eval_fraction={eval_fraction}); add files or "
          f"change data.eval_fraction")
    listing = hashlib.sha256()
    for path in side:
      stat = os.stat(path)
      listing.update(f"{os.path.abspath(path)}\0{stat.st_size}\0"
                     f"{stat.st_mtime_ns}\n".encode())
    key = f"files:{pattern}:{name}:{eval_fraction}:{listing.hexdigest()[:16]}"
    splits.append(TextSplit(key=key, size=len(side),
                            read=lambda idx, side=side: read(side, idx)))
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
  raise ConfigError(f"config.data.dataset={d.dataset!r} is invalid: use "
                    "'stdlib', 'tfds:NAME[/CONFIG]' or 'files:GLOB'.")

