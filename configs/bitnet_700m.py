"""bitnet_700m: the FAQ's 700M (d_model 1536, ffn 4096, 24 heads, 24 layers).

Recipe, batch and usage (`--config=configs/bitnet_700m.py`, `:fp` for the
full-precision baseline): `bitnet_jax.config.recipes.faq_config`.
"""

from bitnet_jax.config.recipes import faq_config


def get_config(variant: str = ""):
  """The ternary config, or with variant "fp" the full-precision baseline."""
  return faq_config("700m", variant)
