"""What do the memory-lean options that fit the 2B-4T fine-tune on one GPU
cost in loss?

configs/bitnet_2b4t.py fits one H100 80GB only with full rematerialization
(model.remat_policy="full"), the loss's logits made a chunk at a time
(train.loss_chunk_size) and Adam's first moment in bfloat16
(optimizer.mu_dtype, optax's mu_dtype). The first two recompute the same
values (the loss should match the baseline up to float rounding); the
third rounds the first moment every step, the one that can change
training. "lean" is all three, as the 2B-4T config sets them.
"""

VARIANTS = {
    "baseline": {},  # no remat, whole logits, float32 moments
    "mu_bf16": {"optimizer.mu_dtype": "bfloat16"},
    "lean": {"model.remat_policy": "full", "train.loss_chunk_size": 32,
             "optimizer.mu_dtype": "bfloat16"},
}
# the cpu preset at a third of its length: three variants in ~15 minutes
PRESET_OVERRIDES = {"cpu": {"train.steps": 200, "optimizer.warmup_steps": 20,
                            "train.eval_every": 50}}
