"""Tests of the data diversity verifier (`python -m bitnet_jax.data.verify`).

Every expected figure is recounted here from the token files and from the
batches `data.train_iterator` yields, not taken from the verifier.
"""

from __future__ import annotations

import collections
import os
import random

import numpy as np
import pytest

from bitnet_jax import data
from bitnet_jax.data import verify

from drivers import load_config, stream_config

BATCHES = 200


def file_windows(path: str, dtype: str, seq_len: int) -> np.ndarray:
  """Every window of a token file, int32 `[windows, seq_len + 1]`."""
  flat = np.fromfile(path, dtype=dtype)
  n_windows = (flat.size - 1) // seq_len
  return flat[np.arange(n_windows)[:, None] * seq_len
              + np.arange(seq_len + 1)].astype(np.int32)


def draw(prepared, config, batches: int, iterator=None) -> list[bytes]:
  """The windows of the first `batches` training batches, as bytes."""
  it = iterator or data.train_iterator(prepared, config)
  return [row.tobytes() for _ in range(batches)
          for row in np.asarray(next(it).tokens, np.int32)]


def within_epoch_duplicates(rows: list[bytes], n_windows: int) -> list:
  """[(window, draws)] of windows drawn more than once in one epoch."""
  per_epoch = collections.Counter((j // n_windows, row)
                                  for j, row in enumerate(rows))
  return [(row, n) for (_, row), n in per_epoch.items() if n > 1]


def write_identical_files(directory: str, n_files: int) -> None:
  """`n_files` text files that all hold the same 40 random words."""
  rng = random.Random(0)
  text = " ".join(f"w{rng.randrange(300)}" for _ in range(40))
  os.makedirs(directory, exist_ok=True)
  for i in range(n_files):
    with open(os.path.join(directory, f"doc{i:02d}.txt"), "w") as f:
      f.write(text)


@pytest.fixture(scope="module")
def identical(tmp_path_factory):
  """A `files:` corpus of identical documents: (config, prepared).

  64 copies, so that the windows (every seq_len tokens) come back to the
  same offset in the document: with few copies every window can differ.
  """
  root = str(tmp_path_factory.mktemp("identical"))
  write_identical_files(os.path.join(root, "corpus"), n_files=64)
  config = load_config("configs/tiny.py", {
      "data.data_dir": root, "data.dataset": f"files:{root}/corpus/*.txt",
      "data.eval_fraction": 0.3, "train.batch_size": 4, "train.seq_len": 16,
      "train.eval_batches": 1, "train.sample_prompts": 0})
  return config, data.prepare(config)


def test_identical_documents_exit_1_with_their_duplicates_counted(
    identical, capsys):
  config, prepared = identical
  windows = file_windows(prepared.train_tokens, prepared.dtype,
                         config.train.seq_len)
  batches = len(windows) // config.train.batch_size  # within the 1st epoch
  rows = draw(prepared, config, batches)
  expected = len(rows) - len(set(rows))
  assert expected > 0.05 * len(rows), "the corpus is not repetitive enough"
  report = verify.verify(config, batches)
  assert report["duplicates_within_epoch"] == expected, report
  assert report["corpus_copies_within_epoch"] == expected, report
  assert report["status"] == 1, f"a corpus of copies passes: {report}"
  assert verify.run(config, batches) == 1
  assert "FAILED" in capsys.readouterr().out


def test_identical_documents_share_windows_with_eval(identical):
  config, prepared = identical
  t = config.train
  eval_windows = file_windows(prepared.eval_tokens, prepared.dtype,
                              t.seq_len)[:t.eval_batches * t.batch_size]
  batches = 30
  shared = (set(draw(prepared, config, batches))
            & {row.tobytes() for row in eval_windows})
  report = verify.verify(config, batches)
  assert shared, "eval files hold the same text: some windows must match"
  assert report["train_eval_shared"] == len(shared), (
      f"verifier: {report['train_eval_shared']} shared windows, recount: "
      f"{len(shared)}")
  assert any(line.startswith("WARNING: ") and "eval windows" in line
             for line in verify.format_report(report))


def test_later_epochs_repeat_windows_without_failing(tmp_path):
  root = str(tmp_path)
  os.makedirs(os.path.join(root, "corpus"))
  for i in range(12):  # distinct documents this time
    with open(os.path.join(root, "corpus", f"d{i:02d}.txt"), "w") as f:
      f.write(" ".join(f"u{i}v{k}" for k in range(60)))
  config = load_config("configs/tiny.py", {
      "data.data_dir": root, "data.dataset": f"files:{root}/corpus/*.txt",
      "data.eval_fraction": 0.3, "train.batch_size": 4, "train.seq_len": 16,
      "train.eval_batches": 1, "train.sample_prompts": 0})
  prepared = data.prepare(config)
  windows = file_windows(prepared.train_tokens, prepared.dtype, 16)
  assert len({row.tobytes() for row in windows}) == len(windows)
  batches = 2 * len(windows) // 4 + 1  # two epochs and a bit
  report = verify.verify(config, batches)
  assert report["duplicates_within_epoch"] == 0, report
  assert report["repeats_of_earlier_epochs"] == batches * 4 - len(windows), (
      report)
  assert report["status"] == 0, report


def test_stream_mode_reports_epochs_unknown(tmp_path):
  config = stream_config(load_config("configs/tiny.py"), str(tmp_path))
  report = verify.verify(config, 10)
  assert report["mode"] == "stream"
  assert report["windows_per_epoch"] is None and report["epochs"] is None
  lines = verify.format_report(report)
  assert any(line.startswith("epochs the run will see: unknown")
             for line in lines), lines
  assert report["status"] == 0, report


def test_zero_batches_names_the_flag(tiny_config):
  with pytest.raises(ValueError, match="--batches=0"):
    verify.verify(tiny_config, 0)


