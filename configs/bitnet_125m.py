r"""bitnet_125m: a 125M-class BitNet b1.58.

GPT-3 Small shape: d_model 768, ffn 2048, 12 heads, 12 layers; not in the FAQ.

Usage:
  python -m bitnet_jax.main --config=configs/bitnet_125m.py --workdir=runs/125m \
      --config.data.dataset='parquet:/data/fineweb/*.parquet' \
      --config.train.grad_accum_steps=8
  python -m bitnet_jax.main --config=configs/bitnet_125m.py:fp ...  # fp baseline

The recipe and the batch (1M tokens per step, seq 2048) are in
`bitnet_jax.recipes.faq_config`; set train.batch_size and
train.grad_accum_steps for your hardware (README, Performance).
"""

from bitnet_jax.recipes import faq_config


def get_config(variant: str = ""):
  """The ternary config, or with variant "fp" the full-precision baseline."""
  return faq_config("125m", variant)
