r"""Reproduces the seeds' first bug (no label shift) and shows the alarms.

  python experiments/copy_bug.py --workdir=runs/copy_bug [--steps=200]

Trains configs/tiny.py with `batch.split_window` patched to score position i
against token i (the copy task the seeds' first model learned), then prints
per evaluation the loss, accuracy, copy rate, top-token share and the
`health_alarms`, and the `--debug` table's copy rate and accuracy on a
stdlib text scored against the real next tokens.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))

from bitnet_jax import metrics  # noqa: E402
from bitnet_jax.config import window_length  # noqa: E402
from bitnet_jax.data import batch as batch_lib  # noqa: E402
from bitnet_jax.data.tokenizer import load_tokenizer  # noqa: E402
from bitnet_jax.evaluation import diagnose  # noqa: E402
from bitnet_jax.runs import reader  # noqa: E402
from bitnet_jax.training import loop  # noqa: E402

from drivers import corpus_documents, load_config  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "runs/copy_bug", "Run directory.")
flags.DEFINE_integer("steps", 200, "Train steps.")


def main(argv):
  del argv
  batch_lib.split_window = lambda window: (window[:, :-1], window[:, :-1])
  config = load_config("configs/tiny.py", {
      "train.steps": FLAGS.steps, "train.eval_every": 25,
      "train.checkpoint_every": FLAGS.steps})
  loop.train_and_evaluate(config, FLAGS.workdir)
  print("| step | train loss | eval accuracy | copy rate | top token share "
        "| health_alarms |")
  print("|---|---|---|---|---|---|")
  last = {}
  for record in metrics.read_records(FLAGS.workdir):
    if "loss" in record:
      last = record
    if "eval_loss" in record:
      print(f"| {record['step']} | {last.get('loss', float('nan')):.3f} | "
            f"{record['eval_accuracy']:.3f} | {record['copy_rate']:.3f} | "
            f"{record['top_token_share']:.3f} | "
            f"{', '.join(record['health_alarms']) or '-'} |")
  _, model, _ = reader.load_model(FLAGS.workdir)
  tokenizer = load_tokenizer(reader.tokenizer_path(FLAGS.workdir))
  text = corpus_documents(1, chars=400)[0]
  tokens = tokenizer.encode(text).ids[:window_length(config)]
  _, summary = diagnose.debug_table(model, tokens, tokenizer)
  print("generate --debug on a stdlib text (real next tokens): "
        + json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
