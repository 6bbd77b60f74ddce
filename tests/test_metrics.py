"""Collapse diagnostics and metric files."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax import metrics


def _stats_for(predictions, inputs, targets, vocab=10):
  logits = 5.0 * jax.nn.one_hot(jnp.asarray(predictions), vocab)
  return jax.device_get(metrics.prediction_statistics(
      logits, jnp.asarray(inputs), jnp.asarray(targets)))


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


def test_throughput_rates_are_consistent():
  throughput = metrics.Throughput(tokens_per_step=100, total_steps=50)
  assert throughput.measure(5) == {}, "no rate before start()"
  throughput.start(0)
  rates = throughput.measure(10)
  assert rates["tokens_per_sec"] == pytest.approx(100 * rates["steps_per_sec"])
  assert rates["eta_seconds"] == pytest.approx(40 / rates["steps_per_sec"])


def test_flops_per_token_formula():
  assert metrics.flops_per_token(1000, 2, 8, 16) == 6 * 1000 + 12 * 2 * 8 * 16
