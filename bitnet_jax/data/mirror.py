"""`data.data_dir` on an object store: a shared cache mirrored on each host.

Token caches are memory-mapped (`np.memmap`), which needs a local file, and
the BPE trainer writes a local tokenizer.json. With
`data.data_dir=gs://bucket/cache`, every host therefore works in a local
mirror of it (`local_root`: `$XDG_CACHE_HOME/bitnet_jax/mirror/gs/bucket/
cache`, or under `~/.cache`), and the object store is the cache they share:

  * before building a cache entry (a `tokens/<key>/` directory, a
    `tokenizers/<name>.json`), a host downloads it if the store has it
    (`fetch`), so a tokenizer is trained and a corpus tokenized once per
    bucket, not once per host or per VM;
  * after building (or finding) one locally, it uploads what the store lacks
    (`publish`).

An entry's files go up and down in a fixed order with its completion marker
last (`meta.json` for token caches), so a copy cut short by a kill is never
taken for a complete one: without the marker the entry is built again.
TFDS datasets (`data_dir/tfds`) stay in the local mirror (TFDS prepares
them on each host).
"""

from __future__ import annotations

import os
import shutil

from absl import logging

from bitnet_jax.storage import files, paths

_CHUNK_BYTES = 16 << 20  # copy buffer: token files are gigabytes


def remote_root(config) -> str | None:
  """`data.data_dir` when it names an object store (gs://…), else None."""
  root = config.data.data_dir
  return paths.resolve(root) if root and paths.is_url(root) else None


def local_root(remote: str) -> str:
  """The local mirror directory of the object-store cache `remote`."""
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
  scheme, _, rest = remote.partition("://")
  return os.path.abspath(os.path.expanduser(
      os.path.join(cache, "bitnet_jax", "mirror", scheme, rest)))


def _copy(source: str, target: str) -> None:
  """Streams the file `source` to `target` (either may be a URL); a local
  target appears whole (temporary file, then rename), an object at once."""
  local_target = not paths.is_url(target)
  written = files.temporary_path(target) if local_target else target
  if local_target:
    os.makedirs(os.path.dirname(target), exist_ok=True)
  with paths.open_file(source, "rb") as src, paths.open_file(
      written, "wb") as dst:
    shutil.copyfileobj(src, dst, _CHUNK_BYTES)
  if local_target:
    os.replace(written, target)


def fetch(local: str, remote: str | None, relative: str,
          names: tuple[str, ...]) -> bool:
  """Downloads the entry `relative/names…` from `remote` into `local`.

  Does nothing (False) without a remote, when the local entry's marker
  (`names[-1]`) exists, or when the remote one lacks its marker (absent or
  cut short). The marker is downloaded last.

  Raises:
    OSError: naming the object when the store refuses a read.
  """
  if remote is None or os.path.exists(os.path.join(local, relative,
                                                   names[-1])):
    return False
  source = paths.join(remote, relative)
  if not paths.isfile(paths.join(source, names[-1])):
    return False
  for name in names:
    _copy(paths.join(source, name), os.path.join(local, relative, name))
  logging.info("Fetched the cache entry %s from %s", relative, remote)
  return True


def publish(local: str, remote: str | None, relative: str,
            names: tuple[str, ...]) -> bool:
  """Uploads the local entry `relative/names…` to `remote` unless the store
  already holds its marker (`names[-1]`, uploaded last). Returns whether it
  uploaded.

  Raises:
    OSError: naming the object when the store refuses a write (permissions,
      a missing bucket): the data stays usable locally, but fix the bucket
      before other hosts rely on it.
  """
  if remote is None:
    return False
  target = paths.join(remote, relative)
  if paths.isfile(paths.join(target, names[-1])):
    return False
  for name in names:
    _copy(os.path.join(local, relative, name), paths.join(target, name))
  logging.info("Published the cache entry %s to %s", relative, remote)
  return True
