"""Does a wider model (at the d20 depth of 6 layers) avoid the collapse?

The seeds tested 256, 512, 768 and 1024 hidden and saw the same stage-1
collapse at every size; they proposed more capacity as a remedy. Head dim
stays 64 (n_heads = d_model / 64) and ffn_dim = 3 x d_model, as in d20.

A d_model 1024 step costs ~12x a 256 one (matmul parameters 90M vs 7M), so
the four cpu runs cost ~24 runs of d20: the cpu preset trains 200 steps
instead of 600. The smoke preset uses tiny widths (head dim 32).
"""

VARIANTS = {
    f"d{d}": {"model.d_model": d, "model.n_heads": d // 64,
              "model.ffn_dim": 3 * d}
    for d in (256, 512, 768, 1024)
}

SMOKE_VARIANTS = {
    f"d{d}": {"model.d_model": d, "model.n_heads": d // 32,
              "model.ffn_dim": 3 * d}
    for d in (32, 64, 96, 128)
}

PRESET_OVERRIDES = {
    "cpu": {
        "train.steps": 200,  # ~24 d20-equivalents x 200 steps: ~75 minutes
        "optimizer.warmup_steps": 20,  # 10% of the run, as 60 of 600
        "train.log_every": 5,  # 40 points per curve
        "train.eval_every": 25,  # 9 evaluations (with the one at step 0)
        "train.checkpoint_every": 50,
    },
}
