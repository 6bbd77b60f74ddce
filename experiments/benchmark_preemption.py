r"""Measures what a preemption costs: SIGTERM -> exit, and restart -> training.

Starts `python -m bitnet_jax.main` on a fresh workdir, waits until step
`--signal_after` is logged, sends SIGTERM and times the exit (the step in
flight finishes and its checkpoint is saved synchronously), then starts the
same command again and times how long it takes to log "resuming at step N"
(start-up, data, restore; compilation follows). Prints one Markdown table row per config for
experiments/RESULTS.md.

  python experiments/benchmark_preemption.py --config=configs/tiny.py \
      --config=configs/d20.py:cpu
"""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_CONFIGS = flags.DEFINE_multi_string("config", ["configs/tiny.py"],
                                     "config files (with :variant)")
_SIGNAL_AFTER = flags.DEFINE_integer("signal_after", 25,
                                     "send SIGTERM once this step is logged")
_TIMEOUT = flags.DEFINE_float("timeout", 900.0, "seconds per phase at most")


def _logged_steps(workdir: str) -> list[int]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  steps = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue  # being written
      if "loss" in record:
        steps.append(record["step"])
  return steps


def _wait(predicate, process, what: str) -> float:
  """Polls until predicate(); returns the time it took (seconds)."""
  start = time.perf_counter()
  while not predicate():
    if process.poll() is not None:
      raise RuntimeError(f"the run exited ({process.returncode}) before {what}")
    if time.perf_counter() - start > _TIMEOUT.value:
      process.kill()
      raise TimeoutError(f"no {what} within {_TIMEOUT.value} s")
    time.sleep(0.01)
  return time.perf_counter() - start


def measure(config: str) -> dict:
  """SIGTERM-to-exit and restart-to-restored times of one config."""
  workdir = tempfile.mkdtemp(prefix="preemption_")
  command = [sys.executable, "-m", "bitnet_jax.main", f"--config={config}",
             f"--workdir={workdir}", "--config.train.checkpoint_every=100000"]
  first_log = os.path.join(workdir, "first.log")
  with open(first_log, "w") as log:  # the child keeps its own descriptor
    first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
  _wait(lambda: any(s >= _SIGNAL_AFTER.value for s in _logged_steps(workdir)),
        first, f"step {_SIGNAL_AFTER.value}")
  sent = time.perf_counter()
  first.send_signal(signal.SIGTERM)
  first.wait(timeout=_TIMEOUT.value)
  stop_seconds = time.perf_counter() - sent
  with open(first_log) as f:
    stopped = re.findall(r"stopped after step (\d+); saved", f.read())
  step = int(stopped[0]) if stopped else None
  saved = step is not None and os.path.isdir(
      os.path.join(workdir, "checkpoints", str(step)))

  second_log = os.path.join(workdir, "second.log")

  def resumed() -> bool:
    with open(second_log) as f:
      return f"resuming at step {step}" in f.read()

  start = time.perf_counter()
  with open(second_log, "w") as out:
    second = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
  _wait(resumed, second, f"'resuming at step {step}'")
  restart_seconds = time.perf_counter() - start
  second.send_signal(signal.SIGTERM)
  second.wait(timeout=_TIMEOUT.value)
  return {"config": config, "exit_code": first.returncode, "step": step,
          "checkpoint_saved": saved, "stop_seconds": stop_seconds,
          "restart_seconds": restart_seconds}


def main(argv):
  del argv
  print("| config | stopped after step | exit status | checkpoint of the "
        "step in flight | SIGTERM -> exit (s) | restart -> checkpoint "
        "restored (s) |")
  print("|---|---|---|---|---|---|")
  for config in _CONFIGS.value:
    r = measure(config)
    print(f"| `{r['config']}` | {r['step']} | {r['exit_code']} | "
          f"{'saved' if r['checkpoint_saved'] else 'MISSING'} | "
          f"{r['stop_seconds']:.2f} | {r['restart_seconds']:.1f} |",
          flush=True)


if __name__ == "__main__":
  app.run(main)
