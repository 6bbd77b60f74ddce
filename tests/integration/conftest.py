"""Fixtures of the integration tier (tests/conftest.py has the shared ones)."""

import pytest


@pytest.fixture
def tiny_config(tiny_config, data_dir):  # pylint: disable=redefined-outer-name
  """tests/conftest.py's `tiny_config`, its data prepared (`data_dir`)."""
  assert tiny_config.data.data_dir == data_dir
  return tiny_config


@pytest.fixture
def tiny_model_config(load_config):
  """A fresh configs/tiny.py config for tests that compile steps on batches
  they make (no corpus, so nothing waits for `data_dir`)."""
  return load_config("configs/tiny.py")
