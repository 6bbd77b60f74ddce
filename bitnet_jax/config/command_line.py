"""What every command (`python -m bitnet_jax.main`, `evaluate`, `generate`,
`convert`, `compile`, `data.verify`) does around absl's `app.run`.

absl ends `--help` (`-?`, `--helpshort`, `--helpfull`) with exit status
1, as if the command had failed; shells and CI scripts that ask a command for
its usage read that as an error. `run` exits 0 there instead, as argparse,
click and the GNU tools do.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from absl import app

# The flags absl answers with the usage text (absl.app's HelpFlag, its
# HelpshortFlag and HelpfullFlag).
# (`-h` is not one: absl refuses it as an unknown flag, status 1.)
HELP_FLAGS = frozenset({"--help", "-help", "-?", "--helpshort", "-helpshort",
                        "--helpfull", "-helpfull"})


def asks_for_help(argv: list[str]) -> bool:
  """Whether `argv` (the arguments after the program) asks for the usage."""
  return any(arg.split("=")[0] in HELP_FLAGS for arg in argv)


def run(main: Callable[[list[str]], Any], **kwargs) -> None:
  """`absl.app.run(main, **kwargs)`, but a request for the usage exits 0.

  Raises:
    SystemExit: as `app.run` does: main's status, 1 for a bad flag (absl's
      one-line message), 0 after printing the usage.
  """
  try:
    app.run(main, **kwargs)
  except SystemExit as e:
    if e.code == 1 and asks_for_help(sys.argv[1:]):
      sys.exit(0)
    raise
