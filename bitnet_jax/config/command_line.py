"""What every command (`python -m bitnet_jax.main`, `evaluate`, `generate`,
`convert`, `compile`, `data.verify`) does around absl's `app.run`.

- **A refusal is one line.** An expected failure (a bad flag or config file,
  an invalid config value, a path that cannot be read or written, a full
  disk, a malformed run or model file, and each command's own error classes)
  prints `error: <ErrorClass>: <what, naming the key, path or row, and the
  fix>` on stderr and exits with status 2 (`REFUSAL_STATUS`), without a
  traceback. `--debug` (or `BITNET_JAX_DEBUG=1` in the environment) raises
  it instead, traceback and all.
- **`--help` exits 0.** absl ends `--help` (`-?`, `--helpshort`,
  `--helpfull`) with exit status 1, as if the command had failed; `run`
  exits 0 there, as argparse, click and the GNU tools do.
- **No library chatter.** INFO lines come from bitnet_jax only; the
  warnings that third-party libraries print on paths that work (TFDS's
  missing `dataset_info.json` of a corpus being built, orbax's handler
  override, JAX's probe of an absent TPU) are dropped (`quiet_logging`).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pkgutil
import re
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from typing import Any

from absl import app, flags
from absl import logging as absl_logging

from bitnet_jax.config.validation import ConfigError

# The flags absl answers with the usage text (absl.app's HelpFlag, its
# HelpshortFlag and HelpfullFlag).
# (`-h` is not one: absl refuses it as an unknown flag, status 1.)
HELP_FLAGS = frozenset({"--help", "-help", "-?", "--helpshort", "-helpshort",
                        "--helpfull", "-helpfull"})
REFUSAL_STATUS = 2  # a refused input: what to fix is in the one line
DEBUG_ENV_VAR = "BITNET_JAX_DEBUG"  # "1": refusals raise with a traceback
_EXIT_GRACE_SECONDS = 10.0  # for library threads to end after a refusal

_DEBUG = flags.DEFINE_bool(
    "debug", False, "Show the full traceback of a refusal (a bad input "
    f"that otherwise prints one line and exits {REFUSAL_STATUS}); also "
    f"{DEBUG_ENV_VAR}=1.")

# Errors every command reports in one line: invalid config values, and the
# environment's (missing, unreadable or read-only paths, full disks).
COMMON_REFUSALS: tuple[type[BaseException], ...] = (
    ConfigError, OSError, app.UsageError)

# Third-party WARNING and ERROR lines that are not news on a path that works
# (their INFO lines are all dropped): (module path fragment, message
# fragment).
_LIBRARY_NOISE = (
    ("type_handler_registry", "overriding"),  # our orbax array handler
    ("file_utils", "has no dataset_info.json"),  # TFDS, a corpus being built
    # asyncio reporting orbax's reads of a damaged checkpoint that the
    # restore already reported and recovered from
    ("asyncio", "Task exception was never retrieved"),
)


_STDLIB = sysconfig.get_paths()["stdlib"]


def asks_for_help(argv: list[str]) -> bool:
  """Whether `argv` (the arguments after the program) asks for the usage."""
  return any(arg.split("=")[0] in HELP_FLAGS for arg in argv)


def debugging(argv: list[str] | None = None) -> bool:
  """Whether refusals show their traceback (`--debug` or the env var)."""
  if os.environ.get(DEBUG_ENV_VAR, "") not in ("", "0"):
    return True
  if flags.FLAGS.is_parsed():
    return _DEBUG.value
  return any(a in ("--debug", "-debug", "--debug=true")
             for a in (argv or sys.argv)[1:])


def one_line(error: BaseException) -> str:
  """`error`'s message on one line: `<ErrorClass>: <message>`, the
  message's lines joined by "; " (messages from libraries span lines)."""
  text = str(error)
  if isinstance(error, KeyError) and len(error.args) == 1:
    text = str(error.args[0])
  parts = [p.strip() for p in text.splitlines() if p.strip()]
  return f"{type(error).__name__}: {'; '.join(parts) or repr(error)}"


def refuse(message: str) -> None:
  """Prints `error: <message>` on stderr and exits `REFUSAL_STATUS`.

  Anything that libraries print while the process shuts down after it
  (orbax and asyncio threads reporting the interrupted work) is dropped:
  the one line is the report. A library thread still stuck after
  `_EXIT_GRACE_SECONDS` (a request to an object store that never answers)
  does not keep the process alive.
  """
  print(f"error: {message}", file=sys.stderr, flush=True)
  logging.disable(logging.CRITICAL)
  sys.stderr = open(os.devnull, "w", encoding="utf-8")  # noqa: SIM115
  give_up = time.monotonic() + _EXIT_GRACE_SECONDS
  for thread in threading.enumerate():
    if thread is not threading.current_thread() and not thread.daemon:
      thread.join(max(0.0, give_up - time.monotonic()))
      if thread.is_alive():  # e.g. a library's request to a silent store:
        sys.stdout.flush()  # exiting normally would wait for it forever
        os._exit(REFUSAL_STATUS)
  sys.exit(REFUSAL_STATUS)


def _unknown_field(error: BaseException, argv: list[str]) -> str | None:
  """`--config.a.b=v: config.a has no field 'b'; did you mean 'c'?` when
  `error` is ml_collections' unknown-field error, else None."""
  text = str(error).replace("\\'", "'").replace("\\n", " ")
  found = re.search(r"'(\w+)'", text)
  if not found or not isinstance(error, (KeyError, AttributeError)):
    return None
  name = found.group(1)
  guess = re.search(r'Did you mean "(\w+)"', text)
  for arg in argv[1:]:
    key = arg.lstrip("-").split("=", 1)[0]
    parts = key.split(".")
    if name in parts[1:]:
      at = parts.index(name, 1)
      section = ".".join(parts[:at])
      return (f"{arg}: {section} has no field {name!r}"
              + (f"; did you mean {guess.group(1)!r}?" if guess else "")
              + " (every field: bitnet_jax/config/defaults.py)")
  return None


def _culprit(error: BaseException, argv: list[str]) -> str:
  """The argument of `argv` that `error` (raised while parsing) is about:
  the flag its message names, else a config file flag whose file it names,
  else all of them."""
  text = str(error)
  named = re.findall(r"flag --?([\w.]+)", text) + re.findall(
      r"flag '([\w.]+)'", text)
  for arg in argv[1:]:
    key = arg.lstrip("-").split("=", 1)[0]
    if key in named:
      return arg
  for arg in argv[1:]:
    value = arg.split("=", 1)[-1].split(":", 1)[0]
    if arg.startswith(("--config=", "-config=")) and (
        os.path.basename(value) in text or isinstance(error, SyntaxError)):
      return arg
  return " ".join(argv[1:])


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, refusing bad flags in one line.

  A flag that does not parse (an unknown flag or `--config.section.field`,
  a value of the wrong type, a config file with an error, a variant its
  `get_config()` does not take), or a config file that does not exist,
  prints the argument, the reason and the fix, and exits
  `REFUSAL_STATUS`.
  """
  try:
    rest = flags.FLAGS(argv)
  except SystemExit:
    raise
  except Exception as e:  # pylint: disable=broad-except
    if debugging(argv):
      raise
    unknown = _unknown_field(e, argv)
    if unknown:
      refuse(f"ConfigError: {unknown}")
    reason = one_line(e)
    if "takes 0 positional arguments" in reason:
      reason = ("this config file has no variants (its get_config() takes "
                "no argument): drop the ':<variant>'")
    elif "Traceback" in reason:  # ml_collections wraps the config's error
      reason = reason.rsplit("; ", 1)[-1]
    refuse(f"ConfigError: {_culprit(e, argv)}: {reason}")
  for name in flags.FLAGS:
    flag = flags.FLAGS[name]
    filename = getattr(flag, "config_filename", None)  # with its :variant
    filename = filename and filename.split(":", 1)[0]
    if flag.present and filename and not os.path.isfile(filename):
      refuse(f"ConfigError: --{name}={flag.serialize().split('=', 1)[-1]}: "
             f"no such config file {filename!r} (from {os.getcwd()}); give "
             "a Python file with get_config(), e.g. configs/tiny.py")
  return rest


def _only_cpu_here() -> bool:
  """True where JAX can only use the CPU: no TPU chip on the PCI bus and no
  PJRT plugin (CUDA, ROCm) installed, though libtpu may be (`.[tpu]`, for
  compiling for TPU slices on this host)."""
  if os.environ.get("JAX_PLATFORMS") is not None:
    return False  # the user chose
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    if hardware_utils.num_available_tpu_chips_and_device_id()[0]:
      return False
  except Exception:  # noqa: BLE001  (private module: on any failure, skip)
    return False
  spec = importlib.util.find_spec("jax_plugins")
  plugins = list(pkgutil.iter_modules(spec.submodule_search_locations)) if (
      spec and spec.submodule_search_locations) else []
  return not plugins and not any(
      importlib.util.find_spec(m) for m in ("jax_cuda12_plugin",
                                            "jax_cuda13_plugin",
                                            "jax_rocm60_plugin"))


class _LibraryNoise(logging.Filter):
  """INFO from bitnet_jax only; known third-party chatter dropped."""

  def filter(self, record: logging.LogRecord) -> bool:
    path = record.pathname
    if "bitnet_jax" in path or not any(
        where in path for where in ("site-packages", "dist-packages",
                                    _STDLIB)):
      return True  # ours: the package, experiments, tests' programs
    if record.levelno < logging.WARNING:
      return False
    if "orbax" in path and record.exc_info and not debugging():
      return False  # a failed background save: the Checkpointer raises it
    message = record.getMessage()
    return not any(where in record.pathname and what in message
                   for where, what in _LIBRARY_NOISE)


def _library_unraisable(unraisable: Any) -> bool:
  """Whether an exception Python could not raise (`sys.unraisablehook`)
  comes from a library's abandoned coroutine: orbax's reads of a damaged
  checkpoint, which the restore has already reported and recovered from."""
  libraries = ("orbax", "tensorstore", "asyncio")
  code = getattr(unraisable.object, "cr_code", None)
  where = [getattr(code, "co_filename", "")]
  tb = unraisable.exc_traceback
  while tb is not None:  # TensorStore's callbacks into a closed loop
    where.append(tb.tb_frame.f_code.co_filename)
    tb = tb.tb_next
  return any(lib in w for w in where for lib in libraries)


def quiet_logging() -> None:
  """Installs the console's filter (module docstring) and, where only the
  CPU can run JAX, skips the TPU backend's probe (its libtpu start-up
  messages). Abandoned library coroutines' exceptions (orbax reading a
  damaged checkpoint it has reported) are logged at DEBUG, not printed."""
  absl_logging.get_absl_handler().addFilter(_LibraryNoise())
  default_hook = sys.unraisablehook

  def hook(unraisable: Any) -> None:
    if _library_unraisable(unraisable) and not debugging():
      absl_logging.debug("ignored in %r: %s", unraisable.object,
                         unraisable.exc_value)
      return
    default_hook(unraisable)
  sys.unraisablehook = hook
  if _only_cpu_here():
    import jax  # pylint: disable=g-import-not-at-top
    try:
      jax.config.update("jax_platforms", "cpu")
    except RuntimeError:  # a backend already started: too late to skip
      pass


def run(main: Callable[[list[str]], Any], *,
        refusals: tuple[type[BaseException], ...] = ()) -> None:
  """`absl.app.run(main)` with one-line refusals and `--help` exiting 0.

  Args:
    main: the command's main(argv).
    refusals: the command's own error classes reported in one line, on top
      of `COMMON_REFUSALS`.

  Raises:
    SystemExit: main's status; `REFUSAL_STATUS` after a refusal's line; 0
      after printing the usage.
  """
  caught = COMMON_REFUSALS + tuple(refusals)

  def guarded(argv: list[str]) -> Any:
    quiet_logging()
    try:
      return main(argv)
    except caught as e:
      if debugging():
        raise
      refuse(one_line(e))

  try:
    app.run(guarded, flags_parser=parse_flags)
  except SystemExit as e:
    if e.code == 1 and asks_for_help(sys.argv[1:]):
      sys.exit(0)
    raise
