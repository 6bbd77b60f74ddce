"""`python -m bitnet_jax.data.verify` on configs/tiny.py's embedded corpus (the
session's prepared `data_dir`). (Small corpora: tests/unit/test_verify.py.)"""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest

from bitnet_jax import data
from bitnet_jax.data import verify

from drivers import load_config
from unit.test_verify import (
  BATCHES,
  draw,
  file_windows,
  within_epoch_duplicates,
)


@pytest.fixture(scope="module")
def tiny(data_dir):
  """configs/tiny.py: (config, prepared, report of verify, drawn windows)."""
  config = load_config("configs/tiny.py")
  config.data.data_dir = data_dir
  prepared = data.prepare(config)
  report = verify.verify(config, BATCHES)
  return config, prepared, report, draw(prepared, config, BATCHES)


@pytest.fixture(scope="module")
def tiny_file_counts(tiny):
  """{window bytes: how many windows of the tiny train file equal it}."""
  config, prepared, _, _ = tiny
  windows = file_windows(prepared.train_tokens, prepared.dtype,
                         config.train.seq_len)
  return collections.Counter(row.tobytes() for row in windows)


def test_tiny_config_draws_no_window_more_often_than_the_corpus_holds(
    tiny, tiny_file_counts):
  config, _, report, rows = tiny
  over = {row: n for row, n in collections.Counter(rows).items()
          if n > tiny_file_counts[row]}
  assert not over, f"the train iterator repeats {len(over)} windows"
  assert report["beyond_corpus_within_epoch"] == 0, report
  assert report["status"] == 0, f"tiny config fails: {report['failures']}"
  assert report["windows_drawn"] == BATCHES * config.train.batch_size



def test_tiny_duplicates_are_the_corpus_copies_counted_independently(
    tiny, tiny_file_counts):
  config, prepared, report, rows = tiny
  n_windows = (os.path.getsize(prepared.train_tokens)
               // np.dtype(prepared.dtype).itemsize - 1) // config.train.seq_len
  twins = within_epoch_duplicates(rows, n_windows)
  expected = sum(n - 1 for _, n in twins)
  assert report["duplicates_within_epoch"] == expected, (
      f"verifier counts {report['duplicates_within_epoch']} within-epoch "
      f"duplicates, a recount of the same batches {expected}")
  assert report["corpus_copies_within_epoch"] == expected, (
      "duplicates the token file itself holds are not all recognized: "
      f"{report}")
  assert all(tiny_file_counts[row] >= n for row, n in twins)



def test_tiny_train_windows_are_not_eval_windows(tiny):
  config, prepared, report, rows = tiny
  t = config.train
  eval_windows = file_windows(prepared.eval_tokens, prepared.dtype,
                              t.seq_len)[:t.eval_batches * t.batch_size]
  shared = set(rows) & {row.tobytes() for row in eval_windows}
  assert report["eval_windows"] == len(eval_windows)
  assert report["train_eval_shared"] == len(shared) == 0, (
      f"train and eval share {len(shared)} windows; verifier says "
      f"{report['train_eval_shared']}")



def test_epochs_is_steps_times_batch_over_the_file_windows(tiny):
  config, prepared, report, _ = tiny
  t = config.train
  n_tokens = (os.path.getsize(prepared.train_tokens)
              // np.dtype(prepared.dtype).itemsize)
  n_windows = (n_tokens - 1) // t.seq_len
  assert report["windows_per_epoch"] == n_windows
  assert report["epochs"] == pytest.approx(t.steps * t.batch_size
                                           / n_windows), report



def test_eval_windows_in_the_train_file_are_counted(tiny, tiny_file_counts):
  config, prepared, report, _ = tiny
  t = config.train
  eval_windows = file_windows(prepared.eval_tokens, prepared.dtype,
                              t.seq_len)[:t.eval_batches * t.batch_size]
  expected = sum(tiny_file_counts[row.tobytes()] > 0 for row in eval_windows)
  assert report["eval_windows_looked_up"] == len(eval_windows)
  assert report["eval_windows_in_train_file"] == expected, (
      f"verifier finds {report['eval_windows_in_train_file']} eval windows "
      f"in the train file, a recount {expected}")



def test_tiny_config_exits_0(tiny, capsys):
  config = tiny[0]
  status = verify.run(config, 20)
  out = capsys.readouterr().out
  assert status == 0, out
  assert "FAILED" not in out and "epochs > 1" not in out, out
  assert "epochs the run will see: " in out, out



def test_repeated_batches_within_an_epoch_exit_1(tiny, tiny_file_counts,
                                                 monkeypatch, capsys):
  config, prepared = tiny[0], tiny[1]
  real = data.train_iterator

  def each_batch_twice(*args):
    it = real(*args)
    def batches():
      for batch in it:
        yield batch
        yield batch
    return batches()

  batches = 20
  rows = draw(prepared, config, batches, each_batch_twice(prepared, config))
  beyond = sum(max(0, n - max(1, tiny_file_counts[row]))
               for row, n in collections.Counter(rows).items())
  monkeypatch.setattr(data, "train_iterator", each_batch_twice)
  status = verify.run(config, batches)
  out = capsys.readouterr().out
  assert status == 1, f"a pipeline drawing each batch twice passes:\n{out}"
  assert beyond > 0
  assert f"beyond the corpus's copies: {beyond};" in out, out
  assert "FAILED" in out, out



def test_more_than_one_epoch_prints_a_warning(tiny, capsys):
  config = tiny[0].copy_and_resolve_references()
  n_windows = tiny[2]["windows_per_epoch"]
  config.train.steps = 3 * n_windows // config.train.batch_size
  assert verify.run(config, 2) == 0
  out = capsys.readouterr().out
  warnings = [line for line in out.splitlines()
              if line.startswith("WARNING") and "epochs > 1" in line]
  assert warnings, f"no epochs warning for 3 epochs:\n{out}"
  assert "3.00 times" in warnings[0], warnings

