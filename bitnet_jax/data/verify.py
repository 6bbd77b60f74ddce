r"""Checks the diversity of the data a run trains on, before it trains.

  python -m bitnet_jax.data.verify --config=configs/tiny.py --batches=200 \
      [--config.train.steps=5000 ...]

Draws `--batches` global batches exactly as training does (`data.prepare`,
`data.train_iterator` for process 0 of 1, `data.eval_batches`) and prints one
line per figure: windows drawn; duplicate windows within a batch, across
batches within an epoch, and repeated from an earlier epoch; drawn train
windows that are also eval windows, and (prepared mode) eval windows that
are windows of the train token file (at any of its window offsets, multiples
of seq_len, drawn or not; a copy at another offset is not looked for); a
token frequency summary (of the targets, `tokens[:, 1:]`); windows per epoch
and `epochs = train.steps x train.batch_size / windows`, with a WARNING
above 1 (repeated data, which a model memorizes: the `memorization` alarm
of `bitnet_jax.metrics.health`). Windows are compared by a hash of their tokens.

"Within an epoch", by data mode:
  prepared  the train token file holds `windows` windows and each epoch is
            one shuffled pass over them: drawn window j belongs to epoch
            j // windows. Two equal windows in one epoch are either copies
            that the corpus itself holds (the stdlib corpus repeats codec
            tables, so ~1.6% of its windows have a twin) or a pipeline fault.
            Each such window is looked up in the token file (at most
            `_MAX_LOOKUPS` distinct ones): drawn more often than the file holds
            it counts as "beyond the corpus's copies".
  stream    the number of windows per epoch is unknown until the files have
            been read once (documents are packed as they stream), so epochs
            are unknown: duplicates among all drawn windows are reported with
            a WARNING but do not fail the check.

Exit status: 0 when the check passes; 1 (prepared mode) when a window is
drawn within an epoch more often than the corpus holds it, or when more than
`_MAX_DUPLICATE_SHARE` of the windows drawn are duplicates within their epoch
(a repetitive corpus: at least that share of its windows are copies);
2 on bad input (flags, config), with a message naming the flag or key.
"""

from __future__ import annotations

import collections
import hashlib
import math
import sys

import numpy as np
from absl import flags
from ml_collections import config_flags

from bitnet_jax import data
from bitnet_jax.config import command_line, validate
from bitnet_jax.data.pipeline import TokenWindows, read_tokens

_MAX_LOOKUPS = 1024  # distinct duplicated windows looked up in the token file
_MAX_DUPLICATE_SHARE = 0.05  # within-epoch duplicates / windows drawn
_TOP_TOKENS = 10


def window_hash(row: np.ndarray) -> bytes:
  """A 128-bit digest of one window (int32 `[seq_len + 1]`)."""
  return hashlib.blake2b(np.ascontiguousarray(row, np.int32).tobytes(),
                         digest_size=16).digest()


def corpus_copies(prepared: data.PreparedData, seq_len: int,
                  rows: list[np.ndarray]) -> list[int]:
  """How many windows of the train token file equal each of `rows`.

  Args:
    prepared: prepared-mode data (a train token file).
    seq_len: train.seq_len; window i is tokens[i * seq_len, ... + seq_len].
    rows: int32 `[seq_len + 1]` windows.

  Returns:
    one count per row (0: the window is not in the corpus).
  """
  n_windows = len(TokenWindows(prepared.train_tokens, prepared.train_n_tokens,
                               prepared.dtype, seq_len))
  tokens = read_tokens(prepared.train_tokens, prepared.train_n_tokens,
                       prepared.dtype)
  firsts = np.asarray(tokens[:n_windows * seq_len:seq_len])
  counts = []
  for row in rows:  # keep the windows that match row[:k + 1], k = 0, 1, ...
    starts = np.flatnonzero(firsts == row[0]) * seq_len
    for k in range(1, seq_len + 1):
      starts = starts[np.asarray(tokens[starts + k]) == row[k]]
    counts.append(int(starts.size))
  return counts


def _token_summary(frequency: np.ndarray, tokenizer) -> dict:
  """Distinct tokens, top tokens and unigram entropy of a count vector."""
  total = int(frequency.sum())
  p = frequency[frequency > 0] / max(total, 1)
  top = np.argsort(-frequency, kind="stable")[:_TOP_TOKENS]
  return {
      "tokens_counted": total,
      "distinct_tokens": int((frequency > 0).sum()),
      "top_tokens": [(int(i), tokenizer.decode([int(i)],
                                               skip_special_tokens=False),
                      float(frequency[i] / max(total, 1)))
                     for i in top if frequency[i]],
      "unigram_entropy_nats": float(-(p * np.log(p)).sum()),
  }


def _draw(iterator, batches: int, windows: int | None, frequency: np.ndarray
          ) -> tuple[collections.Counter, dict, collections.Counter, dict]:
  """Draws `batches` batches: (counts, last draw of each window's hash,
  draws per (epoch, hash), hash -> window drawn twice in one epoch)."""
  counts, last_seen = collections.Counter(), {}
  per_epoch, twins = collections.Counter(), {}
  for b in range(batches):
    rows = np.asarray(next(iterator).tokens)
    frequency += np.bincount(rows[:, 1:].ravel(),
                             minlength=frequency.size)[:frequency.size]
    for row in rows:
      epoch = counts["drawn"] // windows if windows else 0
      counts["drawn"] += 1
      h = window_hash(row)
      last = last_seen.get(h)
      if last is not None and last[1] == b:
        counts["within_batch"] += 1
      if last is not None and last[0] == epoch:
        counts["within_epoch"] += 1
        counts["across_batches_within_epoch"] += last[1] != b
        twins.setdefault(h, row.copy())
      elif last is not None:
        counts["repeats_of_earlier_epochs"] += 1
      last_seen[h] = (epoch, b)
      per_epoch[epoch, h] += 1
  return counts, last_seen, per_epoch, twins


def _explain(prepared, seq_len: int, per_epoch: collections.Counter,
             twins: dict) -> dict:
  """Splits within-epoch duplicates into corpus copies and the rest."""
  looked_up = list(twins)[:_MAX_LOOKUPS]
  copies = dict(zip(looked_up, corpus_copies(
      prepared, seq_len, [twins[h] for h in looked_up])))
  split = collections.Counter()
  for (_, h), n in per_epoch.items():
    if n > 1 and h not in copies:
      split["not_looked_up_within_epoch"] += n - 1
    elif n > 1:
      allowed = max(1, copies[h])
      split["corpus_copies_within_epoch"] += min(n, allowed) - 1
      split["beyond_corpus_within_epoch"] += max(0, n - allowed)
  return {key: split[key] for key in ("corpus_copies_within_epoch",
                                      "beyond_corpus_within_epoch",
                                      "not_looked_up_within_epoch")}


def verify(config, batches: int) -> dict:
  """Draws `batches` training batches as training does and measures them.

  Args:
    config: a run config (`configs/*.py`), validated here.
    batches: global batches of `train.batch_size` windows to draw, >= 1.

  Returns:
    The report (see `format_report`): counts are ints; `windows_per_epoch`,
    `epochs` and the corpus-copy split are None in stream mode; `status` is
    the exit status (0 or 1) and `failures` says why it is 1.

  Raises:
    ValueError: naming --batches when `batches` < 1.
    ConfigError: an invalid config value (`config.validate`, `data.prepare`,
      the iterators), naming the key.
  """
  if not isinstance(batches, int) or batches < 1:
    raise ValueError(f"--batches={batches} is invalid: draw at least one "
                     "batch, e.g. --batches=200")
  validate(config)
  t = config.train
  prepared = data.prepare(config)
  windows = None
  if prepared.mode == "prepared":
    windows = len(TokenWindows(prepared.train_tokens, prepared.train_n_tokens,
                               prepared.dtype, t.seq_len))
  vocab = prepared.tokenizer.get_vocab_size()
  frequency = np.zeros(max(vocab, config.model.vocab_size), np.int64)
  iterator = data.train_iterator(prepared, config, 0, 1)
  try:
    counts, last_seen, per_epoch, twins = _draw(iterator, batches, windows,
                                                frequency)
  finally:
    getattr(iterator, "close", lambda: None)()
  eval_rows = np.concatenate([np.asarray(batch.tokens) for batch in
                              data.eval_batches(prepared, config, 0, 1)])
  eval_hashes = {window_hash(row) for row in eval_rows}
  report = {
      "mode": prepared.mode, "batches": batches, "batch_size": t.batch_size,
      "seq_len": t.seq_len, "windows_drawn": counts["drawn"],
      "distinct_windows_drawn": len(last_seen),
      "duplicates_within_batch": counts["within_batch"],
      "duplicates_across_batches_within_epoch":
          counts["across_batches_within_epoch"],
      "duplicates_within_epoch": counts["within_epoch"],
      "repeats_of_earlier_epochs": counts["repeats_of_earlier_epochs"],
      "corpus_copies_within_epoch": None, "beyond_corpus_within_epoch": None,
      "not_looked_up_within_epoch": 0, "eval_windows": len(eval_rows),
      "eval_windows_looked_up": 0, "eval_windows_in_train_file": None,
      "train_eval_shared": len(eval_hashes & last_seen.keys()),
      "tokenizer_vocab_size": vocab,
      "model_vocab_size": config.model.vocab_size,
      "windows_per_epoch": windows, "run_windows": t.steps * t.batch_size,
      "epochs": t.steps * t.batch_size / windows if windows else None,
      **_token_summary(frequency, prepared.tokenizer),
  }
  failures = []
  if windows:
    report.update(_explain(prepared, t.seq_len, per_epoch, twins))
    looked_up = list(eval_rows[:_MAX_LOOKUPS])
    report["eval_windows_looked_up"] = len(looked_up)
    report["eval_windows_in_train_file"] = sum(
        n > 0 for n in corpus_copies(prepared, t.seq_len, looked_up))
    if report["beyond_corpus_within_epoch"]:
      failures.append(f"{report['beyond_corpus_within_epoch']} windows were "
                      "drawn within an epoch more often than the corpus "
                      "holds them (the pipeline repeats data)")
    share = counts["within_epoch"] / counts["drawn"]
    if share > _MAX_DUPLICATE_SHARE:
      failures.append(f"{share:.1%} of the windows drawn are duplicates "
                      f"within their epoch (more than "
                      f"{_MAX_DUPLICATE_SHARE:.0%}: the corpus repeats itself)")
  report.update(status=1 if failures else 0, failures=failures)
  return report


def format_report(report: dict) -> list[str]:
  """The report as printable lines, WARNING / FAILED lines last."""
  r = report
  lines = [
      f"data mode: {r['mode']}",
      f"batches drawn: {r['batches']} of {r['batch_size']} windows of "
      f"{r['seq_len'] + 1} tokens",
      f"windows drawn: {r['windows_drawn']} ({r['distinct_windows_drawn']} "
      "distinct)",
      f"duplicate windows within a batch: {r['duplicates_within_batch']}",
      "duplicate windows across batches within an epoch: "
      f"{r['duplicates_across_batches_within_epoch']}",
      f"duplicate windows within an epoch: {r['duplicates_within_epoch']}",
  ]
  if r["windows_per_epoch"]:
    lines += [
        "  of which copies the corpus holds: "
        f"{r['corpus_copies_within_epoch']}; beyond the corpus's copies: "
        f"{r['beyond_corpus_within_epoch']}; not looked up: "
        f"{r['not_looked_up_within_epoch']}",
        "windows repeated from an earlier epoch: "
        f"{r['repeats_of_earlier_epochs']}"]
  lines += [
      f"train windows also among the {r['eval_windows']} eval windows: "
      f"{r['train_eval_shared']}",
  ]
  if r["eval_windows_in_train_file"] is not None:
    lines.append(f"eval windows that are windows of the train token file: "
                 f"{r['eval_windows_in_train_file']} of "
                 f"{r['eval_windows_looked_up']} looked up")
  lines += [
      f"distinct tokens seen: {r['distinct_tokens']} of vocabulary "
      f"{r['tokenizer_vocab_size']} (model.vocab_size "
      f"{r['model_vocab_size']}), in {r['tokens_counted']} target tokens",
      f"unigram entropy: {r['unigram_entropy_nats']:.3f} nats "
      f"(log vocabulary: {math.log(r['tokenizer_vocab_size']):.3f})",
  ]
  if r["top_tokens"]:
    lines.append(f"most frequent token share: {r['top_tokens'][0][2]:.2%}")
    lines.append("top tokens: " + ", ".join(
        f"{i} {text!r} {share:.2%}" for i, text, share in r["top_tokens"]))
  if r["windows_per_epoch"]:
    lines += [f"windows per epoch: {r['windows_per_epoch']}",
              f"epochs the run will see: {r['epochs']:.3f} (train.steps x "
              f"train.batch_size = {r['run_windows']} windows)"]
  else:
    lines += ["windows per epoch: unknown (stream mode: known only after "
              "one pass over the files)", "epochs the run will see: unknown "
              f"(train.steps x train.batch_size = {r['run_windows']} windows)"]
  if r["epochs"] is not None and r["epochs"] > 1:
    lines.append(f"WARNING: the run sees its data {r['epochs']:.2f} times "
                 "(epochs > 1): repeated windows raise the risk of "
                 "memorization; lower train.steps or add data")
  if r["train_eval_shared"]:
    lines.append(f"WARNING: {r['train_eval_shared']} train windows are also "
                 "eval windows: the eval loss overstates generalization")
  if r["eval_windows_in_train_file"]:
    lines.append(f"WARNING: {r['eval_windows_in_train_file']} eval windows "
                 "occur in the train token file (text both splits hold)")
  if not r["windows_per_epoch"] and r["duplicates_within_epoch"]:
    lines.append(f"WARNING: {r['duplicates_within_epoch']} drawn windows "
                 "repeat an earlier one (epoch boundaries unknown in stream "
                 "mode: a repetitive corpus or more than one epoch drawn)")
  lines += [f"FAILED: {why}" for why in r["failures"]]
  return lines


def run(config, batches: int) -> int:
  """Verifies, prints the report to stdout and returns the exit status."""
  report = verify(config, batches)
  print("\n".join(format_report(report)), flush=True)
  return report["status"]


def main(argv):
  config = flags.FLAGS.config
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}: give flags only, "
                     "e.g. --config=configs/tiny.py --batches=200")
  if config is None:
    raise ValueError("--config is required: e.g. --config=configs/tiny.py")
  sys.exit(run(config, flags.FLAGS.batches))


def _define_flags() -> None:
  """Defines the command-line flags (only when run as a program)."""
  config_flags.DEFINE_config_file(
      "config", None, "A Python config file with get_config(), e.g. "
      "configs/tiny.py; override fields with --config.train.steps=500.",
      lock_config=True)
  flags.DEFINE_integer("batches", 200, "Global training batches to draw.")


if __name__ == "__main__":
  _define_flags()
  command_line.run(main, refusals=(ValueError,))  # ConfigError included
