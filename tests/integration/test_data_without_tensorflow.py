"""The data path never imports TensorFlow, checked in a fresh process: the
prepare command a missing TFDS dataset's error prints, which builds it.
(Preparing and reading a built corpus without TensorFlow: every command-line
training run of tests/integration/test_train.py; the data layer itself:
tests/unit/test_data.py.)
"""

import shlex
import subprocess

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
