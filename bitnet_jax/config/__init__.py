"""The run configuration: one field table, validated once at start-up.

  choices.py     the names of every choice field, one `StrEnum` each
                 (`RematPolicy`, `Quantization`, ...)
  fields.py      a `Rule` per field and the resume classes
  defaults.py    `FIELDS`, the table (key, default, rule, resume class, doc),
                 `base_config()`
  validation.py  `validate(config)`, `ConfigError`, the relations between
                 fields
  recipes.py     the FAQ's research-size configs

Config files (`configs/*.py`) import what they need from here:
`from bitnet_jax.config import base_config`.
"""

from bitnet_jax.config.validation import *  # noqa: F401,F403
from bitnet_jax.config.validation import __all__  # noqa: F401
