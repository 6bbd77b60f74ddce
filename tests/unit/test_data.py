"""Tests of the data layer: corpora, tokenizer, token caches, grain pipeline
(without TensorFlow, in fresh processes:
tests/integration/test_data_without_tensorflow.py)."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import random
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from absl import flags

from bitnet_jax import data
from bitnet_jax.config import ConfigError
from bitnet_jax.data import corpus, tokenizer
from bitnet_jax.storage import files

from drivers import REPO


def tiny_config(data_dir: str, **data_overrides):
  """configs/tiny.py (vocab 512, batch 8, seq_len 32) reading `data_dir`."""
  spec = importlib.util.spec_from_file_location(
      "tiny_config", os.path.join(REPO, "configs", "tiny.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.data_dir = data_dir
  for key, value in data_overrides.items():
    config.data[key] = value
  return config


def write_text_files(directory: str, n_files: int, words: int) -> None:
  """Writes distinct random-word documents doc00.txt, doc01.txt, ..."""
  rng = random.Random(0)
  vocabulary = [f"w{i}x{rng.randrange(10**6)}" for i in range(400)]
  os.makedirs(directory, exist_ok=True)
  for i in range(n_files):
    text = " ".join(rng.choice(vocabulary) for _ in range(words))
    with open(os.path.join(directory, f"doc{i:02d}.txt"), "w") as f:
      f.write(text)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """(config, prepared) of a `files:` corpus: 41 windows, ~10 batches."""
  root = str(tmp_path_factory.mktemp("small"))
  write_text_files(os.path.join(root, "corpus"), n_files=12, words=16)
  config = tiny_config(root, dataset=f"files:{root}/corpus/**/*.txt",
                       eval_fraction=0.3)
  config.train.batch_size, config.train.seq_len = 4, 16
  return config, data.prepare(config)


def train_windows(prepared, config) -> list[bytes]:
  """All train windows, in file order, as bytes (hashable)."""
  windows = data.TokenWindows(prepared.train_tokens, prepared.train_n_tokens,
                              prepared.dtype, config.train.seq_len)
  return [windows[i].tobytes() for i in range(len(windows))]


def draw_rows(prepared, config, n_rows: int, **kwargs) -> list[bytes]:
  """The first `n_rows` windows the train iterator yields, as bytes."""
  it = data.train_iterator(prepared, config, **kwargs)
  rows = []
  while len(rows) < n_rows:
    rows.extend(row.tobytes() for row in next(it).tokens)
  return rows[:n_rows]


def test_token_file_is_documents_joined_by_end_of_text(small):
  config, prepared = small
  train, _ = corpus.open_splits(config, config.data.data_dir)
  texts = [t for chunk in train.texts() for t in chunk]
  tokens = np.fromfile(prepared.train_tokens, dtype=prepared.dtype)
  decoded = prepared.tokenizer.decode(tokens.tolist(),
                                      skip_special_tokens=False)
  assert decoded == tokenizer.EOT_TOKEN.join(texts), (
      "the train token file does not decode to the documents joined by "
      "<|endoftext|>")
  assert (tokens == prepared.eot_id).sum() == len(texts) - 1, (
      "expected one separator between consecutive documents")


def test_iterator_runs_for_three_epochs(small):
  config, prepared = small
  n_windows = len(train_windows(prepared, config))
  n_batches = 3 * n_windows // config.train.batch_size + 1
  assert n_batches < 40, f"the small corpus is not small: {n_windows} windows"
  assert n_windows % 4, "an epoch should end inside a batch"
  it = data.train_iterator(prepared, config)
  for step in range(n_batches):
    batch = next(it).tokens
    assert batch.shape == (4, 17) and batch.dtype == np.int32, (
        f"batch {step} has shape {batch.shape} dtype {batch.dtype}, expected "
        f"(4, 17) int32")


def test_no_window_repeats_within_an_epoch(small):
  config, prepared = small
  windows = train_windows(prepared, config)
  assert len(set(windows)) == len(windows), "test corpus has equal windows"
  epoch = draw_rows(prepared, config, len(windows))
  assert sorted(epoch) == sorted(windows), (
      "the first epoch is not a permutation of the train windows: "
      f"{len(epoch) - len(set(epoch))} repeats")


def test_epochs_have_different_orders(small):
  config, prepared = small
  n = len(train_windows(prepared, config))
  rows = draw_rows(prepared, config, 2 * n)
  assert sorted(rows[:n]) == sorted(rows[n:]), "epoch 2 is not a permutation"
  assert rows[:n] != rows[n:], "epoch 2 repeats epoch 1's order"


def test_state_restores_exact_next_batch(small):
  config, prepared = small
  epoch_batches = len(train_windows(prepared, config)) // 4
  it = data.train_iterator(prepared, config)
  for _ in range(epoch_batches + 2):  # past the first epoch boundary
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  restored = data.train_iterator(prepared, config)
  restored.set_state(state)
  for i, want in enumerate(expected):
    np.testing.assert_array_equal(
        next(restored).tokens, want.tokens,
        err_msg=f"batch {i} after restore differs")


def test_processes_split_each_global_batch(small):
  config, prepared = small
  whole = next(data.train_iterator(prepared, config)).tokens
  halves = [next(data.train_iterator(prepared, config, process_index=p,
                                     process_count=2)).tokens
            for p in (0, 1)]
  assert halves[0].shape == (2, 17), f"local batch shape {halves[0].shape}"
  np.testing.assert_array_equal(
      np.stack(halves, axis=1).reshape(4, 17), whole,
      err_msg="process shards do not interleave into the global batch")


def test_worker_processes_give_the_same_batches(small):
  config, prepared = small
  flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
  expected = draw_rows(prepared, config, 12)
  config = config.copy_and_resolve_references()
  config.data.worker_count = 1
  assert draw_rows(prepared, config, 12) == expected, (
      "mp_prefetch workers yield different batches than threads")


def test_windows_pickle_by_path(small):
  config, prepared = small
  windows = data.TokenWindows(prepared.train_tokens, prepared.train_n_tokens,
                              prepared.dtype, config.train.seq_len)
  first = windows[0]
  clone = pickle.loads(pickle.dumps(windows))
  assert clone._tokens is None, "the memmap was pickled with the source"
  np.testing.assert_array_equal(clone[0], first, "unpickled source differs")


def test_batch_size_must_divide_by_process_count(small):
  config, prepared = small
  with pytest.raises(ConfigError, match="train.batch_size"):
    data.train_iterator(prepared, config, process_index=0, process_count=3)


def test_truncated_cache_is_rebuilt(tmp_path):
  write_text_files(str(tmp_path / "texts"), n_files=8, words=40)
  config = tiny_config(str(tmp_path), dataset=f"files:{tmp_path}/texts/*.txt",
                       eval_fraction=0.3)
  prepared = data.prepare(config)
  tokens = np.fromfile(prepared.train_tokens, dtype=prepared.dtype)
  with open(prepared.train_tokens, "r+b") as f:
    f.truncate(tokens.nbytes // 2)
  again = data.prepare(config)
  np.testing.assert_array_equal(
      np.fromfile(again.train_tokens, dtype=again.dtype), tokens,
      "a truncated token cache was not rebuilt to the same tokens")
  meta = os.path.join(os.path.dirname(again.train_tokens), "meta.json")
  with open(meta) as f:
    assert json.load(f)["n_tokens"] == tokens.size, "metadata is stale"


def test_missing_tokenizer_path_raises(tmp_path):
  config = tiny_config(str(tmp_path), tokenizer_path=str(tmp_path / "no.json"))
  with pytest.raises(ConfigError, match="data.tokenizer_path"):
    tokenizer.get_tokenizer(config, str(tmp_path), None)


@pytest.mark.parametrize("name", ["mnist", "no_such_dataset_anywhere"])
def test_missing_tfds_dataset_message_needs_no_tensorflow_cli(tmp_path, name):
  config = tiny_config(str(tmp_path), dataset=f"tfds:{name}")
  with pytest.raises(ConfigError) as error:
    data.prepare(config)
  message = str(error.value)
  assert "tfds build" not in message, f"needs TensorFlow: {message}"
  assert "extra packages" in message and name in message, message


def test_files_glob_matching_nothing_raises(tmp_path):
  config = tiny_config(str(tmp_path), dataset=f"files:{tmp_path}/none/*.txt")
  with pytest.raises(ConfigError, match="data.dataset"):
    data.prepare(config)


def test_empty_corpus_files_are_skipped_with_one_warning(tmp_path, caplog):
  for i in range(40):
    (tmp_path / f"doc{i}.txt").write_text(f"text {i}\n")
  for i in range(3):
    (tmp_path / f"empty{i}.txt").write_text("")
  with caplog.at_level("WARNING"):
    train, held_out = corpus.files_splits(f"{tmp_path}/*.txt", 0.2)
  assert train.size + held_out.size == 40, (
      f"{train.size} + {held_out.size} documents: empty files were counted")
  warnings = [r.getMessage() for r in caplog.records if "empty" in
              r.getMessage()]
  assert len(warnings) == 1 and "skipping 3 empty files of 43" in (
      warnings[0]), warnings


def test_the_empty_split_advice_fits_a_files_corpus(tmp_path):
  (tmp_path / "only.txt").write_text("one file\n")
  with pytest.raises(ConfigError, match="data.eval_fraction") as error:
    corpus.files_splits(f"{tmp_path}/*.txt", 0.2)
  assert "eval_dataset" not in str(error.value), (
      f"advises data.eval_dataset, which files: corpora refuse: {error.value}")


def dead_pid() -> int:
  """The pid of a process that has exited and been reaped."""
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  with pytest.raises(ProcessLookupError):  # the pid was not reused yet
    os.kill(process.pid, 0)
  return process.pid


def touch(path: str, age_seconds: float = 0.0) -> str:
  """Creates `path` (and its directory) with an mtime `age_seconds` ago."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(b"partial tokens")
  stamp = time.time() - age_seconds
  os.utime(path, (stamp, stamp))
  return path


def test_only_a_dead_writers_temporary_file_is_removed(tmp_path):
  host = socket.gethostname()
  base = str(tmp_path / "tokens" / "abc" / "tokens.bin")
  dead = touch(f"{base}.tmp.{host}.{dead_pid()}")
  live = touch(f"{base}.tmp.{host}.{os.getpid()}")
  removed = files.remove_stale_temporaries(str(tmp_path))
  assert removed == [dead], f"removed {removed}, expected only {dead}"
  assert not os.path.exists(dead), "the dead writer's file is still there"
  assert os.path.exists(live), "a live process's temporary file was removed"


def test_another_hosts_temporary_file_is_removed_after_a_day(tmp_path):
  base = str(tmp_path / "tokenizers" / "bpe512.json")
  old = touch(f"{base}.tmp.node-7.cluster.local.4242", age_seconds=25 * 3600)
  fresh = touch(f"{base}.tmp.node-8.cluster.local.4242", age_seconds=3600)
  removed = files.remove_stale_temporaries(str(tmp_path))
  assert removed == [old], f"removed {removed}, expected only the 25 h one"
  assert os.path.exists(fresh), "another host's recent file was removed"


def test_prepare_removes_stale_temporaries_under_the_data_root(small):
  config, _ = small
  stale = touch(os.path.join(config.data.data_dir, "tokens", "killed",
                             f"tokens.bin.tmp.{socket.gethostname()}."
                             f"{dead_pid()}"))
  data.prepare(config)
  assert not os.path.exists(stale), "prepare left a killed writer's file"
