r"""Evaluate a run with lm-evaluation-harness tasks, or its corpus perplexity.

  python -m bitnet_jax.evaluate --workdir=RUN --tasks=arc_easy,hellaswag \
      [--step=N --num_fewshot=0 --limit=N --include_path=DIR \
       --batch_size=16 --output_path=FILE]
  python -m bitnet_jax.evaluate --workdir=RUN --perplexity=jsonl:DIR/*.jsonl \
      [--text_feature=text --limit=N]

RUN is a local or gs:// run directory: one trained here, or one made by
`python -m bitnet_jax.convert import-hf` (e.g. BitNet b1.58 2B-4T). Its
newest checkpoint (or --step) is loaded onto the mesh of its config and
scored through the quantized forward it trains with (`bitnet_jax.evaluation`).

--tasks runs lm-eval's `simple_evaluate` (task names of lm-eval's
`TaskManager`, plus the local YAML tasks of --include_path) and prints
lm-eval's results table; --output_path writes its results JSON.
--perplexity prints the token perplexity and bits per byte of a corpus given
as `data.dataset` is ("stdlib" = the embedded corpus's held-out files,
"files:GLOB", "parquet:GLOB", "jsonl:GLOB", "arrayrecord:GLOB").

A bad flag, an unknown task, data that is not on the machine or a run
without a checkpoint ends with one line naming the problem (exit status 1).
"""

from __future__ import annotations

import json

import jax
from absl import app, flags

from bitnet_jax.config import ConfigError, command_line
from bitnet_jax.runs import checkpoint

FLAGS = flags.FLAGS


def _limit() -> float | None:
  return None if FLAGS.limit is None else (
      int(FLAGS.limit) if FLAGS.limit >= 1 else FLAGS.limit)


def run() -> dict:
  """Runs what the flags ask; returns the results (lm-eval's, or the
  perplexity figures). Raises the errors `main` reports in one line."""
  from bitnet_jax.evaluation import harness, perplexity  # pylint: disable=g-import-not-at-top
  from bitnet_jax.evaluation.backend import BitNetLM  # pylint: disable=g-import-not-at-top
  if bool(FLAGS.tasks) == bool(FLAGS.perplexity):
    raise ConfigError("give --tasks=NAME[,NAME...] or --perplexity=CORPUS "
                      "(one of them)")
  if FLAGS.batch_size < 1:
    raise ConfigError(f"--batch_size={FLAGS.batch_size} must be >= 1")
  if FLAGS.tasks:
    names = harness.task_names(FLAGS.tasks)
    manager = harness.task_manager(FLAGS.include_path, names=names)
    harness.check_tasks(names, manager)  # before the model loads
  lm = BitNetLM.from_run(FLAGS.workdir, FLAGS.step,
                         batch_size=FLAGS.batch_size)
  if FLAGS.perplexity:
    figures = perplexity.perplexity(
        lm, perplexity.corpus_texts(FLAGS.perplexity, FLAGS.text_feature),
        limit=None if FLAGS.limit is None else int(FLAGS.limit))
    figures = {"workdir": FLAGS.workdir, "step": lm.step,
               "corpus": FLAGS.perplexity, **figures}
    if jax.process_index() == 0:
      print(json.dumps(figures, indent=2))
    return figures
  results = harness.evaluate(lm, names, manager,
                             num_fewshot=FLAGS.num_fewshot, limit=_limit())
  results["config"] = {"model": "bitnet_jax", "workdir": FLAGS.workdir,
                       "step": lm.step, "batch_size": FLAGS.batch_size,
                       "max_length": lm.max_length}
  if jax.process_index() == 0:
    print(f"bitnet_jax ({FLAGS.workdir}, step {lm.step}), num_fewshot: "
          f"{FLAGS.num_fewshot}, limit: {FLAGS.limit}, batch_size: "
          f"{FLAGS.batch_size}")
    print(harness.table(results))
    if FLAGS.output_path:
      harness.write_results(results, FLAGS.output_path)
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run()


def _define_flags() -> None:
  """Defines the command-line flags (only when run as a program)."""
  flags.DEFINE_string("workdir", None, "The run directory (local or gs://).")
  flags.DEFINE_integer("step", None, "Checkpoint step; default newest.")
  flags.DEFINE_string("tasks", "", "lm-eval task, group or tag names, comma "
                      "separated.")
  flags.DEFINE_integer("num_fewshot", None, "Few-shot examples per prompt; "
                       "default each task's own.")
  flags.DEFINE_float("limit", None, "At most this many documents per task "
                     "(< 1: a fraction); also caps --perplexity documents.")
  flags.DEFINE_string("include_path", "", "Folders of local lm-eval YAML "
                      "tasks, comma separated.")
  flags.DEFINE_integer("batch_size", 16, "Rows per scoring / decoding call.")
  flags.DEFINE_string("output_path", "", "Write lm-eval's results JSON here.")
  flags.DEFINE_string("perplexity", "", "A corpus ('stdlib' or SCHEME:GLOB) "
                      "to report token perplexity and bits per byte on.")
  flags.DEFINE_string("text_feature", "text", "The text field of "
                      "--perplexity's parquet / jsonl / arrayrecord records.")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flag_as_required("workdir")
  # ValueError: ConfigError, harness.TaskError and bad flag values.
  command_line.run(main, refusals=(ValueError,
                                   checkpoint.CheckpointMismatchError))
