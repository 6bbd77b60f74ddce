"""lm-eval tasks by name: load them, run them on a `BitNetLM`, report.

Tasks come from lm-eval's `TaskManager` (its bundled YAML tasks, plus the
folders of `include_path`: local tasks in lm-eval's YAML format) and run
through `lm_eval.simple_evaluate`, so task names, few-shot handling,
metrics and the results table are lm-eval's own.

lm-eval reads task data with `datasets.load_dataset` from the Hugging Face
hub (or its local cache). A task whose data is neither on this machine nor
downloadable raises `TaskError` with one line naming the task, its dataset
and the command that downloads it.
"""

from __future__ import annotations

import functools
import json
import math
import shlex
import sys
from collections.abc import Sequence
from typing import Any

import lm_eval
from absl import logging
from lm_eval import utils as lm_utils
from lm_eval.tasks import TaskManager

from bitnet_jax.storage import paths

# What datasets / huggingface_hub raise for data that is not there.
_MISSING_DATA = (ConnectionError, FileNotFoundError, TimeoutError)


class TaskError(ValueError):
  """A task that cannot run: unknown, or its data is not on the machine."""


def task_names(tasks: str | Sequence[str]) -> list[str]:
  """"arc_easy, hellaswag" or a list -> ["arc_easy", "hellaswag"]."""
  if isinstance(tasks, str):
    tasks = tasks.split(",")
  return [t.strip() for t in tasks if t.strip()]


def task_manager(include_path: str = "", include_defaults: bool = True,
                 names: Sequence[str] = (), *,
                 key: str = "--include_path") -> TaskManager:
  """lm-eval's `TaskManager` over its bundled tasks (`include_defaults`;
  indexing their ~14k YAML files takes 6-30 s on 2 cores) and the YAML task
  folders of `include_path` (comma separated). Built once per process and
  arguments (a run's start-up check and its evaluations share it), so a
  folder's tasks are read when it is first named.

  With `names` (the tasks a run asks for), the folders alone are indexed
  first: when they resolve every name (lm-eval loads them, so a local group
  naming a bundled task does not), that manager is returned and the bundled
  tasks are never indexed; otherwise the full one is.

  Args:
    key: where the user gave `include_path`, for the error message
      (`--include_path`, or `config.eval.harness_include_path` in a run).

  Raises:
    TaskError: naming `key` when a folder does not exist.
  """
  folders = tuple(task_names(include_path))
  for folder in folders:
    if not paths.isdir(folder):
      raise TaskError(f"{key}={folder!r} is not a folder of lm-eval YAML "
                      "tasks")
  if folders and include_defaults and names:
    local = _indexed(folders, False)
    try:
      local.load(list(names))
      return local
    except Exception as e:  # noqa: BLE001 (any failure: the full index decides)
      logging.info("--include_path does not resolve %s alone (%s: %s); "
                   "indexing lm-eval's bundled tasks too", list(names),
                   type(e).__name__, e)
  return _indexed(folders, include_defaults)


@functools.lru_cache(maxsize=8)
def _indexed(folders: tuple[str, ...], include_defaults: bool) -> TaskManager:
  return TaskManager(include_path=list(folders) or None,
                     include_defaults=include_defaults)


def _download_command(entry_config: dict) -> str:
  """What a task's YAML config needs downloaded, and the command that does."""
  path = entry_config.get("dataset_path")
  if not path:
    return "its dataset (see the task's YAML file)"
  name = entry_config.get("dataset_name")
  arguments = ", ".join(repr(a) for a in (path, name) if a)
  return (f"the dataset {path!r}{f' ({name})' if name else ''}: download it "
          f"on a machine with internet with `{shlex.quote(sys.executable)} -c "
          f'"import datasets; datasets.load_dataset({arguments})"` and copy '
          "~/.cache/huggingface here (or set HF_HOME)")


def check_tasks(names: Sequence[str], manager: TaskManager) -> None:
  """Loads each task once (its data included), so that a bad name or
  missing data fails before a model is loaded or a run trains.

  Raises:
    TaskError: one line: lm-eval's message for an unknown name (with how to
      list the tasks), or the task, its dataset and the download command.
  """
  if not names:
    raise TaskError("--tasks is empty: name lm-eval tasks, e.g. "
                    "--tasks=arc_easy,hellaswag")
  for name in names:
    try:
      manager.load([name])
    except KeyError as e:
      raise TaskError(f"--tasks: {e.args[0] if e.args else e}; list the "
                      "tasks with `lm-eval ls tasks` (or add "
                      "--include_path for local YAML tasks)") from None
    except _MISSING_DATA as e:
      entry = manager.task_index.get(name)
      config = (entry.cfg or {}) if entry is not None else {}
      raise TaskError(
          f"--tasks: task {name!r} cannot read its data "
          f"({type(e).__name__}: {str(e).splitlines()[0]}); it needs "
          f"{_download_command(config)}") from None


def evaluate(lm: Any, names: Sequence[str], manager: TaskManager, *,
             num_fewshot: int | None = None, limit: float | None = None,
             bootstrap_iters: int = 100000, log_samples: bool = False
             ) -> dict[str, Any]:
  """Runs tasks through `lm_eval.simple_evaluate` on `lm`.

  Args:
    lm: an `lm_eval.api.model.LM` (a `BitNetLM`).
    names: task, group or tag names (`manager`'s).
    num_fewshot: examples in each prompt; None: each task's default.
    limit: at most this many documents per task (a float < 1: a fraction);
      None: all (lm-eval marks limited scores as not for reporting).
    bootstrap_iters: resamples for the standard errors; 0 skips them.
    log_samples: keep every request and response in the results.

  Returns:
    lm-eval's results dict ("results", "versions", "n-shot", "configs", ...).

  Raises:
    TaskError: see `check_tasks` (raised by lm-eval while loading).
  """
  try:
    return lm_eval.simple_evaluate(
        model=lm, tasks=list(names), num_fewshot=num_fewshot, limit=limit,
        task_manager=manager, bootstrap_iters=bootstrap_iters,
        log_samples=log_samples, verbosity="WARNING")
  except KeyError as e:  # an unknown name: lm-eval's message
    raise TaskError(f"--tasks: {e.args[0] if e.args else e}") from None


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
  """{"harness/<task>/<metric>": value} of lm-eval's results.

  lm-eval's keys are "<metric>,<filter>"; the filter is dropped when it is
  "none" and appended otherwise ("exact_match_strict-match"). Standard
  errors keep their "_stderr" name; "N/A" and other non-numbers are left out.
  """
  flat = {}
  for task, metrics in results.get("results", {}).items():
    for key, value in metrics.items():
      if "," not in key or not isinstance(value, (int, float)) or (
          isinstance(value, bool)):
        continue
      metric, _, filter_name = key.partition(",")
      name = metric if filter_name == "none" else f"{metric}-{filter_name}"
      if not math.isnan(float(value)):
        flat[f"harness/{task}/{name}"] = float(value)
  return flat


def table(results: dict[str, Any]) -> str:
  """lm-eval's markdown results table (and its groups table, if any)."""
  text = lm_utils.make_table(results)
  if results.get("groups"):
    text += "\n" + lm_utils.make_table(results, "groups")
  return text


def write_results(results: dict[str, Any], path: str) -> None:
  """Writes lm-eval's results as JSON to `path` (local or gs://)."""
  text = json.dumps(results, indent=2, default=lm_utils.handle_non_serializable,
                    ensure_ascii=False)
  parent = paths.parent(path)
  if parent and "://" not in path:
    import os  # pylint: disable=g-import-not-at-top
    os.makedirs(parent, exist_ok=True)
  with paths.open_file(path, "w", encoding="utf-8") as f:
    f.write(text + "\n")
