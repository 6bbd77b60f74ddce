"""One path layer for local directories and object stores (gs://).

Local paths keep using the os module (atomic renames, fsync); a path with a
URL scheme (`gs://bucket/run`) goes through `etils.epath`, the layer orbax
already writes its checkpoints with (for gs:// it uses gcsfs, which honours
`STORAGE_EMULATOR_HOST`, or TensorFlow's gfile where TensorFlow is
imported). Object stores have no atomic directory rename: a "move" is a copy
followed by a delete, which is what `move` does there.

On object stores every operation has a deadline (`storage.deadline`).

Everything a run writes into or reads from its workdir goes through here
(checkpoints, metrics.jsonl and samples.jsonl appends, config.json,
config_history.jsonl, tokenizer.json, the run lock, damaged-checkpoint
moves), as do `data.data_dir` caches on an object store
(`bitnet_jax.data.mirror`) and TensorBoard event files (appended through
`append`, see `metrics.writers`).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import tempfile
import time

from etils import epath

from bitnet_jax.storage import deadline

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def is_url(path: str) -> bool:
  """Whether `path` names an object-store location (`gs://…`, `s3://…`)."""
  return bool(_URL.match(str(path)))


def split_gcs(url: str) -> tuple[str, str]:
  """('bucket', 'object/name') of 'gs://bucket/object/name'.

  Raises:
    ValueError: `url` is not gs://BUCKET/PATH.
  """
  url = str(url)
  if not url.startswith("gs://") or "/" not in url[5:]:
    raise ValueError(f"{url!r} is not a gs://BUCKET/PATH location; give "
                     "--workdir=gs://BUCKET/RUN")
  bucket, name = url[5:].split("/", 1)
  return bucket, name


@functools.lru_cache(maxsize=None)
def gcs_bucket(name: str):
  """The google-cloud-storage Bucket `name`, through one Client per process
  (a Client looks credentials up when created: not once per request)."""
  return _gcs_client().bucket(name)


@functools.lru_cache(maxsize=1)
def _gcs_client():
  from google.cloud import storage  # pylint: disable=import-outside-toplevel
  return storage.Client()


def resolve(path: str) -> str:
  """An absolute form of `path`: URLs unchanged (minus a trailing slash),
  local paths with `~` expanded and made absolute."""
  path = str(path)
  if is_url(path):
    return path.rstrip("/")
  return os.path.abspath(os.path.expanduser(path))


def join(path: str, *names: str) -> str:
  """`os.path.join` for local paths, `/`-joined for URLs."""
  if is_url(path):
    return "/".join([path.rstrip("/"), *names])
  return os.path.join(path, *names)


def parent(path: str) -> str:
  """The directory holding `path` (`os.path.dirname` for both kinds)."""
  return str(epath.Path(path).parent) if is_url(path) else os.path.dirname(
      path)


def makedirs(path: str) -> None:
  """Creates `path` and its parents (a no-op on object stores, which have
  no directories, beyond what the store's client needs)."""
  if is_url(path):
    deadline.call(lambda: epath.Path(path).mkdir(parents=True, exist_ok=True),
                  "creating", path)
  else:
    os.makedirs(path, exist_ok=True)


def probe_writable(directory: str, name: str) -> None:
  """Writes `directory/name` (4 KiB, fsynced where local), then removes it.

  Raises:
    OSError: when `directory` cannot be created or written; on object
      stores the client's error (permissions, a missing bucket) is raised
      as an OSError naming the path.
  """
  makedirs(directory)
  probe = join(directory, name)
  if not is_url(directory):
    with open(probe, "wb") as f:
      f.write(b"\0" * 4096)
      f.flush()
      os.fsync(f.fileno())
    os.remove(probe)
    return
  def write_and_remove():
    epath.Path(probe).write_bytes(b"\0" * 4096)
    epath.Path(probe).unlink()
  try:
    deadline.call(write_and_remove, "writing a probe file in", directory)
  except Exception as e:  # pylint: disable=broad-except
    if isinstance(e, OSError):
      raise
    raise OSError(f"{type(e).__name__}: {e}") from e


def move(source: str, target: str) -> None:
  """Moves the file or directory tree `source` to `target` (whose parent is
  created). Local: one rename where possible (`shutil.move`). URLs: each
  object is copied, then the source objects are deleted; a kill in between
  leaves both copies, never neither."""
  makedirs(parent(target))
  if not is_url(source):
    shutil.move(source, target)
    return
  deadline.call(lambda: _move_objects(source, target), "moving", source)


def _move_objects(source: str, target: str) -> None:
  source_path, target_path = epath.Path(source), epath.Path(target)
  if not source_path.is_dir():
    source_path.copy(target_path)
    source_path.unlink()
    return
  pending = [source_path]  # epath on GCS refuses rglob's `**`
  while pending:
    for child in sorted(pending.pop().iterdir()):
      if child.is_dir():
        pending.append(child)
        continue
      destination = target_path / child.relative_to(source_path)
      destination.parent.mkdir(parents=True, exist_ok=True)
      child.copy(destination)
  source_path.rmtree()


def open_file(path: str, mode: str = "r", **kwargs):
  """`open` for local paths and URLs alike (epath); raises
  FileNotFoundError for a missing file of either kind."""
  if not is_url(path):
    return open(path, mode, **kwargs)  # pylint: disable=unspecified-encoding
  return epath.Path(path).open(mode, **kwargs)


def read_bytes(path: str) -> bytes:
  """The whole content of the file `path`.

  Raises:
    FileNotFoundError: `path` does not exist (either kind).
  """
  def read():
    with open_file(path, "rb") as f:
      return f.read()
  return deadline.call(read, "reading", path)


def write_bytes(path: str, data: bytes) -> None:
  """Writes the whole file `path` (parents created). On object stores one
  upload that readers see whole or not at all (an object is replaced
  atomically); locally a plain write — use `files.write_atomically` where a
  kill must not leave a partial file."""
  makedirs(parent(path))
  if is_url(path):
    deadline.call(lambda: epath.Path(path).write_bytes(data), "writing",
                  path)
    return
  with open(path, "wb") as f:
    f.write(data)


def append(path: str, data: bytes) -> None:
  """Appends `data` to the file `path`, creating it if missing.

  Local: `open(path, "ab")`, flushed. gs://: object stores cannot append;
  the new bytes are uploaded as a sibling object and joined onto `path`
  with GCS's compose (one request, atomic: readers see the old or the
  longer object), so a long metrics.jsonl is never uploaded again in full.
  Other URL schemes rewrite the object (read, concatenate, upload).

  Raises:
    OSError: the store refused a request (naming `path`).
  """
  if not is_url(path):
    with open(path, "ab") as f:
      f.write(data)
      f.flush()
    return
  if not str(path).startswith("gs://"):
    try:
      old = read_bytes(path)
    except FileNotFoundError:
      old = b""
    write_bytes(path, old + data)
    return
  deadline.call(lambda: _compose_append(path, data), "appending to", path)


def _compose_append(path: str, data: bytes) -> None:
  """`append` on gs://: upload a piece and compose it onto `path`."""
  from google.api_core import exceptions  # pylint: disable=import-outside-toplevel
  bucket_name, name = split_gcs(path)
  bucket = gcs_bucket(bucket_name)
  target = bucket.blob(name)
  try:
    if not target.exists():
      target.upload_from_string(data)
      return
    piece = bucket.blob(f"{name}.append.{os.getpid()}.{time.time_ns()}")
    piece.upload_from_string(data)
    try:
      target.compose([target, piece])
    finally:
      piece.delete()
  except exceptions.GoogleAPIError as e:
    raise OSError(f"appending to {path} failed: {type(e).__name__}: {e}"
                  ) from e


def isfile(path: str) -> bool:
  """Whether `path` is a file (an object, on object stores)."""
  if is_url(path):
    return deadline.call(epath.Path(path).is_file, "looking up", path)
  return os.path.isfile(path)


def isdir(path: str) -> bool:
  """Whether `path` is a directory (a non-empty prefix, on object stores)."""
  if is_url(path):
    return deadline.call(epath.Path(path).is_dir, "looking up", path)
  return os.path.isdir(path)


def listdir(path: str) -> list[str]:
  """The names directly under the directory `path`; [] if it is missing."""
  if not isdir(path):
    return []
  if not is_url(path):
    return os.listdir(path)
  return deadline.call(
      lambda: [child.name for child in epath.Path(path).iterdir()],
      "listing", path)


def local_file(path: str) -> str:
  """A local path holding the file `path`'s bytes, for libraries that read
  only local files (tokenizers' `Tokenizer.from_file`): local paths as they
  are; a URL is downloaded on every call (small files: a tokenizer, a
  config) into a fresh temporary directory, so a changed object is never
  served from a stale copy.

  Raises:
    FileNotFoundError: `path` does not exist.
  """
  if not is_url(path):
    return path
  local = os.path.join(tempfile.mkdtemp(prefix="bitnet_jax_gs."),
                       os.path.basename(path))
  with open(local, "wb") as f:
    f.write(deadline.call(epath.Path(path).read_bytes, "reading", path))
  return local
