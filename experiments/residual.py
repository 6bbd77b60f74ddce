"""Do hyper-connections (mHC-lite) change the collapse or the copying?

The seeds' Rust model used mHC residuals; an identity-bypass bug in them
(alpha_logit 5.0) was one suspect for the copying, and the copying survived
its fix. This compares the plain residual stream with mhc_lite at its default
model.residual_streams (2).
"""

VARIANTS = {
    "standard": {"model.residual": "standard"},
    "mhc_lite": {"model.residual": "mhc_lite"},
}
