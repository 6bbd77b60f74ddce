"""Every command answers `--help` with its usage and exit status 0."""

import logging
import os
import sys

import pytest
from absl import logging as absl_logging

from bitnet_jax.config import command_line

from drivers import REPO

COMMANDS = ("main.py", "evaluate.py", "generate.py", "convert.py",
            "compile.py", os.path.join("data", "verify.py"))


@pytest.mark.parametrize("arg", ["--help", "-?", "--helpfull"])
def test_asking_for_the_usage_exits_zero_without_running_main(
    monkeypatch, capsys, arg):
  ran = []
  monkeypatch.setattr(sys, "argv", ["bitnet_jax.command", arg])
  with pytest.raises(SystemExit) as exited:
    command_line.run(ran.append)
  assert exited.value.code == 0, f"{arg} exited {exited.value.code}"
  assert not ran, f"main ran after {arg}"
  assert "flags" in capsys.readouterr().out.lower(), "no usage was printed"


def test_a_failing_main_keeps_its_status(monkeypatch):
  monkeypatch.setattr(sys, "argv", ["bitnet_jax.command"])

  def main(argv):
    del argv
    sys.exit(1)  # what a command's one-line error does
  with pytest.raises(SystemExit) as exited:
    command_line.run(main)
  assert exited.value.code == 1, "a failure was turned into success"


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_starts_through_command_line_run(command):
  with open(os.path.join(REPO, "bitnet_jax", command), encoding="utf-8") as f:
    source = f.read()
  assert "command_line.run(main" in source and "app.run(" not in source, (
      f"bitnet_jax/{command} does not start through command_line.run, so "
      "its --help would exit 1")


@pytest.fixture
def process_state(monkeypatch):
  """What a refusal changes for the rest of its process (it exits), put
  back for the tests after this one."""
  handler = absl_logging.get_absl_handler()
  filters = list(handler.filters)
  monkeypatch.setattr(sys, "stderr", sys.stderr)
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
  yield
  handler.filters[:] = filters
  logging.disable(logging.NOTSET)


def _failing_main(argv):
  del argv
  raise command_line.ConfigError("config.train.steps=0 is invalid:\nmust be"
                                 " >= 1")


def test_a_refusal_is_one_line_and_status_two(monkeypatch, capsys,
                                              process_state):
  monkeypatch.setattr(sys, "argv", ["bitnet_jax.command"])
  monkeypatch.delenv(command_line.DEBUG_ENV_VAR, raising=False)
  with pytest.raises(SystemExit) as exited:
    command_line.run(_failing_main)
  assert exited.value.code == command_line.REFUSAL_STATUS, exited.value.code
  assert capsys.readouterr().err == (
      "error: ConfigError: config.train.steps=0 is invalid:; must be >= 1\n")


def test_the_debug_variable_raises_the_refusal(monkeypatch, process_state):
  monkeypatch.setattr(sys, "argv", ["bitnet_jax.command"])
  monkeypatch.setenv(command_line.DEBUG_ENV_VAR, "1")
  with pytest.raises(command_line.ConfigError, match="steps=0"):
    command_line.run(_failing_main)
