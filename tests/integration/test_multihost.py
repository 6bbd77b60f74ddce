"""Two processes over loopback (jax.distributed) train like one process.

Each worker has 1 simulated CPU device, so every step's collectives cross
the process boundary; the single-process reference in this pytest process
runs the same global batch data-parallel over its 8 devices. The
full-precision architecture is used so that the comparison is not blurred
by ternary rounding flips (see test_sharded_training.py).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

from bitnet_jax import data
from bitnet_jax.training import loop

from drivers import Driver, free_port, stream_config

WORKER = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
sys.path.insert(0, "tests")
import drivers
config = drivers.load_config("configs/tiny.py", {overrides!r})
config.distributed.initialize = True
config.distributed.coordinator_address = "127.0.0.1:{port}"
config.distributed.num_processes = 2
config.distributed.process_id = int(sys.argv[1])
from absl import logging
logging.set_verbosity(logging.INFO)  # as app.run does in bitnet_jax.main
from bitnet_jax.distributed import sharding
from bitnet_jax.training import loop
sharding.initialize_distributed(config)
import jax
assert jax.process_count() == 2 and jax.device_count() == 2
drivers.slow_train_steps({sleep})
loop.train_and_evaluate(config, {workdir!r})
"""


def _start_workers(overrides: dict, workdir: str,
                   sleep: float = 0.0) -> list[Driver]:
  program = WORKER.format(overrides=overrides, port=free_port(),
                          workdir=workdir, sleep=sleep)
  launch = time.monotonic_ns()
  return [Driver(program, f"{workdir}-worker{i}-{launch}.log", [i],
                 unset=["XLA_FLAGS"]) for i in range(2)]


def _run_workers(overrides: dict, workdir: str, workers: list | None = None,
                 fail: bool = False) -> list[str]:
  """Waits for both workers; each must exit 0 (with `fail`: not 0)."""
  workers = workers or _start_workers(overrides, workdir)
  logs = []
  for worker in workers:
    try:
      logs.append(worker.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
      for w in workers:
        w.kill()
      pytest.fail("multi-host workers timed out")
  for i, (worker, log) in enumerate(zip(workers, logs)):
    assert (worker.returncode != 0) == fail, (
        f"worker {i} exited {worker.returncode}:\n{log[-4000:]}")
  return logs


def _overrides(data_dir: str, **changes) -> dict:
  """The workers' config: the tiny full-precision model, 6 steps logged
  every step, with `changes` ({"section__field": value}) on top."""
  overrides = {"data.data_dir": data_dir, "model.quantization": "none",
               "train.steps": 6, "train.log_every": 1, "train.eval_every": 3,
               "train.checkpoint_every": 3, "optimizer.warmup_steps": 2}
  overrides.update({k.replace("__", "."): v for k, v in changes.items()})
  return overrides


def _assert_each_host_saved(workdir: str, step) -> None:
  """Both processes wrote their data iterator's state in checkpoint `step`."""
  saved = os.path.join(workdir, "checkpoints", str(step), "data")
  states = sorted(n for n in os.listdir(saved) if n.endswith(".json"))
  assert states == ["process_0-of-2.json", "process_1-of-2.json"], (
      f"not both hosts saved their data position at step {step}: {states}")


def _losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: r.get("loss", r.get("eval_loss")) for r in records}


@pytest.mark.slow
def test_two_processes_match_one_process_and_halt_together_on_an_alarm(
    tiny_config, tmp_path):
  """Up to the alarm at step 3's evaluation (frequency_collapse at once: any
  top-token share > 0.01, no grace period, `halt_on_alarm`) the two
  processes log the 1-process run's losses; then every host stops there
  with its data position saved.

  (That each host resumes its own data position: the streaming test below;
  that a signal to one host stops all: the SIGTERM test.)
  """
  overrides = _overrides(tiny_config.data.data_dir)
  for key, value in overrides.items():
    section, field = key.split(".")
    tiny_config[section][field] = value
  loop.train_and_evaluate(tiny_config, str(tmp_path / "one_process"))

  alarm = _overrides(
      tiny_config.data.data_dir, train__checkpoint_every=6,
      health__halt_on_alarm=True, health__grace_steps=0,
      health__grace_fraction=0.0, health__patience=1,
      health__max_top_token_share=0.01)
  workdir = str(tmp_path / "two_processes")
  logs = _run_workers(alarm, workdir, fail=True)
  for i, log in enumerate(logs):
    assert "HealthAlarmError: step 3:" in log, (
        f"worker {i} did not halt on the alarm at step 3:\n{log[-3000:]}")
  _assert_each_host_saved(workdir, 3)
  single, multi = _losses(str(tmp_path / "one_process")), _losses(workdir)
  assert sorted(multi) == [0, 1, 2, 3], f"steps logged before the halt: {multi}"
  np.testing.assert_allclose(
      [multi[s] for s in sorted(multi)], [single[s] for s in sorted(multi)],
      rtol=1e-5, err_msg="2-process losses differ from the 1-process run")


def _truncate_metrics(workdir: str, last_step: int) -> None:
  """Keeps the metric lines of steps <= last_step (as a resume would)."""
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    lines = [line for line in f if json.loads(line)["step"] <= last_step]
  with open(path, "w") as f:
    f.writelines(lines)


@pytest.mark.slow
def test_two_hosts_resume_their_own_stream_positions_and_stop_together(
    tiny_config, tmp_path):
  """A streamed corpus, each host reading its own files: 16 steps
  uninterrupted; then a copy of that run from its step-4 checkpoint, in
  which SIGTERM (a scheduler preempting one host) reaches host 1 only."""
  corpus = stream_config(tiny_config, str(tmp_path / "corpus"),
                         packing="document").data
  overrides = {f"data.{key}": corpus[key] for key in (
      "dataset", "eval_dataset", "data_dir", "shuffle_buffer_size",
      "read_concurrency", "packing")}
  overrides.update({"train.steps": 16, "train.log_every": 1,
                    "train.eval_every": 16, "train.checkpoint_every": 4,
                    "train.keep_checkpoints": 4, "optimizer.warmup_steps": 1})
  data.prepare(tiny_config)  # the BPE is trained once, before the workers
  straight = str(tmp_path / "straight")
  _run_workers(overrides, straight)
  uninterrupted = _losses(straight)
  saved = os.path.join(straight, "checkpoints", "4", "data")
  states = []
  for process in range(2):
    with open(os.path.join(saved, f"process_{process}-of-2.json")) as f:
      states.append(f.read())
  assert states[0] != states[1], "both hosts saved the same stream position"

  workdir = str(tmp_path / "resumed")
  shutil.copytree(straight, workdir)
  for step in os.listdir(os.path.join(workdir, "checkpoints")):
    if step.isdigit() and int(step) > 4:
      shutil.rmtree(os.path.join(workdir, "checkpoints", step))
  _truncate_metrics(workdir, 4)
  workers = _start_workers(overrides, workdir, sleep=0.2)
  deadline = time.monotonic() + 120
  while max(_losses(workdir)) < 6:
    assert time.monotonic() < deadline, "the workers never reached step 6"
    assert all(w.poll() is None for w in workers), "a worker died early"
    time.sleep(0.1)
  workers[1].send_signal(signal.SIGTERM)
  logs = _run_workers(overrides, workdir, workers)  # both must exit 0
  for i, log in enumerate(logs):
    assert "resuming at step 4 " in log, f"worker {i} did not resume:\n{log}"
  steps = [re.findall(r"stopped after step (\d+)", log) for log in logs]
  assert all(len(s) == 1 for s in steps), f"each host must stop once: {steps}"
  assert steps[0] == steps[1], f"hosts stopped at different steps: {steps}"
  stopped = int(steps[0][0])
  assert 6 <= stopped < 16, f"stopped after step {stopped}, not mid-run"
  _assert_each_host_saved(workdir, stopped)
  resumed = _losses(workdir)
  assert sorted(resumed) == list(range(stopped + 1)), (
      f"steps 5-{stopped} not logged once: {sorted(resumed)}")
  assert [resumed[s] for s in range(5, stopped + 1)] == [
      uninterrupted[s] for s in range(5, stopped + 1)], (
          "after the resume the hosts trained on other batches than before")
