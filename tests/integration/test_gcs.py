"""gs:// run directories against a real GCS API server on loopback.

`gcp-storage-emulator` (PyPI) serves the GCS JSON API (tests/gcs_server.py
adds the generation headers and preconditions it lacks); google-cloud-
storage, gcsfs (through etils.epath) and tensorstore (orbax's array writer)
are pointed at it with `STORAGE_EMULATOR_HOST` and
`TENSORSTORE_GCS_HTTP_URL`. Nothing is mocked.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from test_resilience import TIMING_KEYS

from bitnet_jax.runs import checkpoint
from bitnet_jax.storage import paths
from bitnet_jax.training import loop

import drivers
from drivers import (
  REPO,
  abstract_of,
  free_port,
  grain_iterator,
  save_steps,
  small_state,
)

BUCKET = "bitnet-test"


@pytest.fixture(scope="module")
def gcs():
  """Starts the emulator (tests/gcs_server.py: gcp-storage-emulator with
  GCS's generation headers and preconditions); yields the gs:// URL of an
  empty bucket."""
  try:
    import gcp_storage_emulator  # noqa: F401
  except ImportError:
    pytest.skip("gcp-storage-emulator is not installed: pip install -e "
                "'.[test]' brings it")
  port = free_port("localhost")
  server = subprocess.Popen(
      [sys.executable, os.path.join(REPO, "tests", "gcs_server.py"),
       str(port), BUCKET],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 30
  while True:
    try:
      socket.create_connection(("localhost", port), timeout=1).close()
      break
    except OSError:
      if time.monotonic() > deadline or server.poll() is not None:
        server.kill()
        pytest.fail(f"the GCS emulator did not start on port {port}")
      time.sleep(0.2)
  url = f"http://localhost:{port}"
  saved = {k: os.environ.get(k) for k in (
      "STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
      "GOOGLE_AUTH_TOKEN_FOR_TESTING")}
  os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
                    GOOGLE_AUTH_TOKEN_FOR_TESTING="emulator")
  try:
    yield f"gs://{BUCKET}"
  finally:
    server.kill()
    server.wait()
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value


def test_checkpoints_save_and_restore_on_gcs(gcs):
  directory = f"{gcs}/roundtrip/checkpoints"
  ckpt = checkpoint.Checkpointer(directory, keep=2)
  save_steps(ckpt, {1: 5.0, 2: None})
  ckpt.close()
  reopened = checkpoint.Checkpointer(directory, keep=2)
  assert reopened.all_steps() == [1, 2], reopened.all_steps()
  restored = reopened.restore(abstract_of(small_state()), grain_iterator())
  assert restored is not None and restored.step == 2
  assert restored.run == {"tokens_seen": 20}, restored.run
  np.testing.assert_array_equal(restored.state["params"]["w"],
                                small_state()["params"]["w"])
  reopened.close()


def test_a_damaged_checkpoint_on_gcs_is_moved_aside(gcs):
  from etils import epath
  run = f"{gcs}/damaged"
  ckpt = checkpoint.Checkpointer(f"{run}/checkpoints", keep=3)
  save_steps(ckpt, {1: None, 2: None})
  ckpt.close()
  epath.Path(f"{run}/checkpoints/2/state").rmtree()

  reopened = checkpoint.Checkpointer(f"{run}/checkpoints", keep=3)
  restored = reopened.restore(abstract_of(small_state()), grain_iterator())
  assert restored is not None and restored.step == 1, (
      "the previous checkpoint was not restored from gs://")
  moved = [p.name for p in epath.Path(
      f"{run}/{checkpoint.DAMAGED_DIR}").iterdir()]
  assert len(moved) == 1 and moved[0].startswith("2-"), (
      f"damaged checkpoint not kept aside on gs://: {moved}")
  assert reopened.all_steps() == [1]
  reopened.close()


def test_a_second_writer_of_a_gcs_workdir_is_refused_until_released(gcs):
  from bitnet_jax.runs import gcs_lock, lock
  workdir = f"{gcs}/locked"
  first = gcs_lock.workdir_lock(workdir, stale_seconds=60,
                                heartbeat_seconds=1)
  assert isinstance(first, gcs_lock.GcsWorkdirLock)
  first.acquire()
  second = gcs_lock.workdir_lock(workdir, stale_seconds=60,
                                 heartbeat_seconds=1)
  with pytest.raises(lock.WorkdirLockedError) as caught:
    second.acquire()
  assert f"{workdir}/run.lock" in str(caught.value), str(caught.value)
  generation = first._generation  # pylint: disable=protected-access
  time.sleep(2.5)  # heartbeats rewrite the object under our generation
  assert first._generation != generation, (  # pylint: disable=protected-access
      "the heartbeat did not rewrite the lock object")
  blob = first._bucket.get_blob(first._name)  # pylint: disable=protected-access
  assert blob.generation == first._generation, (  # pylint: disable=protected-access
      "the stored lock is not the heartbeat's")
  first.release()
  second.acquire()
  assert second.held, "the lock was not free after release"
  second.release()


def test_a_dead_holders_gcs_lock_is_taken_over(gcs):
  import json as json_lib

  from etils import epath

  from bitnet_jax.runs import gcs_lock
  workdir = f"{gcs}/dead-holder"
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  epath.Path(f"{workdir}/run.lock").write_text(json_lib.dumps(
      {"host": socket.gethostname(), "pid": int(dead.stdout), "token": "x"}))
  lock = gcs_lock.workdir_lock(workdir, stale_seconds=60)
  lock.acquire()
  assert lock.held, "a lock of a process that no longer exists was kept"
  lock.release()


def _gcs_records(url: str) -> list[dict]:
  """metrics.jsonl of the run at `url`, skipping a line being written."""
  try:
    text = paths.read_bytes(f"{url}/metrics.jsonl").decode()
  except FileNotFoundError:
    return []
  records = []
  for line in text.splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      pass
  return records


def _event_tags(url: str) -> set[str]:
  """The scalar tags of every TFRecord event file under url/tensorboard."""
  import struct

  from etils import epath
  from tensorboardX.proto import event_pb2
  tags = set()
  for path in epath.Path(f"{url}/tensorboard").iterdir():
    data, offset = path.read_bytes(), 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      event = event_pb2.Event.FromString(
          data[offset + 12:offset + 12 + length])
      tags.update(value.tag for value in event.summary.value)
      offset += 12 + length + 4  # length, its crc, data, its crc
  return tags


def _short_run(config, steps: int = 4):
  config.train.steps = steps
  config.train.checkpoint_every = steps
  config.train.eval_every = steps
  config.optimizer.warmup_steps = 1
  return config


def test_a_second_trainer_of_a_gcs_workdir_is_refused(gcs, tiny_config):
  from bitnet_jax.runs import gcs_lock, lock
  from bitnet_jax.training import loop
  url = f"{gcs}/contended"
  holder = gcs_lock.workdir_lock(url, stale_seconds=60)
  holder.acquire()
  try:
    with pytest.raises(lock.WorkdirLockedError, match="run.lock"):
      loop.train_and_evaluate(_short_run(tiny_config), url)
  finally:
    holder.release()
  assert not paths.isfile(f"{url}/config.json"), (
      "the refused trainer wrote into the run")


def test_a_precondition_refuses_a_second_create_on_the_server(gcs):
  """The emulator enforces ifGenerationMatch=0, as GCS does."""
  from google.api_core import exceptions
  from google.cloud import storage
  blob = storage.Client().bucket(BUCKET).blob("precondition/once")
  blob.upload_from_string(b"first", if_generation_match=0)
  with pytest.raises(exceptions.PreconditionFailed):
    blob.upload_from_string(b"second", if_generation_match=0)
  assert blob.download_as_bytes() == b"first"


def test_appends_compose_onto_the_object(gcs):
  url = f"{gcs}/append/lines.jsonl"
  paths.append(url, b"one\n")
  paths.append(url, b"two\n")
  assert paths.read_bytes(url) == b"one\ntwo\n"
  from etils import epath
  assert [p.name for p in epath.Path(f"{gcs}/append").iterdir()] == [
      "lines.jsonl"], (
      "the appended piece was not deleted")


def test_a_gcs_data_dir_is_built_once_and_fetched_by_another_host(
    gcs, tmp_path, monkeypatch, load_config):
  from bitnet_jax import data
  from bitnet_jax.data import tokenizer as tokenizer_lib

  import drivers
  config = drivers.stream_config(load_config("configs/tiny.py"),
                                 str(tmp_path / "corpus"), mode="prepared")
  config.data.data_dir = f"{gcs}/data-cache"
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "host-a"))
  first = data.prepare(config)
  assert first.train_tokens.startswith(str(tmp_path / "host-a")), (
      f"the token cache is not in the local mirror: {first.train_tokens}")

  def no_training(*args, **kwargs):
    raise AssertionError("host B trained the BPE again instead of fetching")

  def no_tokenizing(*args, **kwargs):
    raise AssertionError("host B tokenized again instead of fetching")
  monkeypatch.setattr(tokenizer_lib, "train_bpe", no_training)
  monkeypatch.setattr(tokenizer_lib, "encode_documents", no_tokenizing)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "host-b"))
  second = data.prepare(config)
  assert second.train_tokens.startswith(str(tmp_path / "host-b"))
  for a, b in ((first.train_tokens, second.train_tokens),
               (first.eval_tokens, second.eval_tokens),
               (first.tokenizer_path, second.tokenizer_path)):
    with open(a, "rb") as f, open(b, "rb") as g:
      assert f.read() == g.read(), f"{b} differs from the published {a}"


DRIVER = """
import sys
sys.path.insert(0, "tests")
import drivers
from absl import logging
logging.set_verbosity(logging.INFO)
from bitnet_jax.training import loop
config = drivers.load_config("configs/tiny.py", {overrides!r})
drivers.slow_train_steps(0.05)
loop.train_and_evaluate(config, {workdir!r})
"""


class _Driver:
  """A training subprocess; its output goes to a file (a pipe nobody reads
  while the test polls would fill up with gs:// INFO lines and block it).
  Runs on this process's 8 CPU devices, so that its values can be compared
  with a run trained here."""

  def __init__(self, workdir: str, overrides: dict, log: str):
    self.process = drivers.Driver(
        DRIVER.format(overrides=overrides, workdir=workdir), log=log)

  def output(self) -> str:
    return self.process.output()

  def wait_for_step(self, url: str, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if any(r["step"] >= step for r in _gcs_records(url) if "loss" in r):
        return
      if self.process.poll() is not None:
        pytest.fail(f"the run ended before step {step}:\n"
                    f"{self.output()[-3000:]}")
      time.sleep(0.1)
    self.process.kill()
    self.process.wait()
    pytest.fail(f"step {step} was not logged on gs:// within {timeout} s:\n"
                f"{self.output()[-3000:]}")

  def finish(self, timeout: float = 180) -> tuple[int, str]:
    try:
      self.process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.process.kill()
      pytest.fail(f"the process did not exit within {timeout} s (a hang):\n"
                  f"{self.output()[-3000:]}")
    return self.process.returncode, self.output()


def _committed(url: str) -> list[int]:
  """The checkpoint steps under `url` that orbax has committed (on GCS it
  marks a finished checkpoint with commit_success.txt, having no rename)."""
  bucket, prefix = paths.split_gcs(f"{url}/checkpoints/")
  steps = []  # through the storage client: gcsfs would cache the listing
  for blob in paths.gcs_bucket(bucket).list_blobs(prefix=prefix):
    step, _, name = blob.name[len(prefix):].partition("/")
    if step.isdigit() and name == "commit_success.txt":
      steps.append(int(step))
  return steps


@pytest.mark.slow
def test_a_gcs_run_killed_resumes_bit_identically_and_exports(
    gcs, data_dir, tmp_path):
  from bitnet_jax.interop import exporter
  from bitnet_jax.runs import reader
  overrides = {"data.data_dir": data_dir, "train.steps": 16,
               "train.log_every": 1, "train.eval_every": 8,
               "train.checkpoint_every": 4, "optimizer.warmup_steps": 2}
  url = f"{gcs}/interrupted"
  logs = iter(str(tmp_path / f"driver-{i}.log") for i in range(2))
  driver = _Driver(url, overrides, next(logs))
  driver.wait_for_step(url, 6)
  deadline = time.monotonic() + 60  # until checkpoint 4 is committed on gs://
  while not _committed(url):
    assert time.monotonic() < deadline, "checkpoint 4 never committed"
    time.sleep(0.1)
  driver.process.send_signal(signal.SIGKILL)
  driver.finish()
  latest = max(_committed(url))
  # takes over the dead holder's lock, resumes from the latest checkpoint
  # and finishes (a signal's save: test_resilience.py; on gs:// it is the
  # same save as every periodic one)
  code, output = _Driver(url, overrides, next(logs)).finish()
  assert code == 0, f"the final run failed:\n{output[-3000:]}"
  assert f"resuming at step {latest} " in output, (
      f"the run did not resume from gs:// checkpoint {latest}:\n"
      f"{output[-3000:]}")
  local = str(tmp_path / "straight")  # the same run, uninterrupted, here
  loop.train_and_evaluate(drivers.load_config("configs/tiny.py", overrides),
                          local)

  def comparable(records):
    merged = {}
    for record in records:
      merged.setdefault(record["step"], {}).update(
          {k: v for k, v in record.items() if k not in TIMING_KEYS})
    return merged
  with open(os.path.join(local, "metrics.jsonl")) as f:
    straight = comparable(map(json.loads, f))
  resumed = comparable(_gcs_records(url))
  assert sorted(resumed) == sorted(straight), "steps lost or repeated"
  assert resumed == straight, (
      "a logged value of the killed and resumed gs:// run differs from the "
      "uninterrupted local run")

  from etils import epath
  names = {p.name for p in epath.Path(url).iterdir()}
  for name in ("checkpoints", "config.json", "config_history.jsonl",
               "metrics.jsonl", "samples.jsonl", "tensorboard",
               "tokenizer.json"):
    assert name in names, f"{name} missing from the gs:// run: {names}"
  assert "run.lock" not in names, "the GCS lock was not released"
  assert not os.path.exists(os.path.join(REPO, "gs:")), (
      "a local folder named gs: was created for a gs:// workdir")
  tags = _event_tags(url)
  assert {"loss", "eval_loss"} <= tags, (
      f"the gs:// TensorBoard events lack the loss scalars: {sorted(tags)}")

  from bitnet_jax.data.tokenizer import load_tokenizer
  from bitnet_jax.model import decode
  continuations = []
  for workdir in (url, local):  # what `generate --workdir=...` runs
    _, model, step = reader.load_model(workdir)
    tokenizer = load_tokenizer(reader.tokenizer_path(workdir))
    prompt = np.array([tokenizer.encode("def main(").ids], np.int32)
    continuations.append((step, decode.greedy(model, prompt, 12).tolist()))
  assert continuations[0] == continuations[1], continuations
  with pytest.raises(Exception, match="--step=9"):
    reader.load_run(url, step=9)

  exported = [exporter.export_hf(workdir, str(tmp_path / name), "bf16")
              for workdir, name in ((url, "from-gcs"), (local, "from-local"))]
  for name in sorted(os.listdir(exported[1])):
    with open(os.path.join(exported[0], name), "rb") as f, open(
        os.path.join(exported[1], name), "rb") as g:
      assert f.read() == g.read(), f"exported {name} differs"
  assert continuations[0][0] == 16, continuations[0][0]
  from bitnet_jax.evaluation import perplexity
  from bitnet_jax.evaluation.backend import BitNetLM
  texts = ["def main(argv):\n    return len(argv)\n", "import os\n"]
  figures = [perplexity.perplexity(BitNetLM.from_run(w, batch_size=8),
                                   iter(texts)) for w in (url, local)]
  assert figures[0] == figures[1], (
      f"the gs:// run evaluates otherwise than its local twin: {figures}")


def test_a_store_that_never_answers_fails_within_the_deadline(
    gcs, data_dir, tmp_path):
  """TensorStore (orbax's array writes) pointed at an endpoint that accepts
  connections and never answers: the run fails with one line naming the
  checkpoint and the endpoint, within its deadline, instead of hanging."""
  silent = socket.socket()
  silent.bind(("127.0.0.1", 0))
  silent.listen(64)  # the kernel accepts; nothing ever reads or answers
  endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
  deadline_seconds = 8
  began = time.monotonic()
  try:
    done = subprocess.run(
        [sys.executable, "-m", "bitnet_jax.main", "--config=configs/tiny.py",
         f"--workdir={gcs}/silent", f"--config.data.data_dir={data_dir}",
         "--config.train.steps=10", "--config.train.checkpoint_every=5",
         "--config.train.eval_every=10", "--config.optimizer.warmup_steps=2",
         f"--config.train.storage_timeout_seconds={deadline_seconds}"],
        cwd=REPO, env={**os.environ, "TENSORSTORE_GCS_HTTP_URL": endpoint},
        capture_output=True, text=True, timeout=240, check=False)
  finally:
    silent.close()
  took = time.monotonic() - began
  lines = done.stderr.strip().splitlines()
  assert done.returncode == 2, f"exit {done.returncode}:\n{done.stderr[-3000:]}"
  assert lines[-1].startswith("error: ") and endpoint in lines[-1] and (
      f"{gcs}/silent/checkpoints/5" in lines[-1]), lines[-1]
  assert "Traceback" not in done.stderr, done.stderr[-3000:]
  # start-up and compilation (~20 s) + one deadline + the exit grace
  assert took < 120, f"took {took:.0f} s with a {deadline_seconds} s deadline"
