"""Streaming file corpora in use: each source trains the tiny config, and
the stream resumes exactly with two grain worker processes (the stream
alone: tests/unit/test_stream.py)."""

import json
import os
import re

import numpy as np
import pytest
from absl import flags

from bitnet_jax import data
from bitnet_jax.training import loop

from drivers import stream_config

N_DOCS, N_FILES = 48, 6


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["parquet", "jsonl.gz", "arrayrecord"])
def test_each_source_trains_the_tiny_config_in_stream_mode(
    tiny_config, tmp_path, scheme):
  config = stream_config(tiny_config, str(tmp_path), scheme, N_FILES, N_DOCS)
  config.train.steps, config.train.eval_every = 6, 3
  config.train.checkpoint_every, config.train.log_every = 3, 1
  config.optimizer.warmup_steps = 2
  final = loop.train_and_evaluate(config, str(tmp_path / "run"))
  assert np.isfinite(final["loss"]) and np.isfinite(final["eval_loss"]), final
  assert final["tokens_seen"] == 6 * 8 * 32, final
  assert not os.path.exists(tmp_path / "cache" / "tokens"), (
      "stream mode wrote a token cache: it tokenized before training")
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "6")


@pytest.mark.slow
def test_the_stream_resumes_exactly_with_two_workers(tiny_config, tmp_path):
  """Mid-epoch (after 5 batches), and (70 batches, 35 per worker) past an
  epoch boundary: positions saved by one iterator, each restored into a
  new one."""
  flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
  config = stream_config(tiny_config, str(tmp_path), "parquet", N_FILES, 12,
                         worker_count=2, packing="document")
  prepared = data.prepare(config)
  first = data.train_iterator(prepared, config)
  saved, read = {}, 0
  for batches_before in (5, 70):
    for _ in range(batches_before - read):
      next(first)
    state = json.loads(json.dumps(first.get_state()))  # as the checkpoint does
    epochs = re.findall(r"'epoch': (\d+)", str(state))
    assert epochs and (max(map(int, epochs)) > 0) == (batches_before > 5), (
        f"the test meant to save in epoch {int(batches_before > 5)} after "
        f"{batches_before} batches: {epochs}")
    saved[batches_before] = (state, [next(first) for _ in range(4)])
    read = batches_before + 4
  first.close()
  for batches_before, (state, expected) in saved.items():
    resumed = data.train_iterator(prepared, config)
    resumed.set_state(state)
    for i, want in enumerate(expected):
      got = next(resumed)
      for key in ("tokens", "segment_ids", "positions", "loss_mask"):
        np.testing.assert_array_equal(
            getattr(got, key), getattr(want, key),
            err_msg=f"batch {i} {key} after restoring the position after "
            f"{batches_before} batches")
    resumed.close()
