"""bitnet_3b: the FAQ's 3B (d_model 3200, ffn 8640, 32 heads, 26 layers).

Recipe, batch and usage (`--config=configs/bitnet_3b.py`, `:fp` for the
full-precision baseline): `bitnet_jax.config.recipes.faq_config`.

Its head dim, 3200 / 32 = 100, is not a multiple of 8: attention runs on
XLA, not cuDNN (a WARNING says so).
"""

from bitnet_jax.config.recipes import faq_config


def get_config(variant: str = ""):
  """The ternary config, or with variant "fp" the full-precision baseline."""
  return faq_config("3b", variant)
