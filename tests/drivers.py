"""Helpers shared by tests and the subprocesses they start (no jax import).

Subprocess programs run with the repository as working directory and import
this module with `sys.path.insert(0, "tests")`.
"""

import importlib.util
import os
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port(host: str = "127.0.0.1") -> int:
  """A TCP port nobody listens on now (for a coordinator or a server)."""
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def load_config(spec: str, overrides: dict | None = None):
  """Loads "configs/NAME.py[:variant]" like ml_collections' config_flags.

  Args:
    spec: the config file relative to the repository, with an optional
      ":variant".
    overrides: {"section.field": value} applied after loading.
  """
  path, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location(
      "config_under_test", os.path.join(REPO, path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(variant) if variant else module.get_config()
  for key, value in (overrides or {}).items():
    section, field = key.split(".")
    config[section][field] = value
  return config


def slow_train_steps(seconds: float) -> None:
  """Makes every train step sleep `seconds` first, so signals land mid-run."""
  from bitnet_jax.training import steps  # pylint: disable=g-import-not-at-top
  real = steps.make_train_step

  def make(*args, **kwargs):
    step = real(*args, **kwargs)

    def run(state, window):
      time.sleep(seconds)
      return step(state, window)
    return run

  steps.make_train_step = make


def corpus_documents(count: int, chars: int = 1500) -> list[str]:
  """`count` distinct documents: "# doc K" and the head of a stdlib file."""
  import glob  # pylint: disable=g-import-not-at-top
  import sysconfig  # pylint: disable=g-import-not-at-top
  files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"],
                                        "*.py")))
  docs = []
  for k in range(count):
    with open(files[k % len(files)], encoding="utf-8", errors="replace") as f:
      docs.append(f"# doc {k}\n{f.read(chars)}")
  return docs


def write_corpus(directory: str, scheme: str, docs: list[str],
                 n_files: int, text_feature: str = "text") -> list[str]:
  """Writes `docs` round-robin into `n_files` files of `scheme`.

  scheme: "parquet" (pyarrow, row groups of 4), "jsonl", "jsonl.gz",
  "jsonl.zst" or "arrayrecord" (even files hold tf.train.Example records as
  TFDS writes them, odd files raw UTF-8). Returns the paths written.
  """
  import gzip  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  os.makedirs(directory, exist_ok=True)
  paths = []
  for index in range(n_files):
    part = docs[index::n_files]
    path = os.path.join(directory, f"part-{index:03d}.{scheme}")
    if scheme == "parquet":
      import pyarrow as pa  # pylint: disable=g-import-not-at-top
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
      pq.write_table(pa.table({"id": list(range(len(part))),
                               text_feature: part}), path, row_group_size=4)
    elif scheme.startswith("jsonl"):
      lines = "".join(json.dumps({"id": i, text_feature: doc}) + "\n"
                      for i, doc in enumerate(part)).encode()
      if scheme.endswith(".gz"):
        lines = gzip.compress(lines)
      elif scheme.endswith(".zst"):
        import zstandard  # pylint: disable=g-import-not-at-top
        lines = zstandard.ZstdCompressor().compress(lines)
      with open(path, "wb") as f:
        f.write(lines)
    elif scheme == "arrayrecord":
      # pylint: disable=g-import-not-at-top
      from array_record.python import array_record_module
      from tensorflow_datasets.proto import tf_example_pb2
      writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
      for doc in part:
        record = doc.encode()
        if index % 2 == 0:
          example = tf_example_pb2.Example()
          example.features.feature[text_feature].bytes_list.value.append(
              record)
          record = example.SerializeToString()
        writer.write(record)
      writer.close()
    else:
      raise ValueError(scheme)
    paths.append(path)
  return paths


def stream_config(config, directory: str, scheme: str = "jsonl",
                  n_files: int = 6, n_docs: int = 48, **data_fields):
  """Points `config` at a streamed corpus written under `directory`.

  `n_docs` documents (`corpus_documents`) in `n_files` files of `scheme`
  (see `write_corpus`) train; 8 more in 2 files are `data.eval_dataset`.
  The token cache lives in `directory/cache`; `data_fields` override
  `config.data`. Returns `config`.
  """
  docs = corpus_documents(n_docs + 8)
  write_corpus(os.path.join(directory, "train"), scheme, docs[:n_docs],
               n_files)
  write_corpus(os.path.join(directory, "eval"), scheme, docs[n_docs:], 2)
  glob_scheme = scheme.split(".")[0]
  config.data.dataset = f"{glob_scheme}:{directory}/train/*"
  config.data.eval_dataset = f"{glob_scheme}:{directory}/eval/*"
  config.data.data_dir = os.path.join(directory, "cache")
  config.data.shuffle_buffer_size = 8
  config.data.read_concurrency = 2
  for key, value in data_fields.items():
    config.data[key] = value
  return config


TOLERANCE = 1e-4  # max |ours - theirs| / max |ours| of float32 logits


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
  """max |ours - theirs| / max |ours|."""
  return float(np.abs(ours - theirs).max() / np.abs(ours).max())


def assert_logits_match(ours: np.ndarray, theirs: np.ndarray, what: str):
  """Equal to TOLERANCE, but for int8 rounding flips at near-ties.

  The two frameworks order float operations differently (e.g. HF scales
  weights by 1 / (1 / mean|W|)), so an activation x * 127 / max|x| within
  ~1e-5 of a .5 boundary can round to the neighbouring int8 code (about 2
  in 1e5 activations). That moves the logits of its token, and through
  attention every later token of its row, by about one quantization step
  (~1e-3 relative). So: at least half the positions must match to
  TOLERANCE (a flip touches one row's suffix; a real mismatch such as a
  wrong RoPE base, head grouping or scale touches nearly every position),
  and none may differ by 1e-2. That each layer computes the same on
  identical inputs is checked exactly by tests/test_hf.py's
  `test_each_exported_layer_matches_transformers_on_identical_inputs`.
  """
  per_position = np.abs(ours - theirs).max(-1) / np.abs(ours).max()
  matching = float(np.mean(per_position <= TOLERANCE))
  assert matching >= 0.5 and per_position.max() < 1e-2, (
      f"{what}: logits differ by up to {per_position.max():.2e} (relative); "
      f"only {matching:.0%} of the positions match to {TOLERANCE}")
