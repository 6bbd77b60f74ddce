r"""bitnet_2b4t: Microsoft's BitNet b1.58 2B-4T architecture, for fine-tuning.

Architecture from "BitNet b1.58 2B4T Technical Report" (arXiv 2504.12285) and
the released config.json (microsoft/bitnet-b1.58-2B-4T): 30 layers, d_model
2560, 20 heads with 5 key/value heads, FFN 6912 with squared ReLU, RoPE theta
5e5, RMSNorm eps 1e-5, vocabulary 128256, tied embeddings; 2.41B parameters.

Usage (the weights and tokenizer come from a local HF folder you downloaded,
e.g. microsoft/bitnet-b1.58-2B-4T-bf16):
  python -m bitnet_jax.convert import-hf --hf_dir=DIR --workdir=runs/2b4t_ft \
      --config=configs/bitnet_2b4t.py
  python -m bitnet_jax.main --config=runs/2b4t_ft/config.py \
      --workdir=runs/2b4t_ft --config.data.dataset='files:/data/*.txt'

Memory: float32 parameters, gradients and Adam's second moment take 4 bytes
per parameter each, the first moment 2 (optimizer.mu_dtype bfloat16). The
compiled step at batch 8 x 2048 on one H100 80GB (`python -m
bitnet_jax.compile --config=configs/bitnet_2b4t.py --topology=h100-1`)
needs 174.6 GiB without rematerialization; full rematerialization
(model.remat_policy) brings it to 47.6 GiB and the bf16 first moment to
43.2 GiB, inside the 59.3 GiB (75%) JAX preallocates. The loss's logits made
1024 positions at a time (train.loss_chunk_size) change nothing at batch 8
but let batch 16 fit (50.0 instead of 63.8 GiB). A v5p-8 runs it at 39.0
GiB per chip (data-parallel over its 4 chips). Figures and commands:
experiments/RESULTS.md ("Compiled for GPU"). Tokens per step = batch_size x
seq_len (16k here).
"""

from bitnet_jax.config import apply_fine_tuning, base_config


def get_config():
  """Returns the 2B-4T architecture with fine-tuning optimizer settings."""
  # base_config() has the released RMSNorm eps 1e-5, and data.tokenizer_path
  # "" until `convert import-hf` sets RUN/tokenizer.json.
  c = base_config()
  c.model.vocab_size = 128256  # Llama 3 tokenizer
  c.model.d_model = 2560  # hidden_size
  c.model.n_layers = 30  # num_hidden_layers
  c.model.n_heads = 20  # head dim 128
  c.model.n_kv_heads = 5  # grouped-query attention, 4 query heads per kv
  c.model.ffn_dim = 6912  # intermediate_size
  c.model.ffn_activation = "relu2"  # squared ReLU, as released
  c.model.rope_theta = 500000.0  # RoPE base
  c.model.tie_embeddings = True  # as released
  c.model.dtype = "bfloat16"  # compute dtype on accelerators
  c.train.steps = 2000  # a fine-tuning run; set for your data
  c.train.batch_size = 8  # sequences per step; set for your hardware
  c.train.seq_len = 2048  # tokens per sequence (the model saw up to 4096)
  c.train.log_every = 10  # a metric line every 10 steps
  c.train.eval_every = 200  # evaluations
  c.train.checkpoint_every = 200  # resume points
  # memory-lean: one 80 GB GPU (see the docstring)
  c.model.remat_policy = "full"  # recompute each block in the backward pass
  c.train.loss_chunk_size = 1024  # logits 1024 positions at a time
  c.optimizer.mu_dtype = "bfloat16"  # Adam's first moment in bf16
  apply_fine_tuning(c)  # LR 1.5e-4, one linear decay, no weight decay
  return c
