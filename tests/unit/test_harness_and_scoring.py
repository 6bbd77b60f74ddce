"""The lm-eval pieces that need no trained run: scoring buckets and the
sharded scorer against the plain forward, metric names, task errors."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitnet_jax.distributed import sharding
from bitnet_jax.evaluation import harness, scoring
from bitnet_jax.model.transformer import Transformer

from drivers import REPO, params_of


def test_bucket_lengths_are_powers_of_two_capped_at_the_context():
  assert [scoring.bucket_length(n, 100) for n in (1, 16, 17, 33, 64, 65)] == [
      16, 16, 32, 64, 64, 100]
  with pytest.raises(ValueError, match="exceeds the model's context"):
    scoring.bucket_length(101, 100)


def test_scores_equal_the_plain_forward_and_compile_once_per_bucket(
    tiny_config):
  model = Transformer(tiny_config.model, rngs=nnx.Rngs(0))
  graphdef, params = params_of(model)
  mesh = sharding.make_mesh(tiny_config.mesh)
  scorer = scoring.Scorer(graphdef, params, mesh=mesh, batch_size=4,
                          max_length=32)
  rng = np.random.default_rng(0)
  windows = [(rng.integers(0, 512, n).tolist(), min(k + 1, n - 1))
             for k, n in enumerate([2, 5, 9, 17, 20, 33, 33, 12, 3, 30])]
  results = scorer.score(windows)
  # the reference: one unsharded forward of every window's inputs
  # right-padded to 32 tokens (causal: no position sees the padding after it)
  padded = np.zeros((len(windows), 33), np.int32)
  for row, (window, _) in enumerate(windows):
    padded[row, :len(window)] = window
  all_log_probs = np.asarray(jax.nn.log_softmax(
      jax.jit(lambda tokens: model(tokens))(jnp.asarray(padded[:, :-1]))))
  for row, ((window, scored), (total, _)) in enumerate(zip(windows, results)):
    log_probs = all_log_probs[row, :len(window) - 1]
    expected = log_probs[np.arange(len(window) - 1), window[1:]][-scored:]
    # 1e-4: other matmul shapes sum in another order, which may flip an int8
    # rounding tie (as documented for the HF export, test_hf_export.py)
    assert total == pytest.approx(expected.sum(), rel=1e-4), (
        f"a window of {len(window)} tokens scores {total}, its plain forward "
        f"{expected.sum()}")
  assert scorer.rows == 8, "4 rows round up to the 8 data-parallel devices"
  assert {length for _, length in scorer.shapes} <= {16, 32}, scorer.shapes


def test_metrics_are_named_by_task_and_metric():
  results = {"results": {"arc_easy": {
      "alias": "arc_easy", "acc,none": 0.5, "acc_stderr,none": 0.1,
      "exact_match,strict-match": 0.25, "bits_per_byte_stderr,none": "N/A"}}}
  assert harness.flat_metrics(results) == {
      "harness/arc_easy/acc": 0.5, "harness/arc_easy/acc_stderr": 0.1,
      "harness/arc_easy/exact_match-strict-match": 0.25}


def test_unknown_tasks_and_missing_data_are_one_clear_error(tmp_path):
  (tmp_path / "needs_hub.yaml").write_text(
      "task: needs_hub\ndataset_path: allenai/ai2_arc\n"
      "dataset_name: ARC-Easy\ntest_split: test\noutput_type: "
      "multiple_choice\ndoc_to_text: '{{question}}'\n"
      "doc_to_choice: '{{choices.text}}'\ndoc_to_target: 0\n")
  manager = harness.task_manager(str(tmp_path), include_defaults=False)
  with pytest.raises(harness.TaskError, match="'no_such_task' is not a "
                     "registered task"):
    harness.check_tasks(["no_such_task"], manager)
  with pytest.raises(harness.TaskError) as missing:
    harness.check_tasks(["needs_hub"], manager)
  message = str(missing.value)
  assert "needs_hub" in message and "allenai/ai2_arc" in message and (
      "load_dataset('allenai/ai2_arc', 'ARC-Easy')" in message), message
  assert "\n" not in message, "one line"
  with pytest.raises(harness.TaskError, match="--include_path"):
    harness.task_manager(str(tmp_path / "absent"), include_defaults=False)


def test_local_tasks_are_resolved_without_indexing_the_bundled_ones(
    tmp_path, monkeypatch):
  spec = importlib.util.spec_from_file_location(
      "local_tasks", os.path.join(REPO, "experiments", "local_tasks.py"))
  local_tasks = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(local_tasks)
  folder = local_tasks.write_tasks(str(tmp_path), count=4, max_gen_toks=4)
  indexed = []  # (folders, include_defaults) of each index built
  real = harness._indexed.__wrapped__
  monkeypatch.setattr(harness, "_indexed", lambda folders, defaults: (
      indexed.append((folders, defaults)) or real(folders, defaults)))
  manager = harness.task_manager(folder, names=["stdlib_choice"])
  assert indexed == [((folder,), False)], (
      f"local tasks must not index lm-eval's bundled ones: {indexed}")
  assert "stdlib_choice" in manager.all_tasks
  # a name the folder does not hold falls back to the full index (stubbed:
  # indexing ~14k bundled YAML files is the slow part this avoids)
  monkeypatch.setattr(harness, "_indexed", lambda folders, defaults: (
      indexed.append((folders, defaults)) or (
          real(folders, False) if not defaults else "full index")))
  assert harness.task_manager(folder, names=["arc_easy"]) == "full index"
  assert indexed[-1] == ((folder,), True), indexed
