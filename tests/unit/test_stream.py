"""Streaming file corpora: sources, epochs, processes, resume, bad input
(training on them, grain workers: tests/integration/test_stream_training.py)."""

import json
import logging
import os
import re

import jax
import numpy as np
import pytest

from bitnet_jax import data
from bitnet_jax.config import ConfigError
from bitnet_jax.data import corpus, pipeline, sources, stream
from bitnet_jax.data import stdlib as stdlib_corpus

from drivers import corpus_documents, stream_config, write_corpus

N_DOCS, N_FILES = 48, 6


def _stream_config(tiny_config, tmp_path, scheme="jsonl", n_files=N_FILES,
                   n_docs=N_DOCS, **data_fields):
  return stream_config(tiny_config, str(tmp_path), scheme, n_files, n_docs,
                       **data_fields)


def _doc_id(text: str) -> int:
  return int(re.match(r"# doc (\d+)\n", text).group(1))


def _documents_by_epoch(config, process_index=0, process_count=1,
                        count=3 * N_DOCS) -> dict[int, list[int]]:
  split, _ = corpus.open_splits(config, config.data.data_dir)
  it = iter(stream.shuffled_documents(split, config, process_index,
                                      process_count))
  epochs = {}
  for _ in range(count):
    document = next(it)
    epochs.setdefault(document["epoch"], []).append(_doc_id(document["text"]))
  return epochs


@pytest.mark.parametrize("scheme", ["jsonl", "jsonl.zst", "parquet",
                                    "arrayrecord"])
def test_an_epoch_serves_every_document_exactly_once(tiny_config, tmp_path,
                                                     scheme):
  config = _stream_config(tiny_config, tmp_path, scheme)
  epochs = _documents_by_epoch(config)
  for epoch in (0, 1):
    assert sorted(epochs[epoch]) == list(range(N_DOCS)), (
        f"epoch {epoch} is not every document once: "
        f"{len(epochs[epoch])} served, {len(set(epochs[epoch]))} distinct")
  assert epochs[0] != epochs[1], "epoch 2 repeats epoch 1's order"


def test_two_processes_read_disjoint_files_that_cover_the_corpus(
    tiny_config, tmp_path):
  config = _stream_config(tiny_config, tmp_path)
  parts = [_documents_by_epoch(config, p, 2, count=3 * N_DOCS // 2)
           for p in (0, 1)]
  for epoch in (0, 1):
    first, second = (set(part[epoch]) for part in parts)
    assert not first & second, (
        f"epoch {epoch}: both processes read {first & second}")
    assert first | second == set(range(N_DOCS)), (
        f"epoch {epoch}: {set(range(N_DOCS)) - first - second} never read")
  files = [sources.epoch_files(list("abcdef"), 0, 0, p, 2) for p in (0, 1)]
  assert len(files[0]) == len(files[1]) == 3, files


def test_stream_windows_are_packed_documents_ending_in_end_of_text(
    tiny_config, tmp_path):
  config = _stream_config(tiny_config, tmp_path, packing="document")
  prepared = data.prepare(config)
  it = data.train_iterator(prepared, config)
  batches = [next(it) for _ in range(12)]  # ~3k tokens, several documents
  batch = jax.tree.map(lambda *rows: np.concatenate(rows), *batches)
  tokens = batch.tokens
  assert tokens.shape == (96, 33) and tokens.dtype == np.int32
  text = prepared.tokenizer.decode(tokens.reshape(-1).tolist(),
                                   skip_special_tokens=False)
  assert "<|endoftext|># doc " in text, "documents are not EOT-separated"
  starts = batch.positions == 0
  assert (starts[:, 0]).all(), "a window must start a segment at position 0"
  after_eot = np.zeros_like(starts)
  after_eot[:, 1:] = tokens[:, :-1] == prepared.eot_id
  np.testing.assert_array_equal(starts[:, 1:], after_eot[:, 1:],
                                "positions must restart exactly after EOT")


def test_eval_windows_are_fixed_and_not_in_the_train_files(
    tiny_config, tmp_path):
  config = _stream_config(tiny_config, tmp_path)
  prepared = data.prepare(config)
  first = data.eval_batches(prepared, config)
  second = data.eval_batches(prepared, config)
  assert len(first) == config.train.eval_batches
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a.tokens, b.tokens,
                                  "eval windows differ between calls")
  text = prepared.tokenizer.decode(first[0].tokens.reshape(-1).tolist(),
                                   skip_special_tokens=False)
  ids = {int(k) for k in re.findall(r"# doc (\d+)\n", text)}
  assert ids and min(ids) >= N_DOCS, f"eval windows hold train docs {ids}"


def test_files_are_held_out_by_path_hash_without_an_eval_dataset(
    tiny_config, tmp_path):
  write_corpus(str(tmp_path / "c"), "jsonl", corpus_documents(40), 40)
  tiny_config.data.dataset = f"jsonl:{tmp_path}/c/*.jsonl"
  tiny_config.data.eval_fraction = 0.25
  train_split, eval_split = corpus.open_splits(tiny_config, str(tmp_path))
  assert not set(train_split.files) & set(eval_split.files)
  assert len(train_split.files) + len(eval_split.files) == 40
  for path in eval_split.files:
    assert stdlib_corpus.is_eval_path(os.path.basename(path), 0.25), path


# --- bad input -------------------------------------------------------------


def _read_all(scheme, path, feature="text"):
  return list(sources.FileDocuments(scheme, str(path), feature))


def test_a_glob_matching_nothing_names_the_key(tiny_config, tmp_path):
  tiny_config.data.dataset = f"parquet:{tmp_path}/none/*.parquet"
  with pytest.raises(ConfigError, match=r"config\.data\.dataset=.*matches no"):
    corpus.open_splits(tiny_config, str(tmp_path))


@pytest.mark.parametrize("scheme", ["parquet", "jsonl", "arrayrecord"])
def test_a_file_without_the_text_field_names_file_and_key(tmp_path, scheme):
  path, = write_corpus(str(tmp_path), scheme, ["a", "b"], 1,
                       text_feature="content")
  have = r"\['content'\]" if scheme == "arrayrecord" else r"'content'"
  with pytest.raises(ConfigError, match=rf"data\.text_feature='text'.*"
                     rf"{re.escape(path)}.*{have}"):
    _read_all(scheme, path)


@pytest.mark.parametrize("scheme", ["parquet", "jsonl.gz", "arrayrecord",
                                    "jsonl"])
def test_a_corrupt_file_is_an_error_naming_it(tmp_path, scheme):
  path, = write_corpus(str(tmp_path), scheme, ["a" * 100] * 20, 1)
  with open(path, "rb") as f:
    content = f.read()
  with open(path, "wb") as f:  # truncated and overwritten in the middle
    f.write(content[:len(content) // 2] + b"\x00garbage{" * 8)
  with pytest.raises(ConfigError, match=re.escape(path)):
    _read_all(scheme.split(".")[0], path)


def test_an_empty_file_is_skipped_with_a_warning(tmp_path, caplog):
  path = tmp_path / "empty.parquet"
  path.write_bytes(b"")
  with caplog.at_level(logging.WARNING):
    assert _read_all("parquet", path) == []
  assert f"skipping the empty file {path}" in caplog.text


def test_a_non_utf8_document_is_skipped_with_a_warning(tmp_path, caplog):
  path = tmp_path / "mixed.jsonl"
  path.write_bytes(b'{"text": "first"}\n{"text": "bad \xff\xfe"}\n'
                   b'{"text": "third"}\n')
  with caplog.at_level(logging.WARNING):
    assert _read_all("jsonl", path) == ["first", "third"]
  assert re.search(rf"skipping record 1 of {path}: it is not UTF-8",
                   caplog.text), caplog.text


def test_blank_lines_and_multi_frame_zstd_lose_no_document(tmp_path):
  import zstandard  # pylint: disable=g-import-not-at-top
  frames = [zstandard.ZstdCompressor().compress(
      (json.dumps({"text": f"frame {i}"}) + "\n\n").encode()) for i in range(3)]
  path = tmp_path / "frames.jsonl.zst"
  path.write_bytes(b"".join(frames))  # as `cat a.zst b.zst c.zst` makes
  assert _read_all("jsonl", path) == ["frame 0", "frame 1", "frame 2"]


def test_a_url_glob_streams_through_fsspec(tiny_config):
  import fsspec  # pylint: disable=g-import-not-at-top
  fs = fsspec.filesystem("memory")
  for i in range(3):
    with fs.open(f"/corpus/part-{i}.jsonl", "w") as f:
      f.write(json.dumps({"text": f"remote {i}"}) + "\n")
  paths = sources.expand("jsonl", "memory://corpus/*.jsonl", "data.dataset")
  assert list(paths) == [f"memory:///corpus/part-{i}.jsonl"
                         for i in range(3)], paths
  assert [_read_all("jsonl", p) for p in paths] == [
      [f"remote {i}"] for i in range(3)]


def test_prepared_mode_caches_a_file_corpus_and_auto_streams_it(
    tiny_config, tmp_path):
  config = _stream_config(tiny_config, tmp_path, n_docs=16)
  assert pipeline.data_mode(config) == "stream", "auto must stream jsonl:"
  config.data.mode = "prepared"
  prepared = data.prepare(config)
  assert prepared.mode == "prepared" and os.path.exists(
      prepared.train_tokens), "no token cache in prepared mode"
  tokens = np.fromfile(prepared.train_tokens, dtype=prepared.dtype)
  text = prepared.tokenizer.decode(tokens.tolist(), skip_special_tokens=False)
  ids = sorted(int(k) for k in re.findall(r"# doc (\d+)\n", text))
  assert ids == list(range(16)), f"the cache holds documents {ids}"
  assert next(data.train_iterator(prepared, config)).tokens.shape == (
      8, 33)


def test_fewer_files_than_processes_or_workers_is_a_clear_error(
    tiny_config, tmp_path):
  config = _stream_config(tiny_config, tmp_path, n_files=2)
  prepared = data.prepare(config)
  config.train.batch_size = 9  # divisible by 3 processes
  with pytest.raises(ConfigError, match=r"2 files but 3 processes"):
    data.train_iterator(prepared, config, process_index=0, process_count=3)
  config.train.batch_size, config.data.worker_count = 8, 3
  with pytest.raises(ConfigError, match=r"data\.worker_count=3.*<=2"):
    data.train_iterator(prepared, config)


def test_config_refuses_streaming_a_random_access_dataset(tiny_config):
  from bitnet_jax.config import validate  # pylint: disable=g-import-not-at-top
  tiny_config.data.mode = "stream"
  with pytest.raises(ConfigError, match=r"config\.data\.mode='stream'"):
    validate(tiny_config)
  tiny_config.data.mode = "auto"
  tiny_config.data.dataset = "parquet:/x/*.parquet"
  tiny_config.data.eval_dataset = "jsonl:/y/*.jsonl"
  with pytest.raises(ConfigError, match=r"config\.data\.eval_dataset"):
    validate(tiny_config)
