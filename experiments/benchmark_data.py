r"""Measures the streaming data pipeline: tokens/s for 0, 1, 2 grain workers.

  python experiments/benchmark_data.py --config=configs/tiny.py \
      --corpus_dir=/tmp/bench_corpus --corpus_mb=100 --workers=0,1,2

Builds (once) a parquet corpus of at least --corpus_mb MB of UTF-8 text: the
standard library's `.py` files, repeated with a "# copy N" first line, in 16
shards (columns `id`, `text`; row groups of 1000 rows), with a manifest.json
written last. Then streams it through `bitnet_jax.data.train_iterator`
(`data.mode="stream"`: read, shuffle, tokenize, pack, batch) and reports, per
`data.worker_count`, the seconds from building the iterator to the first
batch and the tokens/s of the next --batches batches (batch_size x
(seq_len + 1) tokens each). Training or loading the BPE (`data.prepare`) is
timed once, apart. Prints a Markdown table for experiments/RESULTS.md, the
command line, and how many cores one worker's rate implies for one H100.
"""

import json
import math
import os
import shlex
import shutil
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
from absl import app, flags
from ml_collections import config_flags

from bitnet_jax import config as config_lib
from bitnet_jax import data
from bitnet_jax.data import stdlib as stdlib_corpus
from bitnet_jax.storage import files

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py",
                                          "Config whose data settings to use.")
_CORPUS_DIR = flags.DEFINE_string("corpus_dir", "/tmp/bench_corpus",
                                  "Parquet corpus directory (built if absent).")
_CORPUS_MB = flags.DEFINE_integer("corpus_mb", 100,
                                  "MB (10**6 bytes) of text in the corpus.")
_DATA_DIR = flags.DEFINE_string("data_dir", "/tmp/bench_data",
                                "config.data.data_dir (tokenizer cache).")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"],
                             "data.worker_count values to measure.")
_BATCHES = flags.DEFINE_integer("batches", 200,
                                "Timed batches after the first, per row.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "train.batch_size.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 1024, "train.seq_len.")
_TARGET = flags.DEFINE_integer(
    "target_tokens_per_s", 100_000,
    "Tokens/s one H100 trains on the 700M config (for the core estimate).")

_PREPARED = flags.DEFINE_bool(
    "compare_prepared", True,
    "Also time data.mode='prepared' (tokenizing the corpus into a fresh "
    "token cache before the first batch).")

_SHARDS = 16  # parquet files
_ROW_GROUP = 1000  # rows per row group
_MANIFEST = "manifest.json"


def _shard_path(directory: str, index: int) -> str:
  return os.path.join(directory, f"part-{index:05d}.parquet")


def build_corpus(directory: str, corpus_mb: int) -> dict:
  """Writes the parquet shards unless the manifest says they exist."""
  manifest_path = os.path.join(directory, _MANIFEST)
  if os.path.exists(manifest_path):
    with open(manifest_path) as f:
      manifest = json.load(f)
    shards = [_shard_path(directory, i) for i in range(manifest["shards"])]
    if (manifest.get("corpus_mb") == corpus_mb
        and all(os.path.exists(p) for p in shards)):
      return {**manifest, "built_seconds": None}
  os.makedirs(directory, exist_ok=True)
  if os.path.exists(manifest_path):
    os.remove(manifest_path)  # the shards are about to change
  start = time.perf_counter()
  root = stdlib_corpus.stdlib_root()
  sources = stdlib_corpus.stdlib_files(root)  # skips site-packages
  schema = pa.schema([("id", pa.string()), ("text", pa.string())])
  paths = [_shard_path(directory, i) for i in range(_SHARDS)]
  tmps = [files.temporary_path(p) for p in paths]
  writers = [pq.ParquetWriter(t, schema) for t in tmps]
  buffers = [([], []) for _ in range(_SHARDS)]

  def flush(shard: int) -> None:
    ids, texts = buffers[shard]
    if ids:
      writers[shard].write_table(pa.table({"id": ids, "text": texts}, schema))
      buffers[shard] = ([], [])

  target, total, rows, copy = corpus_mb * 10**6, 0, 0, 0
  while total < target:
    for relative in sources:
      with open(os.path.join(root, relative), encoding="utf-8",
                errors="replace") as f:
        text = f"# copy {copy}\n{f.read()}"
      shard = rows % _SHARDS
      buffers[shard][0].append(f"{copy}/{relative}")
      buffers[shard][1].append(text)
      if len(buffers[shard][0]) >= _ROW_GROUP:
        flush(shard)
      total += len(text.encode("utf-8"))
      rows += 1
      if total >= target:
        break
    copy += 1
  for shard in range(_SHARDS):
    flush(shard)
    writers[shard].close()
    os.replace(tmps[shard], paths[shard])
  manifest = {"corpus_mb": corpus_mb, "shards": _SHARDS, "rows": rows,
              "text_bytes": total, "copies": copy, "source": root}
  files.write_atomically(manifest_path,
                         json.dumps(manifest, indent=1).encode())
  return {**manifest, "built_seconds": time.perf_counter() - start}


def measure(prepared, config, workers: int, batches: int) -> dict:
  """Time to the first batch and tokens/s of the next `batches` batches."""
  config.data.worker_count = workers
  shape = (config.train.batch_size, config_lib.window_length(config))
  start = time.perf_counter()
  it = data.train_iterator(prepared, config)
  batch = next(it)
  first = time.perf_counter() - start
  assert batch.tokens.shape == shape, (batch.tokens.shape, shape)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  seconds = time.perf_counter() - start
  if hasattr(it, "close"):
    it.close()  # stops mp_prefetch workers
  return {"workers": workers, "first": first, "batches": batches,
          "tokens_per_s": batches * shape[0] * shape[1] / seconds}


def main(argv):
  del argv
  config = _CONFIG.value
  manifest = build_corpus(_CORPUS_DIR.value, _CORPUS_MB.value)
  built = manifest["built_seconds"]
  print(f"corpus: {_CORPUS_DIR.value}, {manifest['shards']} parquet shards, "
        f"{manifest['rows']:,} documents, {manifest['text_bytes'] / 1e6:.1f} "
        f"MB of text, {manifest['copies']} pass(es) over the stdlib; "
        + ("already built" if built is None else f"built in {built:.1f} s"))
  config.data.dataset = f"parquet:{_CORPUS_DIR.value}/*.parquet"
  config.data.data_dir = _DATA_DIR.value
  config.train.batch_size = _BATCH_SIZE.value
  config.train.seq_len = _SEQ_LEN.value
  config_lib.validate(config)
  start = time.perf_counter()
  prepared = data.prepare(config)
  print(f"tokenizer ready in {time.perf_counter() - start:.1f} s "
        f"(data.prepare: file split + BPE of vocab "
        f"{prepared.tokenizer.get_vocab_size()} trained or loaded from "
        f"{_DATA_DIR.value}); mode {prepared.mode}, "
        f"{len(prepared.train_split.files)} train / "
        f"{len(prepared.eval_split.files)} eval files")
  print(f"batch {_BATCH_SIZE.value} x (seq_len {_SEQ_LEN.value} + 1) = "
        f"{_BATCH_SIZE.value * (_SEQ_LEN.value + 1):,} tokens per batch; "
        f"{os.cpu_count()} CPU cores\n")
  print("    python " + shlex.join(sys.argv) + "\n")
  print("| workers | files | time to first batch s | batches | tokens/s |")
  print("|---|---|---|---|---|")
  results = {}
  for workers in (int(w) for w in _WORKERS.value):
    r = measure(prepared, config, workers, _BATCHES.value)
    results[workers] = r
    print(f"| {workers} | {len(prepared.train_split.files)} | "
          f"{r['first']:.2f} | {r['batches']} | {r['tokens_per_s']:,.0f} |",
          flush=True)
  if _PREPARED.value:
    prepared_config = config.copy_and_resolve_references()
    prepared_config.data.mode = "prepared"
    shutil.rmtree(os.path.join(_DATA_DIR.value, "tokens"), ignore_errors=True)
    start = time.perf_counter()
    cached = data.prepare(prepared_config)  # the BPE is cached already
    print(f"\nprepared mode instead: {time.perf_counter() - start:.1f} s to "
          f"tokenize {cached.train_n_tokens + cached.eval_n_tokens:,} tokens "
          "into a fresh token cache before the first batch")
  if 1 in results:
    rate = results[1]["tokens_per_s"]
    print(f"\ncores to feed one H100 on the 700M config = ceil(needed "
          f"tokens/s / tokens/s of 1 worker) = ceil({_TARGET.value:,} / "
          f"{rate:,.0f}) = {math.ceil(_TARGET.value / rate)}")


if __name__ == "__main__":
  app.run(main)
