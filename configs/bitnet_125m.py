"""bitnet_125m: a 125M-class model, not in the FAQ (GPT-3 Small shape).

Recipe, batch and usage (`--config=configs/bitnet_125m.py`, `:fp` for the
full-precision baseline): `bitnet_jax.config.recipes.faq_config`.
"""

from bitnet_jax.config.recipes import faq_config


def get_config(variant: str = ""):
  """The ternary config, or with variant "fp" the full-precision baseline."""
  return faq_config("125m", variant)
