"""Surviving a cluster: signals, kills, a second writer, bad disks, changes.

Real processes and real signals where the property is about processes: a
driver process (`drivers.Driver`) trains the tiny config with a short sleep
in every step, so that a signal lands mid-run.
"""

import json
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import time

import pytest

from bitnet_jax.runs import checkpoint, identity, lock
from bitnet_jax.training import guards, loop, steps

import drivers

TIMING_KEYS = {"tokens_per_sec", "steps_per_sec", "step_time_ms",
               "eta_seconds", "mfu"}
DRIVER = """
import resource, signal, sys
sys.path.insert(0, "tests")
import drivers
from absl import logging
logging.set_verbosity(logging.INFO)
from bitnet_jax import data
from bitnet_jax.training import loop
config = drivers.load_config("configs/tiny.py", {overrides!r})
drivers.slow_train_steps({sleep})
if {file_limit}:
  data.prepare(config)  # caches exist already; only checkpoints grow
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, as a full disk
  resource.setrlimit(resource.RLIMIT_FSIZE, ({file_limit}, {file_limit}))
loop.train_and_evaluate(config, {workdir!r})
"""


def _overrides(data_dir: str, **extra) -> dict:
  overrides = {"data.data_dir": data_dir, "train.steps": 24,
               "train.log_every": 1, "train.eval_every": 8,
               "train.checkpoint_every": 4, "optimizer.warmup_steps": 2}
  overrides.update({k.replace("__", "."): v for k, v in extra.items()})
  return overrides


def _start(workdir, overrides, sleep=0.05, file_limit=0) -> drivers.Driver:
  """A driver training in `workdir`; its output beside it, one file each."""
  return drivers.Driver(
      DRIVER.format(overrides=overrides, workdir=str(workdir), sleep=sleep,
                    file_limit=file_limit),
      log=f"{workdir}-driver-{time.monotonic_ns()}.log")


def _records(workdir) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.read().splitlines()
  records = []
  for line in lines:
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      pass  # a line being written right now
  return records


def _wait_for_step(process, workdir, step: int, timeout: float = 120) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if any(r["step"] >= step for r in _records(workdir) if "loss" in r):
      return
    if process.poll() is not None:
      pytest.fail(f"the run ended before step {step}:\n"
                  f"{process.output()[-3000:]}")
    time.sleep(0.02)
  process.kill()
  pytest.fail(f"step {step} was not logged within {timeout} s")


def _finish(process, timeout: float = 120) -> tuple[int, str]:
  try:
    output, _ = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    pytest.fail(f"the process did not exit within {timeout} s (a hang)")
  return process.returncode, output


def _comparable(records: list[dict]) -> dict:
  merged = {}
  for record in records:
    merged.setdefault(record["step"], {}).update(
        {k: v for k, v in record.items() if k not in TIMING_KEYS})
  return merged


@pytest.mark.slow
def test_a_second_signal_exits_at_once(tmp_path, data_dir):
  process = _start(tmp_path, _overrides(data_dir, train__steps=200,
                                        train__checkpoint_every=100),
                   sleep=2.0)
  _wait_for_step(process, tmp_path, 1)
  process.send_signal(signal.SIGTERM)
  time.sleep(0.3)  # inside the 2 s step: the first signal waits for it
  process.send_signal(signal.SIGTERM)
  code, output = _finish(process, timeout=10)
  assert code == 128 + signal.SIGTERM, (
      f"exit status {code}, want {128 + signal.SIGTERM}:\n{output[-2000:]}")


@pytest.fixture(scope="module")
def chaos(tmp_path_factory, data_dir) -> dict:
  """One run of 24 steps killed, stopped and restarted five times in
  driver processes, and the same run uninterrupted in this process.

  The plan, at random steps (the seed and the steps are in every message):
  SIGKILL before the first checkpoint, SIGTERM, SIGKILL, SIGINT, then a
  launch that finishes. While the SIGTERM launch runs, this process tries
  to train in the same workdir (a second writer). Returns what the tests
  below check: {"straight", "workdir", "plan", "stops", "kills",
  "launches", "second_writer"}.
  """
  root = tmp_path_factory.mktemp("chaos")
  overrides = _overrides(data_dir)
  loop.train_and_evaluate(drivers.load_config("configs/tiny.py", overrides),
                          str(root / "straight"))
  workdir = root / "chaos"
  rng = random.Random(os.getpid())  # random points; the seed is in messages
  plan = [(signal.SIGKILL, rng.randint(1, 3)),  # before the first checkpoint
          (signal.SIGTERM, rng.randint(5, 9)),
          (signal.SIGKILL, rng.randint(11, 15)),
          (signal.SIGINT, rng.randint(17, 21))]
  stops, kills, launches, second_writer = [], [], [], {}
  for signum, at_step in plan:
    before = max((r["step"] for r in _records(workdir)), default=0)
    process = _start(workdir, overrides)
    _wait_for_step(process, workdir, max(at_step, before + 1))
    if signum == signal.SIGTERM:
      try:
        loop.train_and_evaluate(drivers.load_config("configs/tiny.py",
                                                    overrides), str(workdir))
      except lock.WorkdirLockedError as e:
        second_writer["error"] = str(e)
      second_writer.update(pid=process.pid,
                           history=identity.read_history(str(workdir)))
    sent = time.monotonic()
    process.send_signal(signum)
    code, output = _finish(process)
    launches.append(output)
    if signum == signal.SIGKILL:
      saved = [int(n) for n in os.listdir(workdir / "checkpoints")
               if n.isdigit()]
      kills.append({"launch": len(launches) - 1,
                    "latest": max(saved, default=0)})
    else:
      stops.append({"signal": signum.name, "code": code, "output": output,
                    "seconds": time.monotonic() - sent,
                    "launch": len(launches) - 1,
                    "checkpoints": os.listdir(workdir / "checkpoints"),
                    "logged": [r["step"] for r in _records(workdir)
                               if "loss" in r]})
  code, output = _finish(_start(workdir, overrides))
  assert code == 0, f"the final run failed (plan {plan}):\n{output[-3000:]}"
  launches.append(output)
  return {"straight": _comparable(_records(root / "straight")),
          "workdir": workdir, "plan": plan, "stops": stops, "kills": kills,
          "launches": launches, "second_writer": second_writer}


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_the_step_in_flight_and_exits_zero(chaos, signum):
  stop = next(s for s in chaos["stops"] if s["signal"] == signum.name)
  output, plan = stop["output"], chaos["plan"]
  assert stop["code"] == 0, (
      f"exit status {stop['code']} after {signum.name} (plan {plan}):\n"
      f"{output[-3000:]}")
  assert stop["seconds"] < 30, "stopping took longer than seconds"
  stopped = re.findall(r"stopped after step (\d+); saved", output)
  assert len(stopped) == 1, f"want one line naming the step:\n{output[-3000:]}"
  step = int(stopped[0])
  assert str(step) in stop["checkpoints"], (
      f"no checkpoint of step {step}, the step in flight (plan {plan}): "
      f"{stop['checkpoints']}")
  assert stop["logged"] == list(range(1, step + 1)), (
      f"metrics were not flushed up to step {step}: {stop['logged']}")
  after = chaos["launches"][stop["launch"] + 1]
  assert f"resuming at step {step} " in after, (
      f"the next launch did not resume from step {step}:\n{after[-3000:]}")


@pytest.mark.slow
def test_chaos_kills_and_signals_change_no_logged_value(chaos):
  records, plan = _records(chaos["workdir"]), chaos["plan"]
  steps = [r["step"] for r in records if "loss" in r]
  assert steps == list(range(1, 25)), f"steps logged {steps} (plan {plan})"
  assert [r["step"] for r in records if "eval_loss" in r] == [0, 8, 16, 24], (
      f"evaluations duplicated or lost (plan {plan})")
  assert _comparable(records) == chaos["straight"], (
      f"a logged value differs from the uninterrupted run (plan {plan})")
  for kill in chaos["kills"]:  # not from scratch: from the latest checkpoint
    after = chaos["launches"][kill["launch"] + 1]
    want = (f"resuming at step {kill['latest']} " if kill["latest"] else
            "starting at step 0 ")
    assert want in after, (
        f"after a SIGKILL the next launch did not say {want!r} (plan "
        f"{plan}):\n{after[-3000:]}")


@pytest.mark.slow
def test_a_second_writer_on_a_workdir_is_refused_naming_the_holder(chaos):
  refused = chaos["second_writer"]
  assert "error" in refused, (
      "a second trainer of a workdir in use was not refused "
      f"(plan {chaos['plan']})")
  assert f"pid {refused['pid']}" in refused["error"], refused["error"]
  starts = [entry["pid"] for entry in refused["history"]]
  assert starts[-1] == refused["pid"] and os.getpid() not in starts, (
      f"the refused start was recorded as a start of the run: {starts}")


@pytest.mark.slow
def test_a_failed_background_save_stops_the_run_naming_path_and_cause(
    tmp_path, data_dir):
  process = _start(tmp_path, _overrides(data_dir, train__steps=12), sleep=0.0,
                   file_limit=200_000)
  code, output = _finish(process)
  assert code != 0, "the run went on after its checkpoint failed"
  assert "CheckpointSaveError" in output and "File too large" in output, (
      output[-3000:])
  assert str(tmp_path / "checkpoints") in output, "the path is not named"

  # the restart, without the file size limit (here: no process start)
  loop.train_and_evaluate(drivers.load_config(
      "configs/tiny.py", _overrides(data_dir, train__steps=12)), str(tmp_path))
  leftovers = [n for n in os.listdir(tmp_path / "checkpoints") if "tmp" in n]
  assert not leftovers, f"partial checkpoint directories left: {leftovers}"


def _short_run(config, steps=8):
  config.train.steps, config.train.log_every = steps, 2
  config.train.eval_every = config.train.checkpoint_every = 4
  config.optimizer.warmup_steps = 2
  return config


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, data_dir) -> str:
  """_short_run's 8 steps of the tiny config, trained once for the module;
  tests copy it (`_copy`) before they change it."""
  workdir = str(tmp_path_factory.mktemp("short_run"))
  loop.train_and_evaluate(_short_run(drivers.load_config(
      "configs/tiny.py", {"data.data_dir": data_dir})), workdir)
  return workdir


def _copy(run: str, tmp_path) -> str:
  workdir = str(tmp_path / "run")
  shutil.copytree(run, workdir)
  return workdir


@pytest.mark.slow
def test_a_resume_with_another_learning_rate_is_refused_and_writes_nothing(
    tiny_config, short_run, tmp_path):
  workdir = _copy(short_run, tmp_path)
  files = {n: pathlib.Path(workdir, n).read_bytes()
           for n in ("config.json", "metrics.jsonl")}
  _short_run(tiny_config, steps=12)
  tiny_config.optimizer.learning_rate = 3e-3
  with pytest.raises(identity.RunIdentityError,
                     match=r"config\.optimizer\.learning_rate: 0\.0015 -> "
                     r"0\.003"):
    loop.train_and_evaluate(tiny_config, workdir)
  for name, content in files.items():
    assert pathlib.Path(workdir, name).read_bytes() == content, (
        f"{name} was changed")


@pytest.mark.slow
def test_a_forced_resume_into_another_model_size_names_each_array(
    tiny_config, short_run, tmp_path, capfd):
  workdir = _copy(short_run, tmp_path)
  _short_run(tiny_config, steps=12)
  tiny_config.model.d_model = 128
  tiny_config.train.allow_config_change = True
  capfd.readouterr()
  with pytest.raises(checkpoint.CheckpointMismatchError) as caught:
    loop.train_and_evaluate(tiny_config, workdir)
  lines = str(caught.value).splitlines()
  assert any(line.strip().startswith("params/embed_tokens/embedding: "
                                     "checkpoint (512, 64)") for line in lines)
  assert "strict" not in str(caught.value)
  assert "Traceback" not in capfd.readouterr().err, (
      "library tracebacks were printed")


@pytest.mark.slow
def test_a_run_whose_checkpoints_all_fail_keeps_its_history(
    tiny_config, short_run, tmp_path):
  """Refused without train.start_over_if_unrestorable, nothing changed;
  with it, trained again from step 0, the old files kept aside."""
  workdir = _copy(short_run, tmp_path)
  for step in os.listdir(os.path.join(workdir, "checkpoints")):
    shutil.rmtree(os.path.join(workdir, "checkpoints", step, "state"))
  history = {n: pathlib.Path(workdir, n).read_bytes()
             for n in ("metrics.jsonl", "samples.jsonl")}
  _short_run(tiny_config, steps=12)
  with pytest.raises(checkpoint.UnrestorableRunError,
                     match="start_over_if_unrestorable"):
    loop.train_and_evaluate(tiny_config, workdir)
  with pytest.raises(checkpoint.UnrestorableRunError):  # the damaged ones
    loop.train_and_evaluate(tiny_config, workdir)  # are aside: still refused
  for name, content in history.items():
    assert pathlib.Path(workdir, name).read_bytes() == content, (
        f"{name} changed although the run refused to start over")

  tiny_config.train.start_over_if_unrestorable = True
  loop.train_and_evaluate(tiny_config, workdir)
  kept = list(pathlib.Path(workdir, "damaged_checkpoints").glob("history-*"))
  assert len(kept) == 1, f"the old history was not kept aside: {kept}"
  for name, content in history.items():
    assert (kept[0] / name).read_bytes() == content, f"{name} was not kept"
  assert (kept[0] / "tensorboard").is_dir(), "tensorboard/ was not kept"
  steps = [r["step"] for r in _records(workdir) if "loss" in r]
  assert steps == [2, 4, 6, 8, 10, 12], f"not trained again: {steps}"


@pytest.mark.slow
def test_a_diverged_run_stops_before_checkpointing_the_diverged_state(
    tiny_config, tmp_path, monkeypatch):
  config = _short_run(tiny_config, steps=20)
  config.train.divergence_patience = 2
  real = steps.make_train_step

  def exploding(*args, **kwargs):
    step_fn = real(*args, **kwargs)

    def run(state, window):
      state, out = step_fn(state, window)
      if int(state.step) > 9:  # finite, but 1e6 times larger
        out = {**out, "loss": out["loss"] * 1e6, "nll": out["nll"] * 1e6}
      return state, out
    return run

  monkeypatch.setattr(steps, "make_train_step", exploding)
  with pytest.raises(guards.DivergenceError, match="diverged"):
    loop.train_and_evaluate(config, str(tmp_path))
  saved = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=3)
  assert saved.all_steps() == [4, 8], (
      f"checkpoints {saved.all_steps()}: a diverged state was saved")
  saved.close()


@pytest.mark.slow
def test_a_half_written_metrics_line_does_not_stop_the_restart(
    tiny_config, short_run, tmp_path):
  workdir = _copy(short_run, tmp_path)
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 9, "lo')
  loop.train_and_evaluate(_short_run(tiny_config, steps=12), workdir)
  steps = [r["step"] for r in _records(workdir) if "loss" in r]
  assert steps == [2, 4, 6, 8, 10, 12], steps


@pytest.mark.slow
def test_tokens_seen_stays_true_across_a_forced_batch_size_change(
    tiny_config, short_run, tmp_path):
  workdir = _copy(short_run, tmp_path)
  _short_run(tiny_config, steps=12)
  tiny_config.train.batch_size = 16
  tiny_config.train.allow_config_change = True
  final = loop.train_and_evaluate(tiny_config, workdir)
  assert final["tokens_seen"] == 8 * 8 * 32 + 4 * 16 * 32, (
      f"tokens_seen {final['tokens_seen']}: the tokens of the first 8 steps "
      "(batch 8) were recounted at the new batch size")
  history = identity.read_history(workdir)
  assert history[-1]["overrode_refusal"], "the override was not recorded"
