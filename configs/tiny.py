"""tiny: a model small enough for tests and smoke runs (< 1 minute on 2 cores).

Usage:
  python -m bitnet_jax.main --config=configs/tiny.py --workdir=runs/tiny
"""

from bitnet_jax.config import base_config


def get_config():
  """Returns the tiny config: 2 layers of width 64 on the embedded corpus."""
  c = base_config()
  c.model.vocab_size = 512  # small BPE vocabulary
  c.model.d_model = 64  # residual width
  c.model.n_layers = 2  # blocks
  c.model.n_heads = 2  # head dim 32
  c.model.ffn_dim = 128  # gated FFN width
  c.train.steps = 60  # a smoke run
  c.train.batch_size = 8  # sequences per step
  c.train.seq_len = 32  # tokens per sequence
  c.train.log_every = 10  # a metric line every 10 steps
  c.train.eval_every = 30  # two evaluations
  c.train.eval_batches = 2  # 16 fixed validation windows
  c.train.checkpoint_every = 30  # two checkpoints
  c.train.sample_prompt_tokens = 8  # short prompts for the 32-token context
  c.train.sample_new_tokens = 16  # and short continuations
  c.optimizer.warmup_steps = 10  # short warmup for the short run
  return c
