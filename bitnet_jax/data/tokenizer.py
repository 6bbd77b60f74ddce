"""Tokenizer: a given `tokenizer.json`, or a byte-level BPE trained and cached.

With `data.tokenizer_path` empty, a GPT-2-style byte-level BPE of
`model.vocab_size` tokens (including the special token "<|endoftext|>") is
trained on the TRAIN split only, at most `MAX_TRAINING_CHARS` characters of it,
and cached at `DATA_DIR/tokenizers/bpe<VOCAB>-<DATASET>-<HASH>.json`; later
runs load that file. Training on the whole stdlib at vocab 8192 takes ~3 s.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator

import tokenizers
from absl import logging
from tokenizers import decoders, models, pre_tokenizers, trainers

from bitnet_jax.config import ConfigError, check_vocab
from bitnet_jax.data import mirror
from bitnet_jax.data.corpus import TextSplit
from bitnet_jax.storage import paths
from bitnet_jax.storage.files import write_atomically

EOT_TOKEN = "<|endoftext|>"  # separates documents in the token stream
# Characters of training text the BPE trainer sees at most (the first ones of
# the train split, in its stored order): ~200 MB keeps training to minutes
# and memory to a few GB on huge datasets, with negligible loss in quality.
MAX_TRAINING_CHARS = 200_000_000
# Document separators recognized in a user-provided tokenizer, in order.
_EOT_CANDIDATES = (EOT_TOKEN, "<|end_of_text|>", "</s>", "<eos>")
_RECIPE = "bytelevel-bpe-v1"  # bump when train_bpe changes its output
def _capped_texts(split: TextSplit, max_chars: int) -> Iterator[str]:
  """Yields the split's documents until `max_chars` characters were given."""
  remaining = max_chars
  for chunk in split.texts():
    for text in chunk:
      if remaining <= 0:
        return
      yield text[:remaining]
      remaining -= len(text)


def train_bpe(split: TextSplit, vocab_size: int,
              max_chars: int = MAX_TRAINING_CHARS) -> tokenizers.Tokenizer:
  """Trains a byte-level BPE on the first `max_chars` characters of `split`.

  The vocabulary has at most `vocab_size` entries: the 256 byte symbols, the
  special token "<|endoftext|>" and the learned merges (fewer on a tiny
  corpus). No prefix space is added, so decode(encode(text)) == text.
  """
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=[EOT_TOKEN],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False)
  tokenizer.train_from_iterator(_capped_texts(split, max_chars), trainer)
  return tokenizer


def load_tokenizer(path: str, key: str = "data.tokenizer_path"
                   ) -> tokenizers.Tokenizer:
  """Loads a HF `tokenizer.json`.

  Raises:
    ConfigError: naming `key` when the file is missing or cannot be parsed.
  """
  if not os.path.isfile(path):
    raise ConfigError(f"config.{key}={path!r}: no such file; give the path "
                      f"of a HF tokenizer.json, or '' to train a BPE")
  try:
    return tokenizers.Tokenizer.from_file(path)
  except Exception as e:  # the Rust parser raises a bare Exception
    raise ConfigError(f"config.{key}={path!r} is not a valid HF "
                      f"tokenizer.json ({e}); point it at a tokenizer saved "
                      f"with Tokenizer.save, or '' to train a BPE") from e


def end_of_text_id(tokenizer: tokenizers.Tokenizer, source: str) -> int:
  """Returns the id of the document separator (e.g. "<|endoftext|>").

  Raises:
    ConfigError: naming `data.tokenizer_path` when the tokenizer (read from
      `source`) has none of the known separators.
  """
  for token in _EOT_CANDIDATES:
    token_id = tokenizer.token_to_id(token)
    if token_id is not None:
      return token_id
  raise ConfigError(
      f"config.data.tokenizer_path: the tokenizer {source} has no document "
      f"separator token (one of {', '.join(_EOT_CANDIDATES)}); add one, or "
      f"set data.tokenizer_path='' to train a BPE")


def cached_tokenizer_path(root: str, split: TextSplit, vocab_size: int) -> str:
  """Returns where the BPE trained on `split` at `vocab_size` is cached."""
  digest = hashlib.sha256(
      f"{_RECIPE}\0{split.key}\0{vocab_size}\0{MAX_TRAINING_CHARS}".encode()
  ).hexdigest()[:12]
  slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", split.key.split(":")[1])[:48]
  name = f"bpe{vocab_size}-{slug}-{digest}.json"
  return os.path.join(root, "tokenizers", name)


def get_tokenizer(config, root: str, train: TextSplit
                  ) -> tuple[tokenizers.Tokenizer, str]:
  """Returns (tokenizer, the path it was loaded from or cached at).

  Loads `data.tokenizer_path` when set (a local path or a gs:// URL, read
  through a local copy); otherwise loads the cached BPE for (train split,
  model.vocab_size) under `root`, training and caching it first if absent
  (or unreadable); with a gs:// `data.data_dir` the BPE is fetched from and
  published to it (`mirror`), so hosts train it once. Checks the
  vocabulary against the model.

  Raises:
    ConfigError: naming `data.tokenizer_path` for a missing/corrupt file,
      `model.vocab_size` when the tokenizer has more tokens than the model
      has logits.
  """
  vocab_size = config.model.vocab_size
  if config.data.tokenizer_path:
    path = paths.resolve(config.data.tokenizer_path)
    if paths.is_url(path):
      try:
        path = paths.local_file(path)
      except FileNotFoundError:
        pass  # load_tokenizer names data.tokenizer_path
    tokenizer = load_tokenizer(path)
    logging.info("Loaded tokenizer %s (%d tokens)", path,
                 tokenizer.get_vocab_size())
  else:
    path = cached_tokenizer_path(root, train, vocab_size)
    remote = mirror.remote_root(config)
    entry = ("tokenizers", (os.path.basename(path),))  # mirror's entry
    mirror.fetch(root, remote, *entry)
    tokenizer = None
    if os.path.isfile(path):
      try:
        tokenizer = tokenizers.Tokenizer.from_file(path)
        logging.info("Loaded cached tokenizer %s", path)
      except Exception as e:  # noqa: BLE001 (the Rust parser's only type)
        logging.warning("Cached tokenizer %s is unreadable (%s); retraining",
                        path, e)
    if tokenizer is None:
      logging.info("Training a byte-level BPE (vocab %d) on the train split "
                   "%s (at most %d characters)", vocab_size, train.key,
                   MAX_TRAINING_CHARS)
      tokenizer = train_bpe(train, vocab_size)
      write_atomically(path, tokenizer.to_str().encode("utf-8"))
      logging.info("Cached tokenizer (%d tokens) at %s",
                   tokenizer.get_vocab_size(), path)
    mirror.publish(root, remote, *entry)
  check_vocab(config, tokenizer.get_vocab_size(), path)
  return tokenizer, path


def encode_documents(tokenizer: tokenizers.Tokenizer,
                     texts: list[str]) -> list[list[int]]:
  """Returns the token ids of each text (no special tokens are added).

  `encode_batch_fast` gives the same ids as `encode_batch` without computing
  character offsets (about 1.5x faster on the tiny config's corpus).
  """
  return [e.ids for e in tokenizer.encode_batch_fast(
      texts, add_special_tokens=False)]
