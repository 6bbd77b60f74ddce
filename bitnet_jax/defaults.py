"""The defaults shared by every config: `base_config()`, one comment per field.

Configs import it from `bitnet_jax.config`, which validates them
(`bitnet_jax.config.validate`).
"""

from __future__ import annotations

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Returns the defaults shared by every config (the BitNet b1.58 recipe).

  Sources: Microsoft, "The Era of 1-bit LLMs: Training Tips, Code and FAQ"
  (microsoft/unilm, bitnet/) for the optimizer; "BitNet b1.58 2B4T Technical
  Report" (arXiv 2504.12285) for the block layout.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0  # PRNG seed for parameter initialization

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 8192  # logits width; must be >= the tokenizer's vocabulary
  m.d_model = 256  # residual stream width
  m.n_layers = 6  # transformer blocks
  m.n_heads = 4  # attention heads; d_model must be divisible by n_heads
  m.n_kv_heads = 0  # key/value heads (GQA); 0 = n_heads; divides n_heads
  m.ffn_dim = 768  # hidden width of the gated feed-forward
  m.ffn_activation = "swiglu"  # "swiglu" (b1.58 paper) | "relu2" (2B4T)
  m.quantization = "ternary"  # "ternary" (BitLinear) | "none" (fp baseline)
  m.tie_embeddings = False  # share embed_tokens with lm_head (seeds: copying)
  m.rope_theta = 10000.0  # RoPE base frequency
  m.norm_eps = 1e-5  # RMSNorm epsilon
  m.init_std = 0.02  # stddev of the normal init of every weight
  m.dtype = "float32"  # compute dtype: "float32" | "bfloat16"; params are f32
  m.attention_implementation = "auto"  # "auto" (cudnn if GPU+bf16), xla, cudnn
  m.scan_layers = True  # stack blocks on a layers axis and jax.lax.scan them
  m.remat_policy = "none"  # none | full | dots_saveable | save_qkv_out
  m.bitlinear_matmul = "fake_quant"  # "fake_quant" | "int8" (int32 accumulate)
  m.dropout_rate = 0.0  # residual + attention dropout in training; 0 = off
  m.quantization_warmup_steps = 0  # blend fp -> ternary over N steps; 0 = off
  m.residual = "standard"  # "standard" | "mhc_lite" (hyper-connections)
  m.residual_streams = 2  # mhc_lite: parallel residual streams (2, 3 or 4)

  c.data = d = ml_collections.ConfigDict()
  d.dataset = "stdlib"  # "stdlib", "tfds:NAME", "SCHEME:GLOB" (see README)
  d.eval_dataset = ""  # "SCHEME:GLOB" of eval files; "" = held out by hash
  d.mode = "auto"  # "stream" | "prepared" (token cache); auto: stream for globs
  d.packing = "concat"  # "concat" | "document" (no attention across documents)
  d.data_dir = ""  # corpora, tokenizers, tokens; "" = ~/.cache/bitnet_jax
  d.text_feature = "text"  # text column / field / feature (tfds, parquet, ...)
  d.train_split = "train"  # TFDS split to train on
  d.eval_split = "validation"  # TFDS split to evaluate on
  d.eval_fraction = 0.05  # files held out by path hash (all but tfds:)
  d.tokenizer_path = ""  # a tokenizer.json; "" = train a byte-level BPE
  d.shuffle_seed = 0  # seed of the window shuffle (a new order every epoch)
  d.worker_count = 0  # grain worker processes; 0 = threads in this process
  d.prefetch_buffer_size = 4  # batches prepared ahead of the train step
  d.shuffle_buffer_size = 1024  # stream: documents per shuffled window
  d.read_concurrency = 4  # stream: files read at once per worker (interleave)

  c.train = t = ml_collections.ConfigDict()
  t.steps = 20000  # optimizer steps in the whole run
  t.batch_size = 256  # global batch, in sequences, across all hosts
  t.seq_len = 256  # tokens per training sequence (windows hold seq_len + 1)
  t.label_smoothing = 0.0  # label-smoothing weight in the cross-entropy
  t.z_loss_weight = 0.0  # weight of the z-loss, logsumexp(logits)**2
  t.entropy_weight = 0.0  # beta in loss - beta x mean predictive entropy
  t.loss_chunk_size = 0  # positions per chunk of the loss's logits; 0 = all
  t.grad_accum_steps = 1  # micro-batches per optimizer step (same batch_size)
  t.log_every = 50  # steps between metric lines
  t.eval_every = 1000  # steps between evaluations (and one at the end)
  t.eval_batches = 8  # batches of fixed validation windows per evaluation
  t.sample_prompts = 3  # validation prompts continued at each eval; 0 = off
  t.sample_prompt_tokens = 16  # tokens of each prompt (a validation window's)
  t.sample_new_tokens = 32  # greedy tokens generated per prompt
  t.checkpoint_every = 1000  # steps between checkpoints (and one at the end)
  t.keep_checkpoints = 3  # newest checkpoints kept (plus the best eval one)
  t.allow_config_change = False  # resume despite changed identity keys
  t.divergence_factor = 3.0  # stop if loss > factor x its running min; 0: off
  t.divergence_patience = 3  # consecutive losses above that before stopping
  t.lock_stale_seconds = 600.0  # another host's lock unrefreshed this long
  t.init_from = ""  # run dir or checkpoint whose params start a new run

  c.optimizer = o = ml_collections.ConfigDict()
  o.learning_rate = 1.5e-3  # stage-1 peak learning rate
  o.stage2_learning_rate = 1.0e-3  # stage-2 peak (FAQ: 1.5e-3 -> 1e-3 at 700M)
  o.warmup_steps = 375  # linear warmup from 0 to learning_rate
  o.stage_boundary = 0.5  # stage 2 starts at this fraction of train.steps
  o.final_learning_rate_fraction = 0.0  # end of the linear decay, x stage peak
  o.weight_decay = 0.1  # stage-1 decoupled weight decay
  o.stage2_weight_decay = 0.0  # stage-2 weight decay (seeds: must be 0.0)
  o.decay_embeddings = False  # also decay embed_tokens and lm_head
  o.b1 = 0.9  # Adam beta1
  o.b2 = 0.95  # Adam beta2
  o.eps = 1e-8  # Adam epsilon
  o.grad_clip_norm = 1.0  # global-norm gradient clipping; 0 disables

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel axis size; -1 = fill with remaining devices
  c.mesh.fsdp = 1  # parameter-sharding axis size; -1 = fill

  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = False  # multi-host: jax.distributed.initialize
  c.distributed.coordinator_address = ""  # "host:port"; "" = auto-detect
  c.distributed.num_processes = 0  # 0 = auto-detect
  c.distributed.process_id = -1  # -1 = auto-detect

  # Collapse alarms on every eval (bitnet_jax/health.py: the runs behind
  # these defaults and what each alarm says on the tiny config).
  c.health = h = ml_collections.ConfigDict()
  h.halt_on_alarm = False  # stop the run (HealthAlarmError) when one fires
  h.grace_steps = 400  # unigram phase after init: collapse alarms wait ...
  h.grace_fraction = 0.1  # ... max(grace_steps, this x train.steps) steps
  h.patience = 2  # consecutive evals an alarm must hold (not loss_too_fast)
  h.copy_rate_floor = 0.2  # copying: copy_rate >= this and >= eval_accuracy
  h.min_unique_predictions = 12  # vocabulary_collapse below (seeds: 2-8)
  h.max_top_token_share = 0.5  # frequency_collapse above (unigram phase: 1)
  h.memorization_gap = 1.5  # nats of eval_loss above the recent train loss
  h.loss_too_fast_fraction = 0.45  # x ln(vocab_size) nats: loss_too_fast ...
  h.loss_too_fast_steps = 500  # ... when the train loss is below it by here
  return c


def apply_fine_tuning(c: ml_collections.ConfigDict) -> None:
  """Sets the optimizer for fine-tuning a pretrained ternary model.

  A pretrained model needs neither the pretraining recipe's two stages nor
  its weight decay: one linear decay from a small peak (1/10 of the 700M
  pretraining peak), no weight decay, so the ternary assignment the model
  learned is moved gently.
  """
  o = c.optimizer
  o.learning_rate = 1.5e-4  # peak; the FAQ pretrains at 1.5e-3
  o.stage2_learning_rate = 1.5e-4  # no stage-boundary drop
  o.warmup_steps = 50  # short warmup
  o.final_learning_rate_fraction = 0.1  # decay to 1.5e-5
  o.weight_decay = 0.0  # keep the pretrained weights' scale
  o.stage2_weight_decay = 0.0
