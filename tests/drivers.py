"""Helpers shared by both test tiers and the subprocesses they start.

No jax import at module level: the helpers that need jax, torch or
bitnet_jax import them when called.

Subprocess programs run with the repository as working directory and import
this module with `sys.path.insert(0, "tests")`; `Driver` starts such a
program in a process forked from a server that imported bitnet_jax once.
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


# --- driver processes ----------------------------------------------------------

# What the fork server imports once; each driver process is forked from it
# and so starts without importing jax, flax, orbax and grain again (about
# 5 s of each start on 2 cores).
_PRELOAD = ("bitnet_jax.training.loop", "drivers")


def _run_program(program: str, args: list[str], env: dict, unset: list[str],
                 log: str) -> None:
  """In the forked child: `python -c program *args` from the repository,
  with the parent's `env` over the server's and `unset` removed, stdout and
  stderr into the file `log`. (Only these changes: the variables the
  server's imports set, e.g. for libtpu, must stay, or JAX hangs.)"""
  import atexit  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  os.dup2(out, 1)
  os.dup2(out, 2)
  os.close(out)
  os.environ.update({k: v for k, v in env.items() if os.environ.get(k) != v})
  for key in unset:
    os.environ.pop(key, None)
  os.chdir(REPO)
  sys.argv = ["-c", *args]
  try:
    exec(compile(program, "<driver>", "exec"), {"__name__": "__main__"})  # noqa: S102  pylint: disable=exec-used
  finally:  # as an interpreter's exit does (multiprocessing's does not):
    atexit._run_exitfuncs()  # e.g. jax.distributed.shutdown  pylint: disable=protected-access


class Driver:
  """A Python program run in its own process, like `python -c PROGRAM
  ARGS`, but forked from a fork server that has imported bitnet_jax once
  (multiprocessing's "forkserver" start method; JAX is imported there but
  never initialized, so each process picks its own devices from its
  XLA_FLAGS). A real process: its own pid, signals, exit status (128 + N
  after `os._exit`, -N when killed by signal N) and files.

  The subset of `subprocess.Popen` the tests use: `pid`, `poll`, `wait`,
  `send_signal`, `kill`, `returncode`, `communicate`; the output (stdout
  and stderr together) goes to the file `log` (the test's temporary
  directory), read by `output()`. The
  environment is this process's without the variables named in `unset`.
  """

  def __init__(self, program: str, log: str, args=(), unset=()):
    import multiprocessing  # pylint: disable=g-import-not-at-top
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(_PRELOAD))
    self.log = log
    self._process = context.Process(
        target=_run_program, args=(program, [str(a) for a in args],
                                   dict(os.environ), list(unset), log))
    self._process.start()
    self.pid = self._process.pid

  @property
  def returncode(self) -> int | None:
    return self._process.exitcode

  def poll(self) -> int | None:
    return self._process.exitcode

  def wait(self, timeout: float | None = None) -> int:
    """The exit status; raises subprocess.TimeoutExpired after `timeout` s."""
    import subprocess  # pylint: disable=g-import-not-at-top
    self._process.join(timeout)
    if self._process.exitcode is None:
      raise subprocess.TimeoutExpired("driver", timeout)
    return self._process.exitcode

  def send_signal(self, signum: int) -> None:
    os.kill(self.pid, signum)

  def kill(self) -> None:
    import signal  # pylint: disable=g-import-not-at-top
    if self._process.exitcode is None:
      self.send_signal(signal.SIGKILL)

  def output(self) -> str:
    with open(self.log, errors="replace") as f:
      return f.read()

  def communicate(self, timeout: float | None = None) -> tuple[str, None]:
    self.wait(timeout)
    return self.output(), None


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
  identical inputs is checked exactly by tests/integration/test_hf_export.py's
  `test_each_exported_layer_matches_transformers_on_identical_inputs`.
  """
  per_position = np.abs(ours - theirs).max(-1) / np.abs(ours).max()
  matching = float(np.mean(per_position <= TOLERANCE))
  assert matching >= 0.5 and per_position.max() < 1e-2, (
      f"{what}: logits differ by up to {per_position.max():.2e} (relative); "
      f"only {matching:.0%} of the positions match to {TOLERANCE}")


# --- Hugging Face models (torch, transformers and bitnet_jax imported when
# called, so that the subprocesses importing this module stay light) --------

def hf_logits(folder: str, tokens: np.ndarray) -> np.ndarray:
  """float32 logits of transformers' model saved in `folder` (torch, CPU)."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import AutoModelForCausalLM  # pylint: disable=g-import-not-at-top
  model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
  with torch.no_grad():
    return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def run_logits(workdir: str, tokens: np.ndarray):
  """(logits of the run's newest checkpoint, its model)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from bitnet_jax.runs import reader  # pylint: disable=g-import-not-at-top
  _, model, _ = reader.load_model(workdir)
  return np.asarray(model(jnp.asarray(tokens))), model


def random_hf_model(folder: str, tokenizer_json: str, vocab: int,
                    dtype) -> dict:
  """Saves a random 2B-4T-shaped BitNetForCausalLM; returns its config.

  dtype: the torch dtype of the saved tensors.
  """
  import json  # pylint: disable=g-import-not-at-top

  import torch  # pylint: disable=g-import-not-at-top
  from transformers import BitNetConfig, BitNetForCausalLM  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  config = BitNetConfig(
      vocab_size=vocab, hidden_size=64, intermediate_size=128,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      hidden_act="relu2", rms_norm_eps=1e-5, tie_word_embeddings=True,
      rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
      bos_token_id=0, eos_token_id=0)
  model = BitNetForCausalLM(config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):  # make the norms matter
        p.copy_(1 + 0.2 * torch.randn_like(p))
  model.to(dtype).save_pretrained(folder)
  with open(os.path.join(tokenizer_json), "rb") as f:
    tokenizer = f.read()
  with open(os.path.join(folder, "tokenizer.json"), "wb") as f:
    f.write(tokenizer)
  with open(os.path.join(folder, "config.json")) as f:
    saved = json.load(f)
  return saved


def write_hf_config(folder: str, config: dict, quantization: dict) -> None:
  """Writes `config` with `quantization` as its quantization_config."""
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({**config, "quantization_config": quantization}, f)


def hf_latent_folder(folder: str, run: str, dtype) -> str:
  """`random_hf_model` with online quantization, in `run`'s vocabulary and
  tokenizer; returns `folder`."""
  from bitnet_jax.interop import hf  # pylint: disable=g-import-not-at-top
  from bitnet_jax.runs import reader  # pylint: disable=g-import-not-at-top
  vocab = reader.load_run_config(run).model.vocab_size
  config = random_hf_model(folder, reader.tokenizer_path(run), vocab, dtype)
  write_hf_config(folder, config, hf.quantization_config(False, ""))
  return folder


def params_of(model):
  """(graphdef, its `nnx.Param`s as a pure dict) of a Transformer: what a
  train state holds; `transformer.bind(graphdef, params, step)` rebuilds
  the model."""
  # pylint: disable-next=g-import-not-at-top
  from flax import nnx
  return nnx.split(model)[0], nnx.to_pure_dict(nnx.state(model, nnx.Param))


def next_token_loss(model, batch, **train_fields):
  """(mean loss, {"nll", "accuracy"}) of the next-token objective on one
  batch: `batch` a `Batch`, or int32 windows `[batch, seq_len + 1]`;
  `train_fields` set `config.train` (label_smoothing, loss_chunk_size...)."""
  # pylint: disable-next=g-import-not-at-top
  from bitnet_jax.config import base_config
  from bitnet_jax.data.batch import Batch
  from bitnet_jax.training.objectives import NextToken
  from bitnet_jax.training.objectives.next_token import mean_loss
  train = base_config().train
  train.update(train_fields)
  if not isinstance(batch, Batch):
    batch = Batch.of_windows(np.asarray(batch))
  return mean_loss(NextToken(train), model, batch)


# --- checkpoints (tests/unit/test_checkpoint.py, tests/integration/test_gcs.py)

def small_state(width: int = 8) -> dict:
  """A train-state-shaped tree: a step and one (4, width) parameter."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  return {"step": jnp.zeros((), jnp.int32),
          "params": {"w": jnp.arange(4 * width, dtype=jnp.float32)
                     .reshape(4, width)}}


def grain_iterator():
  """A grain iterator over 0..99, whose position a checkpoint saves."""
  import grain  # pylint: disable=g-import-not-at-top
  return iter(grain.MapDataset.range(100).to_iter_dataset())


def abstract_of(state):
  """`state` as ShapeDtypeStructs on the first device (a restore target)."""
  import jax  # pylint: disable=g-import-not-at-top
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=sharding), state)


def save_steps(ckpt, losses: dict) -> None:
  """Saves `small_state()` at each step of {step: eval_loss or None}."""
  for step, eval_loss in losses.items():
    run = {"tokens_seen": step * 10}
    if eval_loss is not None:
      run["eval_loss"] = eval_loss
    ckpt.save(step, small_state(), grain_iterator(), run)
    ckpt.wait()


# --- run locks (tests/unit/test_run_lock.py and the processes that hold and
# race in tests/integration/test_run_lock_processes.py) ----------------------

def write_lock(workdir, *, host: str, pid: int, age_seconds: float,
               token: str = "other-token", **extra) -> str:
  """Writes another holder's run lock, `age_seconds` old; returns its path."""
  import json  # pylint: disable=g-import-not-at-top

  from bitnet_jax.runs import directory  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, directory.RUN_LOCK)
  record = {"host": host, "pid": pid, "started": "2024-01-01T00:00:00+00:00",
            "token": token, "argv": ["train", "--workdir", str(workdir)],
            **extra}
  with open(path, "w") as f:
    json.dump(record, f)
  then = time.time() - age_seconds
  os.utime(path, (then, then))
  return path


def lock_token(path: str) -> str:
  """The token of the run lock at `path`."""
  import json  # pylint: disable=g-import-not-at-top
  with open(path) as f:
    return json.load(f)["token"]


def needs_cuda_plugin(test):
  """Skips `test` (a function or a module's `pytestmark` list entry when
  called with None) without JAX's CUDA plugin and cuDNN (`pip install -e
  '.[gpu_compile]'`, in the test extra), which compile for NVIDIA GPUs on
  this CPU host."""
  # pylint: disable-next=g-import-not-at-top
  import importlib.util

  import pytest
  mark = pytest.mark.skipif(
      importlib.util.find_spec("jax_cuda12_plugin") is None
      or importlib.util.find_spec("nvidia.cudnn") is None,
      reason="JAX's CUDA plugin and cuDNN are not installed "
             "(pip install -e '.[gpu_compile]')")
  return mark if test is None else mark(test)


def needs_libtpu(test):
  """Skips `test` without libtpu (`pip install 'jax[tpu]'`), which compiles
  for TPU on this CPU host."""
  # pylint: disable-next=g-import-not-at-top
  import importlib.util

  import pytest
  return pytest.mark.skipif(
      importlib.util.find_spec("libtpu") is None,
      reason="libtpu is not installed (pip install 'jax[tpu]'); it compiles "
             "for TPU on this CPU host")(test)
