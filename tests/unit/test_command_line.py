"""Every command answers `--help` with its usage and exit status 0."""

import os
import sys

import pytest

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
