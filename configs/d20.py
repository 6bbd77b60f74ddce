"""d20: the seeds' reference BitNet b1.58 model (d_model 256, 6 layers).

Usage:
  python -m bitnet_jax.main --config=configs/d20.py --workdir=runs/d20
  python -m bitnet_jax.main --config=configs/d20.py:cpu --workdir=runs/d20_cpu
  python -m bitnet_jax.main --config=configs/d20.py:cpu_fp \
      --workdir=runs/d20_cpu_fp

The ":cpu" variant keeps the architecture and the optimizer recipe and shrinks
batch, sequence length and steps so that it ends within an hour on two CPU
cores with the loss clearly falling (54 min measured at issue 34,
experiments/RESULTS.md). ":cpu_fp" is its full-precision baseline
at equal tokens, with the FP recipe of `bitnet_jax.config.recipes` (plain linear
layers, one learning-rate peak, constant weight decay 0.1; the peak is the
125M-class baseline's 6e-4).
"""

from bitnet_jax.config import base_config


def get_config(variant: str = ""):
  """Returns the d20 config; `variant` is "" (accelerator), "cpu" or
  "cpu_fp"."""
  # base_config() is the d20 model (d_model 256, 6 layers, 4 heads of 64,
  # SwiGLU 768, untied, vocabulary 8192) with the Microsoft recipe over
  # 20000 steps of 256-token sequences; a variant sets the batch and dtype.
  c = base_config()
  if not variant:
    c.model.dtype = "bfloat16"  # compute dtype on accelerators
    c.train.batch_size = 64  # sequences per step (16k tokens per step)
  elif variant in ("cpu", "cpu_fp"):  # float32: no fast bf16 on CPUs
    c.train.steps = 1100  # ~1.2 steps/s on two cores: about 15 minutes
    c.train.batch_size = 16  # 2k tokens per step
    c.train.seq_len = 128  # shorter context
    c.train.log_every = 25  # a metric line every 25 steps
    c.train.eval_every = 275  # four evaluations (and one at step 0)
    c.train.eval_batches = 4  # 64 fixed validation windows
    c.train.checkpoint_every = 275  # a resume point every ~4 minutes
    if variant == "cpu_fp":
      c.model.quantization = "none"  # the baseline's plain linear layers
      c.optimizer.learning_rate = 6e-4  # recipes.py FP peak (125m size)
      c.optimizer.stage2_learning_rate = 6e-4  # one peak, no drop
      c.optimizer.stage2_weight_decay = 0.1  # constant weight decay
  else:
    raise ValueError(f"configs/d20.py: unknown variant {variant!r}; use "
                     "configs/d20.py, configs/d20.py:cpu or "
                     "configs/d20.py:cpu_fp")
  return c
