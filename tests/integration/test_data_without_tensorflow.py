"""The data path never imports TensorFlow, checked in fresh processes: the
prepare command a missing TFDS dataset's error prints, and preparing and
reading the stdlib corpus (the data layer itself: tests/unit/test_data.py).
"""

import os
import shlex
import subprocess
import sys

import pytest

from bitnet_jax import data
from bitnet_jax.config import ConfigError
from bitnet_jax.data import corpus
from bitnet_jax.data import stdlib as stdlib_corpus

from drivers import REPO, load_config


def test_prepare_command_in_the_message_builds_without_tensorflow(tmp_path):
  name = f"python_stdlib/{stdlib_corpus.stdlib_config(0.05).name}"
  config = load_config("configs/tiny.py", {"data.data_dir": str(tmp_path),
                                           "data.dataset": f"tfds:{name}"})
  with pytest.raises(ConfigError, match="is not prepared") as error:
    data.prepare(config)
  argv = shlex.split(str(error.value).rpartition("with: ")[2])
  assert argv[1:2] == ["-c"] and len(argv) == 3, f"not python -c: {argv}"
  program = ("import bitnet_jax.data.corpus  # registers python_stdlib\n"
             f"{argv[2]}\n"
             "import sys\n"
             "assert 'tensorflow' not in sys.modules, 'imported TensorFlow'\n")
  result = subprocess.run([argv[0], "-c", program], check=False, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, f"the command failed: {result.stderr[-3000:]}"
  train, _ = corpus.open_splits(config, str(tmp_path))
  assert len(train) > 0, "the prepared dataset has no train documents"


def test_data_path_does_not_import_tensorflow(data_dir, tmp_path):
  code = f"""
import importlib.util, sys
sys.path.insert(0, {REPO!r})
spec = importlib.util.spec_from_file_location(
    "tiny", {os.path.join(REPO, "configs", "tiny.py")!r})
tiny = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tiny)
config = tiny.get_config()
config.data.data_dir = {data_dir!r}
from bitnet_jax import data
from bitnet_jax.data import stdlib as stdlib_corpus
stdlib_corpus.prepare_stdlib({str(tmp_path)!r}, 0.05)  # a fresh TFDS build
prepared = data.prepare(config)
assert next(data.train_iterator(prepared, config)).tokens.shape == (8, 33)
print(sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow"))
"""
  result = subprocess.run([sys.executable, "-c", code], check=False,
                          capture_output=True, text=True, cwd=str(tmp_path),
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().splitlines()[-1] == "[]", (
      f"TensorFlow was imported: {result.stdout[-500:]}")
