"""Each class of bad input, through the real command in a fresh interpreter:
one `error:` line naming the key, path or row, exit status 2, no traceback
and no library chatter (bitnet_jax.config.command_line)."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest

from drivers import REPO

# Words that only library noise or a traceback would put on the console.
NOISE = ("Traceback", "orbax", "asyncio", "Event loop", "TensorStore",
         "tensorstore", "libtpu", "TPU", "dataset_info", "Downloading")
SMALL_FILE_BYTES = 64 * 1024  # RLIMIT_FSIZE of the "full disk" cases


def _run(module: str, *args: str, file_size_limit: int | None = None
         ) -> subprocess.CompletedProcess:
  """`python -m MODULE ARGS` from the repository. `file_size_limit`: no
  file may grow past it (writes fail with EFBIG, as on a full disk)."""
  def limit():
    if file_size_limit is not None:
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not a kill
      resource.setrlimit(resource.RLIMIT_FSIZE,
                         (file_size_limit, file_size_limit))
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO,
                        capture_output=True, text=True,
                        timeout=300, preexec_fn=limit, check=False)


def _assert_refused(done: subprocess.CompletedProcess, *named: str,
                    alone: bool = True) -> None:
  """Status 2, one `error:` line (the last) naming each of `named`, and no
  noise; `alone`: nothing else was printed (a refusal before any work)."""
  lines = [l for l in (done.stdout + done.stderr).splitlines() if l.strip()]
  errors = [l for l in lines if l.startswith("error: ")]
  shown = "\n".join(lines[-40:])
  assert done.returncode == 2, f"exit status {done.returncode}:\n{shown}"
  assert len(errors) == 1 and lines[-1] == errors[0], (
      f"want exactly one error line, the last:\n{shown}")
  for name in named:
    assert name in errors[0], f"{name!r} not named in: {errors[0]}"
  noisy = [l for l in lines if l != errors[0] and any(
      word in l for word in NOISE)]
  assert not noisy, f"library noise or a traceback on the console: {noisy}"
  assert "tensorstore_spec" not in errors[0] and "\\n" not in errors[0], (
      f"a library's dump in the error line: {errors[0]}")
  if alone:
    assert lines == errors, f"more than the error line:\n{shown}"


def _main(*args: str, **kwargs) -> subprocess.CompletedProcess:
  return _run("bitnet_jax.main", "--config=configs/tiny.py", *args, **kwargs)


@pytest.mark.parametrize("flag, named", [
    ("--config.train.stepz=5", ("--config.train.stepz=5", "'steps'")),
    ("--config.trian.steps=5", ("--config.trian.steps=5", "'train'")),
    ("--config.train.steps=abc", ("--config.train.steps=abc", "int")),
    ("--workdirr=x", ("--workdirr=x", "workdir")),
])
def test_a_bad_flag_is_one_line_naming_it(flag, named, tmp_path):
  _assert_refused(_main(f"--workdir={tmp_path / 'run'}", flag), *named)


def test_a_variant_of_an_existing_file_gets_past_the_file_check(tmp_path):
  done = _run("bitnet_jax.main", "--config=configs/d20.py:cpu",
              f"--workdir={tmp_path / 'run'}", "--config.train.steps=0")
  _assert_refused(done, "config.train.steps=0")


@pytest.mark.parametrize("config, named", [
    ("configs/nope.py", ("--config=configs/nope.py", "no such config file")),
    ("configs/tiny.py:gpu", ("--config=configs/tiny.py:gpu", "no variants")),
    ("configs/d20.py:nope", ("--config=configs/d20.py:nope",
                             "configs/d20.py:cpu")),
    ("BROKEN", ("broken.py", "SyntaxError")),
])
def test_a_bad_config_file_is_one_line_naming_it(config, named, tmp_path):
  if config == "BROKEN":
    config = str(tmp_path / "broken.py")
    with open(config, "w", encoding="utf-8") as f:
      f.write("def get_config(:\n")
  done = _run("bitnet_jax.main", f"--config={config}",
              f"--workdir={tmp_path / 'run'}")
  _assert_refused(done, *named)


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
  path = tmp_path / "a_file"
  path.write_text("not a directory")
  _assert_refused(_main(f"--workdir={path}"), f"--workdir={path}",
                  "File exists")
  assert path.read_text() == "not a directory", "the file was changed"


def test_an_unwritable_workdir_is_one_line(tmp_path):
  if os.geteuid() != 0:
    workdir = tmp_path / "read_only"
    workdir.mkdir()
    workdir.chmod(0o500)
  else:  # root writes anywhere but in kernel filesystems
    workdir = "/sys/bitnet_jax_test_run"
    try:
      os.mkdir(workdir)
      os.rmdir(workdir)
      pytest.skip("no unwritable directory for root here")
    except OSError:
      pass
  _assert_refused(_main(f"--workdir={workdir}"), f"--workdir={workdir}",
                  "cannot be written")


def test_a_full_data_dir_is_one_line_naming_the_key(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  for i in range(8):
    (corpus / f"doc{i}.txt").write_text(f"def f{i}(x):\n  return x\n" * 400)
  done = _main(f"--workdir={tmp_path / 'run'}",
               f"--config.data.dataset=files:{corpus}/*.txt",
               f"--config.data.data_dir={tmp_path / 'cache'}",
               file_size_limit=4096)
  _assert_refused(done, "config.data.data_dir", "no space left",
                  alone=False)


def test_a_full_workdir_is_one_line_after_training(tmp_path, data_dir):
  workdir = tmp_path / "run"
  done = _main(f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
               "--config.train.steps=20", "--config.train.eval_every=20",
               "--config.train.checkpoint_every=10",
               "--config.optimizer.warmup_steps=2",
               file_size_limit=SMALL_FILE_BYTES)
  _assert_refused(done, "CheckpointSaveError", str(workdir), alone=False)
  assert "step 10/20" in done.stderr, "it failed before training"


def test_a_malformed_metrics_line_is_one_line_naming_the_row(
    trained_run, data_dir, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained_run, workdir)
  metrics = workdir / "metrics.jsonl"
  lines = metrics.read_text().splitlines(keepends=True)
  lines[1] = '{"step": 10, "loss": 5.7 GARBAGE\n'
  metrics.write_text("".join(lines))
  done = _main(f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
               "--config.train.steps=70")
  _assert_refused(done, "metrics.jsonl, line 2", alone=False)
  assert metrics.read_text() == "".join(lines), "metrics.jsonl was changed"


def test_a_malformed_hf_config_is_one_line_naming_the_key(tmp_path):
  folder = tmp_path / "hf"
  folder.mkdir()
  (folder / "config.json").write_text(json.dumps({
      "model_type": "bitnet", "hidden_size": "big", "num_hidden_layers": 2,
      "num_attention_heads": 2, "intermediate_size": 128,
      "vocab_size": 512, "hidden_act": "relu2"}))
  done = _run("bitnet_jax.convert", "import-hf", f"--hf_dir={folder}",
              f"--workdir={tmp_path / 'run'}")
  _assert_refused(done, "hidden_size='big'", str(folder))


def test_generate_without_a_run_is_one_line(tmp_path):
  done = _run("bitnet_jax.generate", f"--workdir={tmp_path / 'missing'}",
              "--prompt=def")
  _assert_refused(done, str(tmp_path / "missing"))


def test_debug_shows_the_traceback(tmp_path):
  done = _main(f"--workdir={tmp_path / 'run'}", "--config.train.stepz=5",
               "--debug")
  assert done.returncode != 0 and "Traceback" in done.stderr, (
      f"--debug hid the traceback:\n{done.stderr[-2000:]}")


def test_a_damaged_checkpoint_is_recovered_in_one_warning_line(
    trained_run, data_dir, tmp_path):
  """The recovery (move aside, restore the previous one) prints one
  WARNING line: none of orbax's, asyncio's or TensorStore's reports of the
  failed read."""
  workdir = tmp_path / "run"
  shutil.copytree(trained_run, workdir)
  newest = max(int(n) for n in os.listdir(workdir / "checkpoints")
               if n.isdigit())
  data_files = [os.path.join(root, name) for root, _, names in os.walk(
      workdir / "checkpoints" / str(newest) / "state") for name in names
      if os.sep + "d" + os.sep in os.path.join(root, name) + os.sep]
  assert data_files, "no array data files to damage"
  for path in data_files:
    with open(path, "r+b") as f:
      f.truncate(100)
  done = _main(f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
               f"--config.train.steps={newest + 10}")
  lines = done.stderr.splitlines()
  assert done.returncode == 0, f"exit {done.returncode}:\n{done.stderr[-3000:]}"
  damaged = [l for l in lines if "is damaged" in l]
  assert len(damaged) == 1 and "TensorStore" not in damaged[0], damaged
  noisy = [l for l in lines if l not in damaged and any(
      word in l for word in NOISE)]
  assert not noisy, f"library noise during the recovery: {noisy[:20]}"
  assert f"run finished: step {newest + 10}/{newest + 10}" in done.stderr, (
      done.stderr[-2000:])
