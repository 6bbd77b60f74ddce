"""Helpers shared by tests and the subprocesses they start (no jax import).

Subprocess programs run with the repository as working directory and import
this module with `sys.path.insert(0, "tests")`.
"""

import importlib.util
import os
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(spec: str, overrides: dict | None = None):
  """Loads "configs/NAME.py[:variant]" like ml_collections' config_flags.

  Args:
    spec: the config file relative to the repository, with an optional
      ":variant".
    overrides: {"section.field": value} applied after loading.
  """
  path, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location(
      "config_under_test", os.path.join(REPO, path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(variant) if variant else module.get_config()
  for key, value in (overrides or {}).items():
    section, field = key.split(".")
    config[section][field] = value
  return config


def slow_train_steps(seconds: float) -> None:
  """Makes every train step sleep `seconds` first, so signals land mid-run."""
  from bitnet_jax import train  # pylint: disable=g-import-not-at-top
  real = train.make_train_step

  def make(*args, **kwargs):
    step = real(*args, **kwargs)

    def run(state, window):
      time.sleep(seconds)
      return step(state, window)
    return run

  train.make_train_step = make
