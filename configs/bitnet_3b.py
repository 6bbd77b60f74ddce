r"""bitnet_3b: BitNet b1.58 3B.

FAQ table: d_model 3200, ffn 8640, 32 heads, 26 layers; LR 1.2e-3 -> 8e-4.

Usage:
  python -m bitnet_jax.main --config=configs/bitnet_3b.py --workdir=runs/3b \
      --config.data.dataset='parquet:/data/fineweb/*.parquet' \
      --config.train.grad_accum_steps=8
  python -m bitnet_jax.main --config=configs/bitnet_3b.py:fp ...  # fp baseline

Its head dim is 3200 / 32 = 100, not a multiple of 8: cuDNN's fused attention
cannot run it, and attention falls back to XLA (a WARNING says so).

The recipe and the batch (1M tokens per step, seq 2048) are in
`bitnet_jax.recipes.faq_config`; set train.batch_size and
train.grad_accum_steps for your hardware (README, Performance).
"""

from bitnet_jax.recipes import faq_config


def get_config(variant: str = ""):
  """The ternary config, or with variant "fp" the full-precision baseline."""
  return faq_config("3b", variant)
