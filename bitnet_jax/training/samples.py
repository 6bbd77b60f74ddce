"""Greedy samples of fixed validation prompts, written at every evaluation.

The prompts are the first `train.sample_prompt_tokens` tokens of the first
`train.sample_prompts` validation windows (the same at every evaluation and
after a resume). Each evaluation continues them greedily by
`train.sample_new_tokens` tokens (fewer when prompt and continuation would
exceed `train.seq_len`; `bitnet_jax.model.decode`, KV cache) and writes
one JSON line per prompt to `WORKDIR/samples.jsonl`:

  {"step": 1000, "prompt": "...", "continuation": "..."}

and the same text to TensorBoard ("samples/<i>"), so a run's output can be
read while it trains: a copying model repeats its prompt's last token, a
collapsed one emits the same few tokens.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from bitnet_jax.model import decode
from bitnet_jax.model.transformer import bind


def sample_prompts(config: ml_collections.ConfigDict,
                   eval_batches: list[dict]) -> np.ndarray:
  """int32 `[sample_prompts, sample_prompt_tokens]` prompt tokens, the same
  on every process (process 0's validation rows), fewer rows when the first
  eval batch is smaller; `[0, ...]` when samples are off."""
  t = config.train
  if not t.sample_prompts or not eval_batches:
    return np.zeros((0, t.sample_prompt_tokens), np.int32)
  tokens = np.asarray(eval_batches[0].tokens)
  prompts = tokens[:t.sample_prompts, :t.sample_prompt_tokens]
  if jax.process_count() > 1:
    prompts = np.asarray(multihost_utils.broadcast_one_to_all(prompts))
  return prompts.astype(np.int32)


def continue_prompts(config: ml_collections.ConfigDict,
                     graphdef: nnx.GraphDef, params: Any,
                     prompts: np.ndarray, tokenizer: Any,
                     step: int) -> list[dict[str, str]]:
  """Greedy continuations of `prompts` by the model `params` of `step`.

  Args:
    config: the run's config (train.seq_len, train.sample_new_tokens).
    graphdef, params: the model (`nnx.split`), params possibly sharded.
    prompts: int32 `[n, prompt_tokens]` from `sample_prompts`.
    tokenizer: a `tokenizers.Tokenizer` (decodes the ids).
    step: the train step of `params` (`transformer.bind`).

  Returns:
    One {"prompt", "continuation"} dict of text per prompt ([] for none);
    continuations have train.sample_new_tokens tokens, fewer when the
    prompt leaves less room in train.seq_len.

  Raises:
    ValueError: from `decode.generate` for prompts of train.seq_len tokens
      or more (`config.validate` rules them out).
  """
  if not len(prompts):
    return []
  t = config.train
  new = decode.generate(
      bind(graphdef, params, step), prompts.tolist(),
      min(t.sample_new_tokens, t.seq_len - prompts.shape[1]),
      context_len=t.seq_len)
  return [{"prompt": tokenizer.decode(prompt.tolist()),
           "continuation": tokenizer.decode(row.tolist())}
          for prompt, row in zip(prompts, new)]
