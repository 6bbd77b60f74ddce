"""Token perplexity and bits per byte of a text corpus.

Each document is scored whole in lm-eval's rolling windows of the model's
context (`BitNetLM.rolling_scores`: every token predicted once, the first
from the prefix token), as lm-eval's wikitext task scores pages. Over all
documents, with NLL the summed negative log-likelihood in nats:

  token_perplexity = exp(NLL / tokens)
  bits_per_byte    = NLL / (bytes x ln 2)      (UTF-8 bytes of the texts)

Bits per byte do not depend on the tokenizer, so runs with different
vocabularies compare on it (Gao et al., "The Pile", arXiv 2101.00027,
sec. 5; lm-eval's `bits_per_byte`).

Corpora are given as the training data is (`bitnet_jax.data.corpus`):
"stdlib" (the files the embedded corpus holds out for evaluation),
"files:GLOB" (one document per UTF-8 file), "parquet:GLOB", "jsonl:GLOB",
"arrayrecord:GLOB" (the `text_feature` of each record).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from typing import Any

import fsspec

from bitnet_jax.config import STREAM_SCHEMES, ConfigError
from bitnet_jax.data import sources, stdlib

_KEY = "--perplexity"
_BATCH_DOCUMENTS = 64  # documents scored per call (their windows batched)


def corpus_texts(spec: str, text_feature: str = "text",
                 eval_fraction: float = stdlib.DEFAULT_EVAL_FRACTION
                 ) -> Iterator[str]:
  """The documents of a corpus spec, in file order.

  Raises:
    ConfigError: naming --perplexity for an unknown scheme or a glob that
      matches nothing, or --text_feature when records lack that field.
  """
  if spec == "stdlib":
    root = stdlib.stdlib_root()
    for relative in stdlib.stdlib_files(root):
      if stdlib.is_eval_path(relative, eval_fraction):
        with open(f"{root}/{relative}", encoding="utf-8",
                  errors="replace") as f:
          yield f.read()
    return
  scheme, _, pattern = spec.partition(":")
  if scheme not in ("files", *STREAM_SCHEMES) or not pattern:
    raise ConfigError(
        f"{_KEY}={spec!r}: give 'stdlib' or SCHEME:GLOB with SCHEME one of "
        f"files, {', '.join(STREAM_SCHEMES)}")
  files = sources.expand(scheme, pattern, "perplexity")
  for path in files:
    if scheme == "files":
      with fsspec.open(path, "r", encoding="utf-8", errors="replace") as f:
        yield f.read()
    else:
      yield from sources.FileDocuments(scheme, path, text_feature)


def perplexity(lm: Any, texts: Iterator[str], limit: int | None = None
               ) -> dict[str, float]:
  """Scores documents with a `BitNetLM` (see the module docstring).

  Args:
    lm: a `bitnet_jax.evaluation.backend.BitNetLM`.
    texts: the documents (empty ones are skipped).
    limit: score at most this many documents; None: all.

  Returns:
    {"documents", "tokens", "bytes", "nll" (nats), "token_perplexity",
    "bits_per_byte"}.

  Raises:
    ValueError: when no non-empty document is left to score.
  """
  texts = (t for t in texts if t)
  if limit is not None:
    texts = itertools.islice(texts, limit)
  documents = tokens = size = 0
  nll = 0.0
  while batch := list(itertools.islice(texts, _BATCH_DOCUMENTS)):
    for (log_likelihood, count), text in zip(lm.rolling_scores(batch), batch):
      nll -= log_likelihood
      tokens += count
      size += len(text.encode("utf-8"))
      documents += 1
  if not documents:
    raise ValueError(f"{_KEY}: the corpus has no non-empty document")
  return {"documents": documents, "tokens": tokens, "bytes": size,
          "nll": nll, "token_perplexity": math.exp(nll / tokens),
          "bits_per_byte": nll / (size * math.log(2))}
