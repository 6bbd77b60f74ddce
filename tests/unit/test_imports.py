"""The package layout: imports flow one way, and top-level modules are
commands.

Each package of `bitnet_jax` sits on a level; a module may import its own
package and packages on lower levels only. `training` and `interop` share a
level and never import each other. The top-level modules (`main`, `convert`,
`evaluate`, `generate`, `compile`) are commands: no package imports them.
The check reads every module's import statements (`ast`), including imports
inside functions, so a lazy import cannot hide an upward one.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "bitnet_jax"

# Lowest first; a package may import the packages listed before it.
LEVELS = (
    ("storage",), ("config",), ("quant",), ("model",), ("distributed",),
    ("data",), ("optim",), ("runs",), ("metrics",), ("evaluation",),
    ("training", "interop"), ("aot",))
COMMANDS = ("main", "convert", "evaluate", "generate", "compile")
LEVEL = {name: i for i, names in enumerate(LEVELS) for name in names}


def _modules() -> list[pathlib.Path]:
  return sorted(PACKAGE.rglob("*.py"))


def _owner(path: pathlib.Path) -> str:
  """The package (or command module) a file belongs to."""
  parts = path.relative_to(PACKAGE).parts
  return parts[0] if len(parts) > 1 else parts[0][:-len(".py")]


def _imported(path: pathlib.Path) -> set[str]:
  """The first component under `bitnet_jax` of every module it imports."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      parts = node.module.split(".")
      if parts[0] != "bitnet_jax":
        continue
      if len(parts) > 1:
        names.add(parts[1])
      else:  # from bitnet_jax import x, y
        names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.Import):
      for alias in node.names:
        parts = alias.name.split(".")
        if parts[0] == "bitnet_jax" and len(parts) > 1:
          names.add(parts[1])
  return names


def test_every_file_belongs_to_a_known_package_or_is_a_command():
  unknown = {_owner(p) for p in _modules()} - set(LEVEL) - set(COMMANDS) - {
      "__init__"}
  assert not unknown, (
      f"bitnet_jax/{sorted(unknown)} is neither a package of LEVELS nor a "
      "command: put the module in the package of its concern, or add the "
      "package to LEVELS (and the README's map)")


@pytest.mark.parametrize("path", _modules(),
                         ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_flow_downward(path):
  owner = _owner(path)
  imported = _imported(path) - {owner}
  if owner in COMMANDS or owner == "__init__":
    assert not imported & set(COMMANDS), (
        f"{path.name} imports the commands {imported & set(COMMANDS)}")
    return
  commands = imported & set(COMMANDS)
  assert not commands, (
      f"bitnet_jax/{owner} imports the command modules {sorted(commands)}: "
      "move what it needs into a package")
  upward = sorted(name for name in imported
                  if LEVEL.get(name, len(LEVELS)) >= LEVEL[owner])
  assert not upward, (
      f"{path.relative_to(PACKAGE)} ({owner}, level {LEVEL[owner]}) imports "
      f"{upward}, on its own level or above: imports flow down "
      f"{' -> '.join('/'.join(n) for n in reversed(LEVELS))}")


def test_the_check_sees_an_upward_import(tmp_path):
  """Guards the test above against passing vacuously."""
  module = tmp_path / "bad.py"
  module.write_text("def f():\n  from bitnet_jax.training import loop\n"
                    "from bitnet_jax import runs, storage\n")
  assert _imported(module) == {"training", "runs", "storage"}
