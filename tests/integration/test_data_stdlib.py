"""The data pipeline on configs/tiny.py's embedded stdlib corpus (the session's
prepared `data_dir`): shifted windows, fixed eval batches, split files,
caches that are not rebuilt, the TFDS source. (The same on small corpora the
tests write: tests/unit/test_data.py.)"""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bitnet_jax import data
from bitnet_jax.config import ConfigError
from bitnet_jax.data import corpus, tokenizer
from bitnet_jax.data import stdlib as stdlib_corpus

from unit.test_data import tiny_config


@pytest.fixture(scope="module")
def stdlib(data_dir):
  """(config, prepared) of the embedded stdlib corpus, tiny config."""
  config = tiny_config(data_dir)
  return config, data.prepare(config)


def test_windows_are_shifted_by_seq_len(stdlib):
  config, prepared = stdlib
  seq_len = config.train.seq_len
  for path, n_tokens in ((prepared.train_tokens, prepared.train_n_tokens),
                         (prepared.eval_tokens, prepared.eval_n_tokens)):
    flat = np.fromfile(path, dtype=prepared.dtype)
    assert flat.size == n_tokens, f"{path}: {flat.size} != {n_tokens} tokens"
    windows = data.TokenWindows(path, n_tokens, prepared.dtype, seq_len)
    assert len(windows) == (n_tokens - 1) // seq_len, "wrong window count"
    for i in (0, 1, 2, len(windows) // 2, len(windows) - 1):
      np.testing.assert_array_equal(
          windows[i], flat[i * seq_len:i * seq_len + seq_len + 1],
          err_msg=f"window {i} is not tokens[{i}*seq_len : +seq_len+1]")
    with pytest.raises(IndexError):
      windows[len(windows)]
  held_out = np.stack([b.tokens for b in data.eval_batches(prepared,
                                                                config)])
  assert held_out.shape == (2, 8, 33) and held_out.dtype == np.int32, (
      f"eval batches {held_out.shape} {held_out.dtype}, want (2, 8, 33) int32")
  flat = np.fromfile(prepared.eval_tokens, dtype=prepared.dtype)
  for i, row in enumerate(held_out.reshape(16, 33)):
    np.testing.assert_array_equal(
        row, flat[i * 32:i * 32 + 33], err_msg=f"eval window {i} misplaced")



def test_eval_batches_are_fixed_and_split_by_process(stdlib):
  config, prepared = stdlib
  def tokens(*args):
    return np.stack([b.tokens for b in data.eval_batches(prepared, config,
                                                            *args)])
  whole = tokens()
  np.testing.assert_array_equal(tokens(), whole,
                                "eval batches differ between calls")
  parts = [tokens(p, 2) for p in (0, 1)]
  np.testing.assert_array_equal(
      np.stack(parts, axis=2).reshape(whole.shape), whole,
      "process slices do not interleave into the global eval batches")



def test_too_few_eval_windows_names_the_maximum(stdlib):
  config, prepared = stdlib
  config = config.copy_and_resolve_references()
  config.train.eval_batches = 10**6
  n_windows = (prepared.eval_n_tokens - 1) // config.train.seq_len
  with pytest.raises(ConfigError, match=rf"eval_batches<={n_windows // 8}"):
    data.eval_batches(prepared, config)



def test_train_and_validation_share_no_file(stdlib, tmp_path):
  config, _ = stdlib
  name = stdlib_corpus.stdlib_config(config.data.eval_fraction).name
  tfds_dir = os.path.join(config.data.data_dir, "tfds")

  def paths(directory):
    sides = []
    for split in ("train", "validation"):
      source = tfds.data_source(f"python_stdlib/{name}", split=split,
                                data_dir=directory, download=False)
      sides.append({ex["path"].decode() for ex in source})
    return sides

  train, validation = paths(tfds_dir)
  assert not train & validation, f"in both splits: {sorted(train & validation)}"
  assert train | validation == set(stdlib_corpus.stdlib_files(
      stdlib_corpus.stdlib_root())), "files lost from the corpus"
  assert 0 < len(validation) < 0.15 * len(train), (
      f"{len(validation)} held out vs {len(train)}: eval_fraction ignored")
  stdlib_corpus.prepare_stdlib(str(tmp_path), config.data.eval_fraction)
  assert paths(str(tmp_path)) == [train, validation], (
      "a rebuilt corpus puts some files on the other side")



def test_second_prepare_does_not_retokenize(stdlib, monkeypatch):
  config, prepared = stdlib
  files = [prepared.train_tokens, prepared.eval_tokens, prepared.tokenizer_path]
  mtimes = [os.stat(f).st_mtime_ns for f in files]

  def fail(*args, **kwargs):
    raise AssertionError("prepare tokenized or trained again")

  monkeypatch.setattr(tokenizer, "encode_documents", fail)
  monkeypatch.setattr(tokenizer, "train_bpe", fail)
  again = data.prepare(config)
  assert (dataclasses.replace(again, tokenizer=None) ==
          dataclasses.replace(prepared, tokenizer=None)), "caches changed"
  assert [os.stat(f).st_mtime_ns for f in files] == mtimes, "files rewritten"
  assert again.tokenizer.to_str() == prepared.tokenizer.to_str(), (
      "a different tokenizer was loaded")



def test_tokenizer_larger_than_model_raises(stdlib):
  config, prepared = stdlib
  config = tiny_config(config.data.data_dir,
                       tokenizer_path=prepared.tokenizer_path)
  config.model.vocab_size = 300
  with pytest.raises(ConfigError, match="model.vocab_size"):
    data.prepare(config)



def test_tfds_source_reads_prepared_dataset_by_name(stdlib):
  config, _ = stdlib
  name = stdlib_corpus.stdlib_config(config.data.eval_fraction).name
  config = tiny_config(config.data.data_dir, dataset=f"tfds:python_stdlib/"
                       f"{name}", train_split="train", eval_split="validation")
  root = config.data.data_dir
  train, _ = corpus.open_splits(config, root)
  texts = {hashlib.sha256(t.encode()).hexdigest()
           for chunk in train.texts() for t in chunk}
  stdlib_root = stdlib_corpus.stdlib_root()
  expected = set()
  for path in stdlib_corpus.stdlib_files(stdlib_root):
    if not stdlib_corpus.is_eval_path(path, config.data.eval_fraction):
      with open(os.path.join(stdlib_root, path), "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
      expected.add(hashlib.sha256(text.encode()).hexdigest())
  assert texts == expected, "tfds: train split differs from the stdlib files"
  config.data.train_split = "train[:10]"
  assert len(corpus.open_splits(config, root)[0]) == 10, "slice ignored"

