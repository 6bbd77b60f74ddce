"""Research-size configs from Microsoft's BitNet b1.58 FAQ tables.

Source: Microsoft, "The Era of 1-bit LLMs: Training Tips, Code and FAQ"
(microsoft/unilm, bitnet/), reproduced in BITNET_FACTS.md: 100B tokens at
about 1M tokens per step, sequence length 2048, warmup 375, Adam (0.9, 0.95),
weight decay 0.1 in stage 1 and 0 in stage 2, and a stage-2 peak learning
rate below the stage-1 one. The FP16 baselines of the same tables use one
learning rate (2.5e-4 at 700M, 2e-4 above) and a constant weight decay 0.1.
"""

from __future__ import annotations

import ml_collections

from bitnet_jax.config import base_config

# size: (d_model, ffn_dim, n_heads, n_layers, stage-1 LR, stage-2 LR, fp LR)
FAQ_SIZES = {
    "700m": (1536, 4096, 24, 24, 1.5e-3, 1.0e-3, 2.5e-4),
    "1p3b": (2048, 5460, 32, 24, 1.2e-3, 8.0e-4, 2.0e-4),
    "3b": (3200, 8640, 32, 26, 1.2e-3, 8.0e-4, 2.0e-4),
    # not in the FAQ: the GPT-3 Small shape (Brown et al., arXiv 2005.14165)
    # with the 700M recipe, a 125M-class model to benchmark on small hosts
    "125m": (768, 2048, 12, 12, 1.5e-3, 1.0e-3, 6.0e-4),
}
TOKENS_PER_STEP = 2**20  # the FAQ's ~1M-token batch
TOTAL_TOKENS = 100e9  # the FAQ's 100B-token runs


def faq_config(size: str, variant: str = "") -> ml_collections.ConfigDict:
  """The FAQ recipe at `size`; `variant` "" (ternary) or "fp" (baseline).

  The global batch is 512 sequences of 2048 tokens (1,048,576 tokens per
  step, the FAQ's 1M) over 95,367 steps (100B tokens). Set
  `train.batch_size` (tokens per step = batch_size x seq_len) and
  `train.grad_accum_steps` (micro-batch = batch_size / grad_accum_steps,
  split over all devices) for the hardware, see docs/training.md's Performance
  section. Usage, e.g.:

    python -m bitnet_jax.main --config=configs/bitnet_700m.py \
        --workdir=runs/700m --config.train.grad_accum_steps=8 \
        --config.data.dataset='parquet:/data/fineweb/*.parquet'
    python -m bitnet_jax.main --config=configs/bitnet_700m.py:fp ...

  Raises:
    ValueError: for an unknown size or variant, naming the config file.
  """
  if size not in FAQ_SIZES:
    raise ValueError(f"unknown FAQ size {size!r}; use one of "
                     f"{', '.join(FAQ_SIZES)}")
  if variant not in ("", "fp"):
    raise ValueError(f"configs/bitnet_{size}.py: unknown variant {variant!r};"
                     f" use configs/bitnet_{size}.py or "
                     f"configs/bitnet_{size}.py:fp")
  d_model, ffn_dim, n_heads, n_layers, lr, lr2, fp_lr = FAQ_SIZES[size]
  # base_config() holds the rest of the FAQ recipe: SwiGLU, warmup 375,
  # Adam (0.9, 0.95), weight decay 0.1 -> 0, an eval and a checkpoint every
  # 1000 steps (each checkpoint carries an eval loss, for retention).
  c = base_config()
  m, t, o = c.model, c.train, c.optimizer
  m.vocab_size = 32000  # the LLaMA tokenizer's size, as in the FAQ runs
  m.d_model, m.ffn_dim = d_model, ffn_dim  # FAQ table
  m.n_heads, m.n_layers = n_heads, n_layers  # FAQ table
  m.dtype = "bfloat16"  # compute dtype on accelerators
  m.remat_policy = "save_qkv_out"  # recompute attention and FFN internals
  t.seq_len = 2048  # the FAQ's context
  t.batch_size = TOKENS_PER_STEP // t.seq_len  # 512 sequences
  t.steps = round(TOTAL_TOKENS / TOKENS_PER_STEP)  # 95,367: 100B tokens
  t.loss_chunk_size = 512  # [batch, 512, 32000] logits at a time
  o.learning_rate, o.stage2_learning_rate = lr, lr2  # FAQ stage peaks
  if variant == "fp":
    m.quantization = "none"  # the FP16 baseline's plain linear layers
    o.learning_rate = o.stage2_learning_rate = fp_lr  # one peak, no drop
    o.stage2_weight_decay = 0.1  # constant weight decay
  return c
