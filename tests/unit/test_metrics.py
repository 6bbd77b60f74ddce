"""Collapse diagnostics and metric files."""

import json
import logging
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tensorboardX.proto import event_pb2

from bitnet_jax import metrics
from bitnet_jax.config import base_config
from bitnet_jax.model import transformer as model_lib

from drivers import next_token_loss, params_of


def _stats_for(predictions, inputs, targets, vocab=10):
  return jax.device_get(metrics.prediction_statistics(
      jnp.asarray(predictions), jnp.asarray(inputs), jnp.asarray(targets),
      vocab))


def test_collapse_diagnostics_on_a_known_prediction_pattern():
  inputs = [[1, 2, 3, 4], [5, 6, 7, 8]]
  targets = [[2, 3, 4, 5], [6, 7, 8, 9]]
  predictions = [[1, 3, 0, 0], [0, 0, 7, 8]]
  # copies (== input): (0,0)=1, (1,2)=7, (1,3)=8 -> 3 of 8
  # correct (== target): (0,1)=3 -> 1 of 8
  # distinct predictions {0, 1, 3, 7, 8} -> 5; token 0 predicted 4 of 8
  stats = _stats_for(predictions, inputs, targets)
  summary = metrics.summarize_eval({**stats, "loss_sum": 8.0})
  assert summary["unique_predictions"] == 5, summary
  assert summary["copy_rate"] == pytest.approx(3 / 8), summary
  assert summary["eval_accuracy"] == pytest.approx(1 / 8), summary
  assert summary["top_token_share"] == pytest.approx(4 / 8), summary
  assert summary["eval_loss"] == pytest.approx(1.0), summary


def test_a_copying_model_has_copy_rate_one():
  inputs = np.arange(12).reshape(2, 6) % 10
  stats = _stats_for(inputs, inputs, (inputs + 1) % 10)
  summary = metrics.summarize_eval({**stats, "loss_sum": 0.0})
  assert summary["copy_rate"] == 1.0 and summary["eval_accuracy"] == 0.0


def test_sums_over_batches_count_distinct_tokens_over_the_whole_set():
  a = _stats_for([[1, 1]], [[0, 0]], [[0, 0]])
  b = _stats_for([[2, 2]], [[0, 0]], [[0, 0]])
  total = jax.tree.map(np.add, a, b)
  summary = metrics.summarize_eval({**total, "loss_sum": 0.0})
  assert summary["unique_predictions"] == 2, "distinct tokens across batches"
  assert summary["top_token_share"] == pytest.approx(0.5)


def test_writer_appends_json_lines_and_tensorboard_events(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write(1, {"loss": 2.5})
  writer.write(2, {"loss": np.float32(2.0), "unique_predictions": 7})
  writer.close()
  with open(tmp_path / "metrics.jsonl") as f:
    lines = [json.loads(x) for x in f]
  assert lines == [{"step": 1, "loss": 2.5},
                   {"step": 2, "loss": 2.0, "unique_predictions": 7}]
  events = os.listdir(tmp_path / "tensorboard")
  assert any(name.startswith("events.out.tfevents") for name in events)


def test_writer_drops_records_past_the_resume_step(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  for step in (10, 20, 30):
    writer.write(step, {"loss": float(step)})
  writer.close()
  metrics.MetricWriter(str(tmp_path), resume_step=20).close()
  with open(tmp_path / "metrics.jsonl") as f:
    steps = [json.loads(x)["step"] for x in f]
  assert steps == [10, 20], "records after the restored step must go"


def _write_lines(workdir, *lines):
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write("".join(lines))


def _steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(x)["step"] for x in f]


def _tensorboard_events(workdir):
  """Every Event in workdir/tensorboard, read from the TFRecord framing."""
  events = []
  directory = os.path.join(workdir, "tensorboard")
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
    offset = 0
    while offset < len(data):  # uint64 length, uint32 crc, data, uint32 crc
      (length,) = struct.unpack("<Q", data[offset:offset + 8])
      start = offset + 12
      events.append(event_pb2.Event.FromString(data[start:start + length]))
      offset = start + length + 4
  return events


def test_half_written_last_line_is_dropped_with_a_warning(tmp_path, caplog):
  _write_lines(tmp_path, '{"step": 5, "loss": 2.0}\n',
               '{"step": 6, "loss": 1.9}\n', '{"step": 7, "lo')
  with caplog.at_level(logging.WARNING):
    metrics.MetricWriter(str(tmp_path), resume_step=9).close()
  assert _steps(tmp_path) == [5, 6], "the cut-off line was not dropped"
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING]
  assert any("metrics.jsonl" in w and '{"step": 7, "lo' in w
             for w in warnings), f"no warning names the file/line: {warnings}"


def test_record_after_a_last_line_without_newline_starts_a_new_line(
    tmp_path):
  _write_lines(tmp_path, '{"step": 5, "loss": 2.0}')  # killed before "\n"
  writer = metrics.MetricWriter(str(tmp_path), resume_step=5)
  writer.write(6, {"loss": 1.9})
  writer.close()
  assert _steps(tmp_path) == [5, 6], "the new record was glued to the last"


def test_corrupt_line_before_the_last_raises_naming_file_and_line(tmp_path):
  _write_lines(tmp_path, '{"step": 5, "loss": 2.0}\n', '{"step": 6, "lo\n',
               '{"step": 7, "loss": 1.8}\n')
  with pytest.raises(ValueError) as error:
    metrics.MetricWriter(str(tmp_path), resume_step=9)
  message = str(error.value)
  assert str(tmp_path / "metrics.jsonl") in message, message
  assert "line 2" in message and "delete" in message, message


def test_fresh_start_drops_every_earlier_line(tmp_path):
  _write_lines(tmp_path, '{"step": 0, "eval_loss": 9.0}\n')
  metrics.MetricWriter(str(tmp_path), resume_step=0).close()
  assert _steps(tmp_path) == [], "a start without checkpoint kept old lines"


@pytest.mark.parametrize("resume_step,purge_step", [(20, 21), (0, 0)])
def test_tensorboard_purges_points_after_the_resume_step(tmp_path,
                                                         resume_step,
                                                         purge_step):
  metrics.MetricWriter(str(tmp_path), resume_step=resume_step).close()
  starts = [e.step for e in _tensorboard_events(tmp_path)
            if e.HasField("session_log")
            and e.session_log.status == event_pb2.SessionLog.START]
  assert starts == [purge_step], (
      f"SessionLog START steps {starts}, want [{purge_step}]: TensorBoard "
      f"would keep points logged after step {resume_step}")


def test_read_records_skips_a_half_written_last_line(tmp_path):
  _write_lines(tmp_path, '{"step": 5, "loss": 2.0}\n', '{"step": 6, "lo')
  assert metrics.read_records(str(tmp_path)) == [{"step": 5, "loss": 2.0}], (
      "read_records did not return the complete lines only")


def test_read_records_of_a_run_without_metrics_is_empty(tmp_path):
  assert metrics.read_records(str(tmp_path)) == [], "missing file not []"


def test_final_metrics_merges_every_record_of_the_step(tmp_path):
  _write_lines(tmp_path, '{"step": 10, "loss": 2.0}\n',
               '{"step": 20, "loss": 1.5}\n',
               '{"step": 20, "eval_loss": 1.7}\n')
  assert metrics.final_metrics(str(tmp_path), 20) == {
      "step": 20, "loss": 1.5, "eval_loss": 1.7}, "step 20 not merged"


class _Clock:
  """A clock the test advances by hand."""

  def __init__(self):
    self.now = 100.0

  def perf_counter(self):
    return self.now


class _QueuedSteps:
  """Train steps dispatched but still computing: a state leaf whose
  `block_until_ready` takes the queue's seconds on the test's clock."""

  def __init__(self, clock: _Clock, seconds: float):
    self.clock, self.seconds = clock, seconds

  def block_until_ready(self):
    self.clock.now += self.seconds
    self.seconds = 0.0
    return self


def test_throughput_measures_rates_and_eta_on_a_known_clock():
  clock = _Clock()
  throughput = metrics.Throughput(tokens_per_step=100, total_steps=50,
                                  clock=clock.perf_counter)
  assert throughput.measure(5) == {}, "a rate before start()"
  throughput.start(0)
  clock.now += 2.0  # steps 1..10 in 2 s
  rates = throughput.measure(10)
  expected = {"steps_per_sec": 5.0, "step_time_ms": 200.0,
              "tokens_per_sec": 500.0, "eta_seconds": 8.0}  # 40 steps left
  assert rates == pytest.approx(expected), f"rates {rates}, want {expected}"
  with throughput.paused():
    clock.now += 60.0  # an evaluation: not training time
  clock.now += 1.0  # steps 11..20 in 1 s
  rates = throughput.measure(20)
  assert rates["steps_per_sec"] == pytest.approx(10.0), (
      f"{rates}: the paused minute was counted as training time")
  assert (throughput.timed_steps, throughput.timed_seconds) == (
      20, pytest.approx(3.0)), "the run's timed totals are off"


def test_an_evaluated_step_reports_the_train_steps_speed_not_the_queues():
  """Steps queued on the device when an evaluation starts finish on the
  training clock; the evaluation's minute is not training time."""
  from bitnet_jax.training.actions import Evaluation, StepDone  # pylint: disable=g-import-not-at-top
  clock = _Clock()
  throughput = metrics.Throughput(tokens_per_step=100, total_steps=100,
                                  clock=clock.perf_counter)
  throughput.start(0)
  clock.now += 1.0  # steps 1..10: 0.1 s each, read at a log step
  logged = throughput.measure(10)

  def evaluate(params, step):
    del params, step
    clock.now += 60.0  # a long evaluation
    return {"eval_loss": 1.0}
  evaluation = Evaluation(10, evaluate, lambda params, step: [],
                          lambda step, samples: None, throughput)
  clock.now += 0.2  # steps 11, 12 done; 13..20 dispatched, still queued
  state = _QueuedSteps(clock, seconds=0.8)
  state.params = None
  evaluation(StepDone(20, state, metrics={}))
  evaluated = throughput.measure(20)
  assert evaluated["step_time_ms"] == pytest.approx(
      logged["step_time_ms"], rel=1e-6), (
      f"evaluated step {evaluated}, log step {logged}: the queued steps' "
      "time went into the evaluation's pause (or the pause into training)")
  assert evaluated["eta_seconds"] == pytest.approx(8.0), evaluated
  assert throughput.summary(1.0, None, "cpu").split(": ")[1].startswith(
      "20 steps on cpu in 2.0 s of training"), throughput.summary(
          1.0, None, "cpu")


def test_flops_per_token_matches_the_compilers_count_of_a_train_step():
  """6N + 12 L d T against XLA's FLOP count of the compiled forward and
  backward pass of a full-precision model whose matmuls dominate (width
  256, one full window: XLA's attention computes every score, as 12 L d T
  assumes). The elementwise work (norms, softmax; no optimizer here) keeps
  the compiler's count about 1% above; dropping the 12 L d T term would
  put it 7% above, 4N instead of 6N 50%."""
  config = base_config()
  m = config.model
  m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.ffn_dim = (
      512, 256, 2, 4, 1024)
  m.quantization, m.scan_layers = "none", False  # scan: counted once
  batch, seq = 2, 128
  model = model_lib.Transformer(m, rngs=nnx.Rngs(params=0))
  graphdef, params = params_of(model)
  windows = jnp.zeros((batch, seq + 1), jnp.int32)

  def loss(params):
    return next_token_loss(model_lib.bind(graphdef, params, 0), windows)[0]

  compiled = jax.jit(jax.grad(loss)).lower(params).compile()
  analysis = compiled.cost_analysis()
  counted = (analysis[0] if isinstance(analysis, list) else analysis)["flops"]
  formula = batch * seq * metrics.flops_per_token(
      metrics.matmul_params(params, m), m.n_layers,
      m.d_model, seq)
  assert 1.0 <= counted / formula < 1.05, (  # measured: 1.011
      f"XLA counts {counted:.4g} FLOPs for a step, 6N + 12LdT gives "
      f"{formula:.4g}: the formula or its N (matmul_params) is off")


def test_peak_flops_by_device_kind():
  assert metrics.device_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert metrics.device_peak_flops("NVIDIA H200") == 989e12
  assert metrics.device_peak_flops("NVIDIA H100 PCIe") == 756e12, (
      "the longest matching prefix must win")
  assert metrics.device_peak_flops("cpu") is None


def test_performance_summary_line():
  throughput = metrics.Throughput(tokens_per_step=1000, total_steps=50)
  throughput.start(0)
  throughput.measure(10)
  throughput.start(20)  # an evaluation in between is not timed
  throughput.measure(30)
  throughput.first_step_seconds = 4.5
  line = throughput.summary(1e9, 1e12 * 1000, "1 x test")
  assert throughput.timed_steps == 20, throughput.timed_steps
  tokens_per_sec = 20 * 1000 / throughput.timed_seconds
  assert f"{tokens_per_sec:,.0f} tokens/s" in line, line
  assert f"MFU {tokens_per_sec * 1e9 / 1e15:.1%}" in line, line
  assert "first step (compilation) 4.5 s" in line, line
  assert "MFU unknown" in throughput.summary(1e9, None, "cpu")


def test_samples_of_steps_after_the_resume_point_are_dropped(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  for step in (0, 30, 60):
    writer.write_samples(step, [{"prompt": "a", "continuation": f"{step}"}])
  writer.close()
  metrics.MetricWriter(str(tmp_path), resume_step=30).close()
  with open(tmp_path / "samples.jsonl") as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == [0, 30], f"samples after a resume from 30: {steps}"


def test_samples_reach_tensorboard_as_text(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write_samples(30, [{"prompt": "def f(", "continuation": "x):"}])
  writer.close()
  texts = [(e.step, v.tag, v.tensor.string_val[0].decode())
           for e in _tensorboard_events(tmp_path) for v in e.summary.value
           if v.tensor.string_val]
  assert texts and texts[0][0] == 30, f"no text summary at step 30: {texts}"
  assert texts[0][1].startswith("samples/0"), texts
  assert "def f(" in texts[0][2] and "x):" in texts[0][2], texts


def test_the_console_line_stays_short_whatever_the_record_holds():
  record = {"loss": 5.25, "eval_loss": 5.5, "unique_predictions": 241,
            "learning_rate": 1e-3, "grad_norm": 0.8, "tokens_per_sec": 1e4,
            "mfu": 0.41, "eta_seconds": 61.0, "health_alarms": ["copying"],
            **{f"attention_rms/{i}": 0.1 for i in range(24)},
            **{f"harness/task{i}/acc": 0.5 for i in range(10)}}
  line = metrics.console_line(50, 1100, record)
  assert len(line) < 200, f"{len(line)} characters: {line}"
  for shown in ("step 50/1100", "loss 5.2500", "eval_loss 5.5000",
                "unique_predictions 241", "ALARMS copying", "ETA 1m01s"):
    assert shown in line, f"{shown!r} missing from: {line}"
