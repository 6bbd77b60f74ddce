"""How much of the collapse, and of the loss, is due to ternary weights?

The seeds suspected the STE's ternary quantization pressure and planned to
"consider removing ternary quantization for baseline". The fp variant is the
same model with full-precision linear layers and, to isolate the weights,
the same (ternary) optimizer recipe; the FAQ trains its fp baselines with a
lower single learning rate (2.5e-4 at 700M) and constant weight decay 0.1,
which this does not use. The gap in loss is the quantization's quality cost.
"""

VARIANTS = {
    "ternary": {"model.quantization": "ternary"},  # BitNet b1.58
    "fp": {"model.quantization": "none"},  # full-precision baseline
}
