"""The run configuration: one field table, validated once at start-up.

  fields.py      a `Rule` per field and the resume classes
  defaults.py    `FIELDS`, the table (key, default, rule, resume class, doc),
                 the choice names, `base_config()`
  validation.py  `validate(config)`, `ConfigError`, the relations between
                 fields
  recipes.py     the FAQ's research-size configs

Config files (`configs/*.py`) import what they need from here:
`from bitnet_jax.config import base_config`.
"""

from bitnet_jax.config.validation import *  # noqa: F401,F403
from bitnet_jax.config.validation import __all__  # noqa: F401
