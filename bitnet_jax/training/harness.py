"""lm-eval tasks during training: `eval.harness_tasks` every
`eval.harness_every` steps (0: at the last step only).

The tasks are loaded when the run is built, so a bad name or data missing
from the machine stops the run before it trains (`harness.TaskError`). At a
harness step the train state's parameters (already on the mesh) are scored
as they are, through the same `BitNetLM` the command line uses; the scalars
(`harness/<task>/<metric>`) join that step's metric record, so they reach
`metrics.jsonl` and TensorBoard. Between harness steps nothing runs: the
only host sync is the evaluation itself. Standard errors are skipped
(`bootstrap_iters=0`); `python -m bitnet_jax.evaluate` reports them.
"""

from __future__ import annotations

import jax
import ml_collections
import tokenizers
from absl import logging
from flax import nnx

from bitnet_jax.evaluation import harness
from bitnet_jax.evaluation.backend import BitNetLM, special_tokens
from bitnet_jax.metrics import Throughput
from bitnet_jax.runs import reader
from bitnet_jax.training import actions


class HarnessEvaluation(actions.PeriodicAction):
  """Runs the config's lm-eval tasks on the train state's parameters.

  Args:
    config: the run's config (`eval.*`, `model.quantization_warmup_steps`).
    workdir: the run directory (special tokens, context length of an
      imported model).
    graphdef: the model's graph (`train_state.create_train_state`).
    mesh: the run's mesh.
    tokenizer: the run's tokenizer.
    throughput: paused while evaluating (evaluation is not training time).

  Raises:
    TaskError: an unknown task or one whose data is not on the machine.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               graphdef: nnx.GraphDef, mesh: jax.sharding.Mesh,
               tokenizer: tokenizers.Tokenizer, throughput: Throughput):
    e = config.eval
    self.config = config
    self.cadence = actions.Cadence(e.harness_every)
    self.names = harness.task_names(e.harness_tasks)
    self.manager = harness.task_manager(
        e.harness_include_path, names=self.names,
        key="config.eval.harness_include_path")
    harness.check_tasks(self.names, self.manager)
    self.num_fewshot = None if e.harness_num_fewshot < 0 else (
        e.harness_num_fewshot)
    self.limit = e.harness_limit or None
    self.graphdef, self.mesh, self.tokenizer = graphdef, mesh, tokenizer
    self.throughput = throughput
    self.special = special_tokens(workdir, tokenizer)
    self.max_length = reader.context_length(workdir, config)
    self.lm: BitNetLM | None = None

  def due(self, done: actions.StepDone) -> bool:
    """Whether `done` is a harness step (never the step-0 baseline)."""
    return self.cadence.due(done.step, done.is_last)

  def __call__(self, done: actions.StepDone) -> actions.Report:
    with self.throughput.paused(ready=done.state):
      if self.lm is None:
        self.lm = BitNetLM(
            self.graphdef, done.state.params, self.tokenizer, mesh=self.mesh,
            max_length=self.max_length,
            batch_size=self.config.eval.harness_batch_size,
            step=done.step, **self.special)
      else:
        self.lm.set_params(done.state.params, done.step)
      results = harness.evaluate(self.lm, self.names, self.manager,
                                 num_fewshot=self.num_fewshot,
                                 limit=self.limit, bootstrap_iters=0)
    logging.info("harness at step %d:\n%s", done.step, harness.table(results))
    return actions.Report(metrics=harness.flat_metrics(results))

