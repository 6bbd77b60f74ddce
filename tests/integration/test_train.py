"""End to end on the tiny config: learning, metrics, checkpoints, resume."""

import itertools
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import pytest

from bitnet_jax.training import loop, steps

from drivers import REPO, stream_config

TRAIN_KEYS = {"step", "loss", "learning_rate", "weight_decay", "grad_norm",
              "tokens_seen", "tokens_per_sec"}
EVAL_KEYS = {"eval_loss", "eval_accuracy", "unique_predictions", "copy_rate",
             "top_token_share", "prediction_entropy", "health_alarms",
             "attention_rms/0", "attention_rms/1", "ffn_rms/0", "ffn_rms/1",
             *(f"{stat}/{kind}" for stat in ("zero_share", "mean_abs_weight")
               for kind in ("q_proj", "k_proj", "v_proj", "o_proj",
                            "gate_proj", "up_proj", "down_proj"))}


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


class Preempted(Exception):
  pass


def _wrap_train_step(monkeypatch, wrapper):
  """Routes every train step through wrapper(call_index, step, state, window).

  `call_index` counts the steps this run executed, from 0.
  """
  real = steps.make_train_step

  def make(*args, **kwargs):
    step_fn, calls = real(*args, **kwargs), itertools.count()
    return lambda state, window: wrapper(next(calls), step_fn, state, window)

  monkeypatch.setattr(steps, "make_train_step", make)


@pytest.mark.slow
def test_tiny_run_learns_and_logs_every_required_metric(
    trained_run, trained_run_final, tiny_config):
  """The session's run (tests/conftest.py): configs/tiny.py as it ships,
  on the default mesh of all 8 simulated devices."""
  config, final = tiny_config, trained_run_final
  records = _records(trained_run)
  logged = [r for r in records if "loss" in r]
  evals = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in logged] == list(range(10, 61, 10)), "log_every"
  assert [r["step"] for r in evals] == [0, 30, 60], "eval_every + baseline"
  for record in logged:
    assert TRAIN_KEYS <= record.keys(), f"missing {TRAIN_KEYS - record.keys()}"
  for record in evals:
    assert EVAL_KEYS <= record.keys(), f"missing {EVAL_KEYS - record.keys()}"
  assert logged[-1]["tokens_seen"] == 60 * 8 * 32
  assert logged[-1]["loss"] < logged[0]["loss"] - 0.3, "loss did not fall"
  assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.3, (
      "eval loss did not fall")
  with open(os.path.join(trained_run, "samples.jsonl")) as f:
    samples = [json.loads(line) for line in f]
  prompts = config.train.sample_prompts
  assert [s["step"] for s in samples] == [0] * prompts + [30] * prompts + [
      60] * prompts, "samples.jsonl: sample_prompts lines per evaluation"
  assert all(s["continuation"] for s in samples), "empty continuation"
  assert len({s["prompt"] for s in samples}) == prompts, (
      "the prompts must stay the same at every evaluation")
  assert final["eval_loss"] == evals[-1]["eval_loss"]
  assert os.path.isdir(os.path.join(trained_run, "checkpoints", "60")), (
      "no final checkpoint")
  assert os.listdir(os.path.join(trained_run, "tensorboard")), (
      "no TensorBoard events")


@pytest.mark.slow
def test_resumed_run_repeats_the_uninterrupted_losses_exactly(
    tiny_config, tmp_path, monkeypatch):
  """A streamed corpus read in this process (the default worker_count 0):
  the grain stream resumes from the checkpoint. (Grain worker processes
  resuming: test_stream_training.py; the token-file corpus's kill and
  resume: test_resilience.py's chaos run.)"""
  config = tiny_config  # default mesh: all 8 simulated devices
  stream_config(config, str(tmp_path / "corpus"), packing="document")
  config.train.steps, config.train.log_every = 20, 1
  config.train.checkpoint_every, config.train.eval_every = 10, 10
  config.optimizer.warmup_steps = 2
  loop.train_and_evaluate(config, str(tmp_path / "straight"))

  def crash_at_15(index, step, state, window):
    if index == 15:
      raise Preempted("simulated preemption at step 15")
    return step(state, window)

  with monkeypatch.context() as patch:
    _wrap_train_step(patch, crash_at_15)
    with pytest.raises(Preempted):
      loop.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert max(r["step"] for r in _records(tmp_path / "resumed")) >= 14
  executed = []

  def count(index, step, state, window):
    executed.append(index)
    return step(state, window)

  _wrap_train_step(monkeypatch, count)
  loop.train_and_evaluate(config, str(tmp_path / "resumed"))

  assert len(executed) == 10, (
      f"the second run trained {len(executed)} steps: it did not resume "
      "from the step-10 checkpoint")
  straight = {r["step"]: r["loss"] for r in _records(tmp_path / "straight")
              if "loss" in r}
  resumed = [r for r in _records(tmp_path / "resumed") if "loss" in r]
  assert [r["step"] for r in resumed] == list(range(1, 21)), (
      "every step must be logged exactly once across the restart")
  for record in resumed:
    assert record["loss"] == straight[record["step"]], (
        f"step {record['step']}: resumed loss {record['loss']} != "
        f"uninterrupted {straight[record['step']]} (state or data order)")


def _run_main(args: list[str]) -> subprocess.CompletedProcess:
  """Runs `python -m bitnet_jax.main ARGS`, asserting TF is never imported."""
  program = (
      "import runpy, sys\n"
      f"sys.argv = ['bitnet_jax.main'] + {args!r}\n"
      "code = 0\n"
      "try:\n"
      "  runpy.run_module('bitnet_jax.main', run_name='__main__')\n"
      "except SystemExit as e:\n"
      "  code = e.code\n"
      "assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'\n"
      "sys.exit(code)\n")
  return subprocess.run([sys.executable, "-c", program], check=False,
                        cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_command_line_trains_and_never_imports_tensorflow(tmp_path, data_dir):
  workdir = str(tmp_path / "run")
  args = ["--config=configs/tiny.py", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", "--config.train.steps=20",
          "--config.train.eval_every=10", "--config.optimizer.warmup_steps=2"]
  first = _run_main(args)
  assert first.returncode == 0, f"first run failed:\n{first.stderr}"
  assert [r["step"] for r in _records(workdir) if "loss" in r] == [10, 20]

  wider = _run_main(args + ["--config.train.steps=40",
                            "--config.model.d_model=128",
                            "--config.train.allow_config_change=true"])
  assert wider.returncode == 2, f"exit {wider.returncode}:\n{wider.stderr}"
  assert "params/embed_tokens/embedding: checkpoint (512, 64)" in (
      wider.stderr), "the differing arrays are not named"
  assert "Traceback" not in wider.stderr and "strict" not in wider.stderr, (
      f"library tracebacks or advice leaked:\n{wider.stderr[-3000:]}")


def test_a_finished_run_says_so_and_more_steps_resume_it(
    trained_run, tiny_config, tmp_path, caplog):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained_run, workdir)  # 60 steps, finished
  caplog.set_level(logging.INFO)
  loop.train_and_evaluate(tiny_config, workdir)
  assert "is finished" in caplog.text and "final: loss" in caplog.text and (
      "eval_loss" in caplog.text), (
      "a finished run started again must say so and log its final metrics")
  caplog.clear()
  tiny_config.train.steps = 70
  loop.train_and_evaluate(tiny_config, workdir)
  assert "resuming at step 60" in caplog.text, (
      "raising train.steps did not resume the finished run")
  assert "stage boundary" in caplog.text, "no warning about train.steps"
  assert [r["step"] for r in _records(workdir) if "loss" in r][-2:] == [
      60, 70], "steps 61-70 were not logged once"


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_before_a_bad_checkpoint(
    tiny_config, tmp_path, monkeypatch):
  config = tiny_config
  config.train.steps, config.train.log_every = 12, 4
  config.train.checkpoint_every, config.optimizer.warmup_steps = 4, 2
  def nan_from_step_6(index, step, state, window):
    state, out = step(state, window)
    if index >= 5:
      out = {**out, "loss": out["loss"] * float("nan")}
    return state, out

  _wrap_train_step(monkeypatch, nan_from_step_6)
  with pytest.raises(FloatingPointError, match="loss is nan at step 8"):
    loop.train_and_evaluate(config, str(tmp_path))
  saved = sorted(os.listdir(tmp_path / "checkpoints"))
  assert saved == ["4"], f"checkpoints {saved}: a NaN step was saved"


@pytest.mark.slow
def test_a_gpu_or_tpu_run_logs_the_kernels_of_its_compiled_step(
    tiny_config, tmp_path, monkeypatch, caplog):
  """`main` passes `compile_step.describe_compiled`; on a GPU or TPU host
  the loop logs its line for the compiled train step before the first step
  (the CPU stands in for one here), and the run trains as without it."""
  from bitnet_jax.aot import compile_step
  config = tiny_config
  config.train.steps, config.train.log_every = 2, 1
  config.train.eval_every = config.train.checkpoint_every = 2
  config.train.sample_prompts, config.optimizer.warmup_steps = 0, 0
  monkeypatch.setattr(loop, "DESCRIBED_PLATFORMS", ("cpu",))
  described = []

  def describe(text):
    described.append(compile_step.describe_compiled(text, config))
    return described[-1]

  with caplog.at_level(logging.INFO), jax.log_compiles():
    loop.train_and_evaluate(config, str(tmp_path / "run"),
                            describe_step=describe)
  assert len(described) == 1, described
  compiles = [r for r in caplog.records
              if r.getMessage().startswith("Compiling jit(train_step)")]
  assert len(compiles) == 1, (
      "the described step must be the one that runs (JAX reuses the "
      f"executable), not a second compile: {len(compiles)} compiles")
  assert "XLA attention" in described[0] and (
      "BitLinear fake_quant" in described[0]), described
  assert any("compiled train step on" in r.getMessage()
             and described[0] in r.getMessage() for r in caplog.records)
  assert [r["step"] for r in _records(tmp_path / "run") if "loss" in r] == [
      1, 2], "the peeked batch must still train step 1"
