"""A resume that refuses to silently become a different run.

Files kept in the workdir (named in `bitnet_jax.runs.directory`; written by
process 0 only, local or gs://, through `paths`):

  config.json           the config of the run's first start. Written once,
                        atomically; never overwritten while the run has
                        checkpoints (a start without checkpoints is a new run
                        and overwrites it).
  config_history.jsonl  one JSON line per start: time (UTC), host, pid,
                        argv, start step, whether it resumed, the full config,
                        the changed keys with old/new values and class, and
                        whether train.allow_config_change overrode a refusal.
  tokenizer.json        a copy of the run's tokenizer, written at its first
                        start.

On resume, every dotted key of the flattened config is compared with
config.json. Its resume class, from the field table
(bitnet_jax.config.defaults),
decides: RUNTIME (no effect on the math) is accepted with an INFO line;
SCHEDULE (when things happen) with a WARNING stating the effect, for
train.steps the learning-rate jump at the resume step; IDENTITY (what the
run trains, and keys the table lacks outside the all-RUNTIME sections) is
refused with `RunIdentityError` unless train.allow_config_change is true.
A key on one side only is a change too, unless it is new and at its default.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import socket
import sys
from collections.abc import Mapping
from typing import Any

import ml_collections
from absl import logging

from bitnet_jax.config import FIELDS, ConfigError
from bitnet_jax.config.fields import IDENTITY, RUNTIME, SCHEDULE
from bitnet_jax.optim import optimizer as optimizer_lib
from bitnet_jax.runs.directory import (
  CONFIG_HISTORY,
  CONFIG_JSON,
  TOKENIZER_JSON,
  replaced_config_name,
)
from bitnet_jax.storage import paths
from bitnet_jax.storage.files import utc_now, write_atomically

# Sections whose every field is RUNTIME: a key unknown to the table there is
# RUNTIME too (a field added or removed since, e.g. a new health alarm).
RUNTIME_PREFIXES = tuple(sorted(
    {key.split(".")[0] + "." for key in FIELDS if "." in key}
    - {key.split(".")[0] + "." for key, field in FIELDS.items()
       if field.resume != RUNTIME}))
_ABSENT = object()  # a key present in one config only


class RunIdentityError(ConfigError):
  """A resume would change what the run trains; the message lists the keys."""


def key_class(key: str) -> str:
  """RUNTIME, SCHEDULE or IDENTITY for a dotted config key.

  A key of the field table has its class there; another key is IDENTITY,
  or RUNTIME under `RUNTIME_PREFIXES` (mesh., distributed., health.).
  """
  if key in FIELDS:
    return FIELDS[key].resume
  return RUNTIME if key.startswith(RUNTIME_PREFIXES) else IDENTITY


def config_dict(config: ml_collections.ConfigDict | Mapping) -> dict:
  """The config as plain JSON data, exactly as config.json stores it."""
  if isinstance(config, ml_collections.ConfigDict):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=repr))


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """{"a.b": leaf} of a nested mapping; an empty mapping is a leaf."""
  flat = {}
  for name, value in tree.items():
    key = f"{prefix}{name}"
    if isinstance(value, Mapping) and value:
      flat.update(flatten(value, key + "."))
    else:
      flat[key] = value
  return flat


def _same(a: Any, b: Any) -> bool:
  if isinstance(a, bool) != isinstance(b, bool):
    return False
  if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
    return math.isnan(b)
  return a == b


def config_changes(old: Mapping, new: Mapping) -> list[dict[str, Any]]:
  """The differing keys of two config dicts, sorted by key.

  Returns:
    One dict per changed key: {"key", "old", "new", "class"}, plus
    "absent": "old" or "new" for a key missing on that side (its value
    there is then None).
  """
  old_flat, new_flat = flatten(old), flatten(new)
  changes = []
  for key in sorted(old_flat.keys() | new_flat.keys()):
    a, b = old_flat.get(key, _ABSENT), new_flat.get(key, _ABSENT)
    if a is not _ABSENT and b is not _ABSENT and _same(a, b):
      continue
    change = {"key": key, "old": None if a is _ABSENT else a,
              "new": None if b is _ABSENT else b, "class": key_class(key)}
    if a is _ABSENT or b is _ABSENT:
      change["absent"] = "old" if a is _ABSENT else "new"
    changes.append(change)
  return changes


def _value(change: dict[str, Any], side: str) -> str:
  return "<absent>" if change.get("absent") == side else repr(change[side])


def _change_line(change: dict[str, Any]) -> str:
  return (f"config.{change['key']}: {_value(change, 'old')} -> "
          f"{_value(change, 'new')}")


def _schedule_warning(change: dict[str, Any], old: Mapping, new: Mapping,
                      resume_step: int) -> str:
  """One WARNING line stating the effect of a SCHEDULE key change."""
  key = change["key"]
  head = f"config.{key} {_value(change, 'old')} -> {_value(change, 'new')}"
  if change.get("absent") == "old":
    return f"{head}: the saved config has no such key (added since)"
  if change.get("absent") == "new":
    return f"{head}: this config has no such key (removed since)"
  if key == "train.steps":
    return f"{head} " + optimizer_lib.schedule_change_effect(
        ml_collections.ConfigDict(dict(old)),
        ml_collections.ConfigDict(dict(new)), resume_step)
  value, at = change["new"], f"from step {resume_step} on"
  every = f"every {value} steps (and at the end) {at}"
  effects = {
      "train.log_every": f"metric lines every {value} steps {at}",
      "train.eval_every": f"evaluations {every}",
      "train.eval_batches": ("changes the validation set: eval metrics "
                             f"before and after step {resume_step} are not "
                             "comparable"),
      "train.checkpoint_every": f"checkpoints {every}",
      "train.keep_checkpoints": (f"keeps the newest {value} checkpoints "
                                 "from the next save on"),
      "train.divergence_factor": ("changes when the divergence stop "
                                  "triggers (0 turns it off)"),
      "train.divergence_patience": ("changes how many high losses in a row "
                                    "stop the run")}
  return f"{head}: {effects.get(key, 'changes when things happen')}"


def _config_bytes(config: dict) -> bytes:
  return (json.dumps(config, indent=2) + "\n").encode()


def read_history(workdir: str) -> list[dict]:
  """The entries of WORKDIR/config_history.jsonl, oldest first.

  A missing file gives []. A line that is not a JSON object (half-written by
  a crash) is skipped with a WARNING naming the file and line number.
  """
  path = paths.join(workdir, CONFIG_HISTORY)
  try:
    lines = paths.read_bytes(path).decode("utf-8", "replace").splitlines()
  except FileNotFoundError:
    return []
  entries = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      entry = json.loads(line)
    except ValueError:
      entry = None
    if not isinstance(entry, dict):
      logging.warning("Skipping line %d of %s: not a complete JSON object "
                      "(half-written by a crash?)", number, path)
      continue
    entries.append(entry)
  return entries


def _append_history(workdir: str, entry: dict) -> None:
  """Appends one line, rewriting the file atomically (old lines kept)."""
  path = paths.join(workdir, CONFIG_HISTORY)
  try:
    old = paths.read_bytes(path)
  except FileNotFoundError:
    old = b""
  if old and not old.endswith(b"\n"):
    old += b"\n"  # a half-written last line stays on its own line
  write_atomically(path, old + json.dumps(entry).encode() + b"\n")


def read_saved_config(path: str) -> dict | None:
  """config.json as a dict, None if missing.

  Raises:
    RunIdentityError: if it exists but is not a JSON object.
  """
  try:
    with paths.open_file(path) as f:
      saved = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    saved = e
  if not isinstance(saved, dict):
    raise RunIdentityError(
        f"{path} cannot be read as the run's config ({saved!r}), so this "
        "resume cannot be checked against it. Fix: restore it (the first "
        f"entry of {CONFIG_HISTORY} holds the config of the first start), or "
        "delete it to make this start's config the reference.")
  return saved


def start_run(workdir: str, config: ml_collections.ConfigDict,
              resuming: bool, resume_step: int) -> list[str]:
  """Checks and records one start of the run in `workdir` (process 0 only).

  Not resuming (no checkpoint exists): (over)writes config.json, with a
  WARNING if a different one was there. Resuming: compares `config` with
  config.json (written from `config` if missing), refuses IDENTITY changes
  before writing anything, logs RUNTIME changes at INFO and SCHEDULE changes
  (and overridden IDENTITY changes) as WARNINGs, and never rewrites
  config.json. Both append an entry to config_history.jsonl.

  Args:
    workdir: the run's directory (created if missing).
    config: this start's config.
    resuming: whether a checkpoint is being restored.
    resume_step: the step training continues from (0 for a new run).

  Returns:
    The WARNING lines logged (for tests and callers).

  Raises:
    RunIdentityError: IDENTITY keys differ from config.json and
      config.train.allow_config_change is false; the message lists each as
      `config.<key>: <old> -> <new>` and the fix. Also if config.json is
      unreadable while resuming.
  """
  workdir = paths.resolve(workdir)
  paths.makedirs(workdir)
  config_path = paths.join(workdir, CONFIG_JSON)
  new = config_dict(config)
  allow = bool(config.train.get("allow_config_change", False))
  warnings: list[str] = []
  overrode = False

  if not resuming:
    try:
      saved = read_saved_config(config_path)
    except RunIdentityError:
      saved = {}  # unreadable: compares as different, a copy is kept
    changes = [] if saved is None else config_changes(saved, new)
    if changes:
      where = _keep_replaced_config(workdir, saved)
      warnings.append(
          f"{config_path} held a different config, but {workdir} has no "
          f"checkpoint: starting a new run and overwriting it; the old "
          f"config stays in {where}.")
    write_atomically(config_path, _config_bytes(new))
  else:
    saved = read_saved_config(config_path)
    if saved is None:
      warnings.append(f"{config_path} is missing: this start's config "
                      "becomes the reference of the resumed run.")
      saved = new
      write_atomically(config_path, _config_bytes(new))
    changes = config_changes(saved, new)
    defaults = {key: field.default for key, field in FIELDS.items()}
    for change in changes:  # a key added since, at its default: no change
      if change.get("absent") == "old" and _same(
          change["new"], defaults.get(change["key"], _ABSENT)):
        change["class"] = RUNTIME
    identity = [c for c in changes if c["class"] == IDENTITY]
    if identity and not allow:
      lines = "\n".join("  " + _change_line(c) for c in identity)
      raise RunIdentityError(
          f"Resuming {workdir} at step {resume_step} with a config that "
          f"changes what the run trains (compared with {config_path}, the "
          f"config of its first start):\n{lines}\n"
          "Fix: rerun with the original values, use a new --workdir for a "
          "new run, or pass --config.train.allow_config_change=true to "
          f"continue anyway (recorded in {CONFIG_HISTORY}).")
    if identity:
      overrode = True
      warnings.append(
          "train.allow_config_change=true: resuming despite changes to what "
          "the run trains (metrics before and after step "
          f"{resume_step} are not comparable): "
          + "; ".join(_change_line(c) for c in identity))
    for change in changes:
      if change["class"] == SCHEDULE:
        warnings.append(_schedule_warning(change, saved, new, resume_step))
      elif change["class"] == RUNTIME:
        logging.info("%s (runtime only: accepted)", _change_line(change))

  for line in warnings:
    logging.warning("%s", line)
  _append_history(workdir, {
      "time": utc_now(), "host": socket.gethostname(), "pid": os.getpid(),
      "argv": list(sys.argv), "start_step": int(resume_step),
      "resuming": bool(resuming), "config": new, "changes": changes,
      "overrode_refusal": overrode})
  return warnings


def _keep_replaced_config(workdir: str, saved: dict) -> str:
  """Where a config.json about to be overwritten stays readable.

  The history holds it when an entry has the same config; otherwise (written
  by an older version, or unreadable) a copy is kept beside it.
  """
  if saved and any(not config_changes(entry.get("config") or {}, saved)
                   for entry in read_history(workdir)):
    return paths.join(workdir, CONFIG_HISTORY)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime(
      "%Y%m%dT%H%M%SZ")
  path = paths.join(workdir, replaced_config_name(stamp))
  write_atomically(path, paths.read_bytes(paths.join(workdir, CONFIG_JSON)))
  return path


def same_tokenizer(a: bytes, b: bytes) -> bool:
  """Equal JSON content (formatting aside), else equal bytes."""
  if a == b:
    return True
  try:
    return json.loads(a) == json.loads(b)
  except ValueError:
    return False


def check_tokenizer(workdir: str, tokenizer_json: str, allow_change: bool,
                    *, resuming: bool = True) -> list[str]:
  """Checks that the run keeps its tokenizer; saves it at the first start.

  Args:
    workdir: the run's directory.
    tokenizer_json: path of the tokenizer.json this start loaded or trained
      (`PreparedData.tokenizer_path`).
    allow_change: config.train.allow_config_change: a different tokenizer is
      accepted with a WARNING (WORKDIR/tokenizer.json keeps the original).
    resuming: False for a start without checkpoints (a new run): a different
      WORKDIR/tokenizer.json is then replaced, with a WARNING.

  Returns:
    The WARNING lines logged.

  Raises:
    RunIdentityError: resuming without `allow_change`, and
      WORKDIR/tokenizer.json is missing, or exists and differs from
      `tokenizer_json`. A new data.dataset
      trains a new BPE, and a changed data.tokenizer_path loads another one;
      either would feed new token ids to the old embeddings.
    OSError: if `tokenizer_json` cannot be read.
  """
  saved_path = paths.join(paths.resolve(workdir), TOKENIZER_JSON)
  current = paths.read_bytes(tokenizer_json)
  try:
    saved = paths.read_bytes(saved_path)
  except FileNotFoundError:
    saved = None
  warnings: list[str] = []
  if saved is None and resuming:  # deleted: nothing to check against
    if not allow_change:
      raise RunIdentityError(
          f"{saved_path} is missing, but the run has checkpoints: the "
          "tokenizer it trained with cannot be checked against this start's "
          f"{tokenizer_json}. Put the run's tokenizer.json back, or rerun "
          "with --config.train.allow_config_change=true to resume with this "
          "one (copied there).")
    warnings.append(f"train.allow_config_change=true: {saved_path} was "
                    f"missing; resuming with {tokenizer_json}, copied there.")
    logging.warning("%s", warnings[-1])
  if saved is None:  # the first start (or the accepted copy): keep a copy
    write_atomically(saved_path, current)
  if saved is None or same_tokenizer(saved, current) or (
      not paths.is_url(saved_path)
      and os.path.realpath(saved_path) == os.path.realpath(tokenizer_json)):
    return warnings
  if not resuming:
    warnings.append(f"{saved_path} differs from this start's tokenizer "
                    f"{tokenizer_json}, but no checkpoint exists: starting a "
                    "new run and replacing it.")
    write_atomically(saved_path, current)
  elif allow_change:
    warnings.append(f"train.allow_config_change=true: resuming with the "
                    f"tokenizer {tokenizer_json}, which differs from the "
                    f"run's {saved_path}; token ids change under the trained "
                    "embeddings.")
  else:
    raise RunIdentityError(
        f"The tokenizer {tokenizer_json} of this start differs from the "
        f"run's tokenizer {saved_path}: the trained embeddings would read "
        "other token ids (a new data.dataset trains a new BPE; "
        "data.tokenizer_path may point to another file). Fix: rerun with "
        "the original data.dataset and data.tokenizer_path, use a new "
        "--workdir, or pass --config.train.allow_config_change=true to "
        "continue anyway.")
  for line in warnings:
    logging.warning("%s", line)
  return warnings
