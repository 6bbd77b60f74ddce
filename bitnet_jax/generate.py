r"""Continue a prompt with a run's model, or show what it predicts (--diagnose).

  python -m bitnet_jax.generate --workdir=runs/tiny --prompt="def main(" \
      --max_new_tokens=64 [--temperature=0.8 --top_k=50 --top_p=0.95 \
      --seed=0 --step=N]
  python -m bitnet_jax.generate --workdir=runs/tiny --diagnose \
      (--prompt="..." | --text_file=FILE)

Loads the run's config, its tokenizer (`WORKDIR/tokenizer.json`) and its
newest (or step N) checkpoint. Decoding uses a KV cache (`bitnet_jax.model.decode`);
`--temperature=0` (the default) is greedy. The prompt plus `--max_new_tokens`
must fit in the context the model trained on (`train.seq_len`).

`--diagnose` runs one forward pass over the text and prints a per-position
diagnostic table: per position the input token, the actual next token, the
top-5 predictions with their probabilities, "copy" where the prediction is
the input token and "hit" where it is the next token; then the copy rate and
the accuracy over the text. A text longer than the model's context is cut to
its first `train.seq_len + 1` tokens (one training window), and a line says
so. A model that copies its input (tied embeddings, unshifted labels) shows
copy rate >= accuracy.
"""

from __future__ import annotations

from absl import app, flags
from absl import logging as absl_logging

from bitnet_jax.config import command_line, window_length
from bitnet_jax.data.tokenizer import load_tokenizer
from bitnet_jax.evaluation import diagnose
from bitnet_jax.model import decode
from bitnet_jax.runs import checkpoint, reader

FLAGS = flags.FLAGS


def _text() -> str:
  if FLAGS.text_file and FLAGS.prompt:
    raise ValueError("give --prompt or --text_file, not both")
  if FLAGS.text_file:
    try:
      with open(FLAGS.text_file, encoding="utf-8") as f:
        return f.read()
    except OSError as e:
      raise ValueError(f"--text_file={FLAGS.text_file!r} cannot be read: "
                       f"{e.strerror}") from e
  return FLAGS.prompt


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config, model, step = reader.load_model(FLAGS.workdir, FLAGS.step)
  tokenizer = load_tokenizer(reader.tokenizer_path(FLAGS.workdir))
  text = _text()
  tokens = tokenizer.encode(text).ids
  if FLAGS.diagnose:
    window = window_length(config)
    table, _ = diagnose.debug_table(model, tokens[:window], tokenizer)
    absl_logging.info("checkpoint %d of %s", step, FLAGS.workdir)
    print(table)
    if len(tokens) > window:
      print(f"scored the first {window} of {len(tokens)} tokens "
            f"(train.seq_len + 1: one training window)")
    return
  out = decode.generate(
      model, [tokens], FLAGS.max_new_tokens,
      context_len=config.train.seq_len, temperature=FLAGS.temperature,
      top_k=FLAGS.top_k, top_p=FLAGS.top_p, seed=FLAGS.seed)
  absl_logging.info("checkpoint %d of %s", step, FLAGS.workdir)
  print(text + tokenizer.decode(out[0].tolist()))


def _define_flags() -> None:
  """Defines the command-line flags (only when run as a program)."""
  flags.DEFINE_string("workdir", None, "The run directory.")
  flags.DEFINE_string("prompt", "", "Text to continue.")
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.")
  flags.DEFINE_float("temperature", 0.0,
                     "Sampling temperature; 0 = greedy (argmax).")
  flags.DEFINE_integer("top_k", 0, "Sample among the k likeliest; 0 = all.")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass; 1 = all.")
  flags.DEFINE_integer("seed", 0, "PRNG seed of the sampling.")
  flags.DEFINE_integer("step", None, "Checkpoint step; default newest.")
  flags.DEFINE_bool("diagnose", False, "Print the per-position diagnostic "
                    "table of the text instead of generating.")
  flags.DEFINE_string("text_file", "", "A text file to continue (or to "
                      "diagnose with --diagnose) instead of --prompt.")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flag_as_required("workdir")
  # ValueError: ConfigError and bad flag values.
  command_line.run(main, refusals=(ValueError,
                                   checkpoint.CheckpointMismatchError))
