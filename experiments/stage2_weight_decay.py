"""Does stage-2 weight decay decide whether the unique predictions recover?

The seeds' collapse went from 20 to 2 unique tokens in stage 1 and recovered
to 11-13 only after stage-2 weight decay was set to 0.0 (it had been 0.05);
the FAQ's recipe uses 0.0. 0.1 keeps stage 1's decay through the whole run.
"""

VARIANTS = {
    "wd0.0": {"optimizer.stage2_weight_decay": 0.0},  # the FAQ's recipe
    "wd0.05": {"optimizer.stage2_weight_decay": 0.05},  # the seeds' bug
    "wd0.1": {"optimizer.stage2_weight_decay": 0.1},  # no stage-2 change
}
