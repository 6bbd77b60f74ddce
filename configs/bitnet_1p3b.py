"""bitnet_1p3b: the FAQ's 1.3B (d_model 2048, ffn 5460, 32 heads, 24 layers).

Recipe, batch and usage (`--config=configs/bitnet_1p3b.py`, `:fp` for the
full-precision baseline): `bitnet_jax.config.recipes.faq_config`.
"""

from bitnet_jax.config.recipes import faq_config


def get_config(variant: str = ""):
  """The ternary config, or with variant "fp" the full-precision baseline."""
  return faq_config("1p3b", variant)
