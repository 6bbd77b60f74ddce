"""The embedded corpus: this interpreter's standard library as a TFDS dataset.

Built once (~0.5 s, no download) into `DATA_DIR/tfds` as the ArrayRecord
dataset `python_stdlib/py<MAJOR><MINOR>`; a file is held out for evaluation
when a stable hash of its relative path falls below `data.eval_fraction`
(`is_eval_path`), so no file is on both sides and a file keeps its side
across rebuilds and machines.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
import sysconfig
from typing import ClassVar

import tensorflow_datasets as tfds
from absl import logging

STDLIB_DATASET = "python_stdlib"  # TFDS name of the embedded corpus
DEFAULT_EVAL_FRACTION = 0.05  # base_config's data.eval_fraction; see below
_EXCLUDED_DIRS = ("site-packages", "dist-packages")  # third-party code


def is_eval_path(relative_path: str, eval_fraction: float) -> bool:
  """True when a file belongs to the eval split (stable across runs/hosts).

  The first 8 bytes of sha256(relative_path, UTF-8, "/" separators) read as a
  fraction in [0, 1) are compared with `eval_fraction`.
  """
  name = relative_path.replace(os.sep, "/").encode("utf-8")
  digest = hashlib.sha256(name).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64 < eval_fraction


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
    # TFDS prints "Downloading and preparing dataset Unknown size ..." to
    # stdout though nothing downloads; the line above says what happens.
    with contextlib.redirect_stdout(io.StringIO()):
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          try_download_gcs=False))
  return f"{STDLIB_DATASET}/{config.name}"
