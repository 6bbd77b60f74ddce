r"""Greedy continuation of a prompt by a run's model.

  python -m bitnet_jax.generate --workdir=runs/tiny --prompt="def main(" \
      --max_new_tokens=32 [--step=N]

Loads the run's config, tokenizer and newest (or step N) checkpoint and prints
the prompt's greedy continuation. Each new token re-runs the causal forward
over a fixed-size buffer (one compilation, no KV cache): exact, and fast
enough for checks and short samples.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from flax import nnx

from bitnet_jax import checkpoint, runs
from bitnet_jax.config import ConfigError
from bitnet_jax.data.tokenizer import load_tokenizer
from bitnet_jax.model import Transformer


def greedy(model: Transformer, prompt: np.ndarray, max_new_tokens: int
           ) -> np.ndarray:
  """Greedy decoding: each new token is the argmax of the next-token logits.

  Args:
    model: the language model.
    prompt: int32 `[batch, prompt_len]` token ids (every row the same
      length), prompt_len >= 1.
    max_new_tokens: tokens to append, >= 0.

  Returns:
    int32 `[batch, max_new_tokens]`, the generated ids.

  Raises:
    ValueError: naming `max_new_tokens` when it is negative or the prompt is
      empty.
  """
  prompt = np.asarray(prompt, np.int32)
  if max_new_tokens < 0 or prompt.ndim != 2 or prompt.shape[1] == 0:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0 and the "
                     f"prompt [batch, len >= 1], got shape {prompt.shape}")
  batch, length = prompt.shape
  total = length + max_new_tokens
  graphdef, params = nnx.split(model)

  @jax.jit
  def run(params, buffer):
    def body(position, buffer):
      logits = nnx.merge(graphdef, params)(buffer)
      token = jnp.argmax(logits[:, position - 1], axis=-1).astype(jnp.int32)
      return buffer.at[:, position].set(token)
    return jax.lax.fori_loop(length, total, body, buffer)

  buffer = np.zeros((batch, total), np.int32)
  buffer[:, :length] = prompt
  return np.asarray(run(params, jnp.asarray(buffer)))[:, length:]


FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    _, model, step = runs.load_model(FLAGS.workdir, FLAGS.step)
    tokenizer = load_tokenizer(runs.tokenizer_path(FLAGS.workdir))
    prompt = tokenizer.encode(FLAGS.prompt).ids
    if not prompt:
      raise ValueError("--prompt is empty: give text to continue")
    out = greedy(model, np.array([prompt]), FLAGS.max_new_tokens)
  except (ConfigError, checkpoint.CheckpointMismatchError, ValueError) as e:
    absl_logging.error("%s: %s", type(e).__name__, e)
    sys.exit(1)
  absl_logging.info("checkpoint %d of %s", step, FLAGS.workdir)
  print(FLAGS.prompt + tokenizer.decode(out[0].tolist()))


def _define_flags() -> None:
  """Defines the command-line flags (only when run as a program)."""
  flags.DEFINE_string("workdir", None, "The run directory.")
  flags.DEFINE_string("prompt", "", "Text to continue.")
  flags.DEFINE_integer("max_new_tokens", 64,
                       "Tokens to generate.")
  flags.DEFINE_integer("step", None, "Checkpoint step; default newest.")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flag_as_required("workdir")
  app.run(main)
