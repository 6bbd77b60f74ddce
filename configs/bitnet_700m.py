r"""bitnet_700m: BitNet b1.58 700M.

FAQ table: d_model 1536, ffn 4096, 24 heads, 24 layers; LR 1.5e-3 -> 1e-3.

Usage:
  python -m bitnet_jax.main --config=configs/bitnet_700m.py --workdir=runs/700m \
      --config.data.dataset='parquet:/data/fineweb/*.parquet' \
      --config.train.grad_accum_steps=8
  python -m bitnet_jax.main --config=configs/bitnet_700m.py:fp ...  # fp baseline

The recipe and the batch (1M tokens per step, seq 2048) are in
`bitnet_jax.recipes.faq_config`; set train.batch_size and
train.grad_accum_steps for your hardware (README, Performance).
"""

from bitnet_jax.recipes import faq_config


def get_config(variant: str = ""):
  """The ternary config, or with variant "fp" the full-precision baseline."""
  return faq_config("700m", variant)
