"""What a model predicts at each position of a text (`generate --debug`).

One forward pass over the text; per position the input token, the actual
next token, the top predictions with their probabilities, "copy" where the
prediction is the input token and "hit" where it is the next token; then the
copy rate and the accuracy over the text. A model that copies its input
(tied embeddings, unshifted labels) shows copy rate >= accuracy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bitnet_jax.model.transformer import Transformer


def debug_table(model: Transformer, tokens: list[int], tokenizer,
                top: int = 5) -> tuple[str, dict]:
  """The notes' per-position diagnostic table of `tokens`.

  Args:
    model: a `bitnet_jax.model.transformer.Transformer` (one forward pass).
    tokens: the text's token ids (>= 2: position i is scored against
      token i + 1), at most the model's context + 1.
    tokenizer: a `tokenizers.Tokenizer` (shows each id as text).
    top: how many predictions per position to list, with probabilities.

  Returns:
    (the table as text, {"copy_rate", "accuracy", "positions"}); copy_rate
    is the share of positions whose argmax is the input token, accuracy the
    share whose argmax is the next token.

  Raises:
    ValueError: naming --prompt / --text_file for fewer than 2 tokens.
  """
  if len(tokens) < 2:
    raise ValueError("--debug needs a text of at least 2 tokens "
                     "(--prompt or --text_file)")
  logits = model(jnp.asarray([tokens[:-1]]))[0]
  probs = np.asarray(jax.nn.softmax(logits, axis=-1))
  order = np.argsort(-probs, axis=-1)[:, :top]

  def show(token: int) -> str:
    return repr(tokenizer.decode([int(token)]))[:14]

  lines = [f"{'pos':>4} {'input':>14} {'next':>14}  marks     top-{top}"]
  copies = hits = 0
  for i in range(len(tokens) - 1):
    prediction = int(order[i, 0])
    copy, hit = prediction == tokens[i], prediction == tokens[i + 1]
    copies, hits = copies + copy, hits + hit
    marks = ("copy " if copy else "     ") + ("hit" if hit else "   ")
    best = "  ".join(f"{show(t)} {probs[i, t]:.3f}" for t in order[i])
    lines.append(f"{i:>4} {show(tokens[i]):>14} {show(tokens[i + 1]):>14}  "
                 f"{marks:9} {best}")
  count = len(tokens) - 1
  summary = {"copy_rate": copies / count, "accuracy": hits / count,
             "positions": count}
  lines.append(f"copy rate {summary['copy_rate']:.3f}, accuracy "
               f"{summary['accuracy']:.3f} over {count} positions")
  return "\n".join(lines), summary
