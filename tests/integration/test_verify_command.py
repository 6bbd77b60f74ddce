"""`python -m bitnet_jax.data.verify` in a fresh process: a missing config
file is one line naming the flag (the verifier's counts:
tests/unit/test_verify.py)."""

import subprocess
import sys

from drivers import REPO


def test_cli_names_a_missing_config_file():
  result = subprocess.run(
      [sys.executable, "-m", "bitnet_jax.data.verify",
       "--config=configs/no_such.py", "--batches=5"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result
  assert "--config=configs/no_such.py" in result.stderr, result.stderr
  assert "configs/tiny.py" in result.stderr, result.stderr
