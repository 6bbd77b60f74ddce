"""The config's field table and `base_config()`, the defaults it holds.

`FIELDS` has one entry per config key: key, default, allowed values (a
`bitnet_jax.config.fields.Rule`), resume class and a one-line doc.
`base_config()` is built from it, `bitnet_jax.config.validate` checks every
field with its rule, and `bitnet_jax.runs.identity` reads the resume classes.
A new field gets its default, range and doc on one entry here, or none.

Sources: Microsoft, "The Era of 1-bit LLMs: Training Tips, Code and FAQ"
(microsoft/unilm, bitnet/) for the optimizer; "BitNet b1.58 2B4T Technical
Report" (arXiv 2504.12285) for the block layout.
"""

from __future__ import annotations

import ml_collections

from bitnet_jax.config.choices import (
  AttentionImplementation,
  BitLinearMatmul,
  DataMode,
  Dtype,
  FfnActivation,
  Packing,
  Quantization,
  RematPolicy,
  Residual,
  RopeScaling,
)
from bitnet_jax.config.fields import (
  FLAG,
  IDENTITY,
  RUNTIME,
  SCHEDULE,
  TEXT,
  choice,
  field_table,
  integer,
  number,
)
from bitnet_jax.config.fields import Field as F
from bitnet_jax.storage import deadline

# F(key, default, allowed values, resume class, doc). A number field's default
# is a float (ConfigDict then casts an int assigned to it); ranges that depend
# on another field (e.g. loss_chunk_size divides seq_len) are checked by
# bitnet_jax.config.validate, and the rule here gives the type. A choice field
# allows its enum's values (bitnet_jax.config.choices), and its default is a
# member's plain string (`.value`).
FIELDS = field_table(
    F("seed", 0, integer(">= 0"), IDENTITY,
      "PRNG seed for parameter initialization"),

    F("model.vocab_size", 8192, integer(">= 1"), IDENTITY,
      "logits width; must be >= the tokenizer's vocabulary"),
    F("model.d_model", 256, integer(">= 1"), IDENTITY,
      "residual stream width; divisible by n_heads"),
    F("model.n_layers", 6, integer(">= 1"), IDENTITY, "transformer blocks"),
    F("model.n_heads", 4, integer(">= 1"), IDENTITY,
      "attention heads; d_model / n_heads even (RoPE)"),
    F("model.head_dim", 0, integer(">= 0"), IDENTITY,
      "per-head width; 0 = d_model / n_heads (Qwen3 sets its own)"),
    F("model.attention_bias", False, FLAG, IDENTITY,
      "full-precision q/k/v biases (Qwen2); BitNet has none"),
    F("model.qk_norm", False, FLAG, IDENTITY,
      "RMSNorm of each query and key head before RoPE (Qwen3)"),
    F("model.n_kv_heads", 0, integer(), IDENTITY,
      "key/value heads (GQA); 0 = n_heads; divides n_heads"),
    F("model.ffn_dim", 768, integer(">= 1"), IDENTITY,
      "hidden width of the gated feed-forward"),
    F("model.ffn_activation", FfnActivation.SWIGLU.value,
      choice(FfnActivation), IDENTITY,
      "'swiglu' (b1.58 paper) or 'relu2' (2B4T)"),
    F("model.quantization", Quantization.TERNARY.value, choice(Quantization),
      IDENTITY, "'ternary' (BitLinear) or 'none' (fp baseline)"),
    F("model.tie_embeddings", False, FLAG, IDENTITY,
      "share embed_tokens with lm_head (docs/failing_loudly.md: tied ->"
      " copying)"),
    F("model.rope_theta", 10000.0, number("> 0"), IDENTITY,
      "RoPE base frequency"),
    F("model.rope_scaling", RopeScaling.NONE.value, choice(RopeScaling),
      IDENTITY,
      "'llama3': Llama 3.1's frequency scaling (imported Llama 3 models)"),
    F("model.rope_scaling_factor", 8.0, number(">= 1"), IDENTITY,
      "llama3: low frequencies are divided by this ('factor')"),
    F("model.rope_low_freq_factor", 1.0, number("> 0"), IDENTITY,
      "llama3: 'low_freq_factor'"),
    F("model.rope_high_freq_factor", 4.0, number("> 0"), IDENTITY,
      "llama3: 'high_freq_factor' (> rope_low_freq_factor)"),
    F("model.rope_original_context", 8192, integer(">= 1"), IDENTITY,
      "llama3: 'original_max_position_embeddings'"),
    F("model.sub_norms", True, FLAG, IDENTITY,
      "RMSNorm before o_proj and down_proj (2B4T, BitDistill's SubLN)"),
    F("model.norm_eps", 1e-5, number("> 0"), IDENTITY, "RMSNorm epsilon"),
    F("model.init_std", 0.02, number("> 0"), IDENTITY,
      "stddev of the normal init of every weight"),
    F("model.dtype", Dtype.FLOAT32.value, choice(Dtype), IDENTITY,
      "compute dtype; parameters are float32"),
    F("model.attention_implementation", AttentionImplementation.AUTO.value,
      choice(AttentionImplementation), RUNTIME,
      "'auto': cudnn on GPU with bfloat16, else xla"),
    F("model.scan_layers", True, FLAG,
      RUNTIME,  # a resume takes its checkpoints' layout (run.py)
      "stack blocks on a layers axis and jax.lax.scan them"),
    F("model.remat_policy", RematPolicy.NONE.value, choice(RematPolicy),
      RUNTIME,
      "what the backward pass recomputes instead of storing"),
    F("model.bitlinear_matmul", BitLinearMatmul.FAKE_QUANT.value,
      choice(BitLinearMatmul), RUNTIME,
      "'int8': ternary x int8 with int32 accumulation"),
    F("model.dropout_rate", 0.0, number("[0, 1)"), IDENTITY,
      "residual + attention dropout in training; 0 = off"),
    F("model.quantization_warmup_steps", 0, integer(">= 0"), IDENTITY,
      "blend fp -> ternary over this many steps; 0 = off"),
    F("model.residual", Residual.STANDARD.value, choice(Residual), IDENTITY,
      "'mhc_lite': manifold-constrained hyper-connections"),
    F("model.residual_streams", 2, integer("[2, 4]"), IDENTITY,
      "mhc_lite: parallel residual streams, mixed by all n! permutations"),

    F("data.dataset", "stdlib", TEXT, IDENTITY,
      "'stdlib', 'tfds:NAME' or 'SCHEME:GLOB' (see docs/data.md)"),
    F("data.eval_dataset", "", TEXT, IDENTITY,
      "'SCHEME:GLOB' of eval files; '' = held out by hash"),
    F("data.mode", DataMode.AUTO.value, choice(DataMode), IDENTITY,
      "'stream', 'prepared' (token cache); 'auto': stream for globs"),
    F("data.packing", Packing.CONCAT.value, choice(Packing), IDENTITY,
      "'document': no attention across documents"),
    F("data.data_dir", "", TEXT, RUNTIME,
      "corpora, tokenizers, tokens; '' = ~/.cache/bitnet_jax; gs://… is "
      "shared by hosts through a local mirror"),
    F("data.text_feature", "text", TEXT, IDENTITY,
      "text column / field / feature (tfds, parquet, ...)"),
    F("data.train_split", "train", TEXT, IDENTITY, "TFDS split to train on"),
    F("data.eval_split", "validation", TEXT, IDENTITY,
      "TFDS split to evaluate on"),
    F("data.eval_fraction", 0.05, number("(0, 1)"), IDENTITY,
      "files held out by path hash (all but tfds:)"),
    F("data.tokenizer_path", "", TEXT, IDENTITY,
      "a tokenizer.json; '' = train a byte-level BPE"),
    F("data.shuffle_seed", 0, integer(">= 0"), IDENTITY,
      "seed of the window shuffle (a new order every epoch)"),
    F("data.worker_count", 0, integer(">= 0"), IDENTITY,
      "grain worker processes; 0 = threads in this process"),
    F("data.prefetch_buffer_size", 4, integer(">= 1"), RUNTIME,
      "batches prepared ahead of the train step"),
    F("data.shuffle_buffer_size", 1024, integer(">= 1"), IDENTITY,
      "stream: documents per shuffled window"),
    F("data.read_concurrency", 4, integer(">= 1"), IDENTITY,
      "stream: files read at once per worker (interleave)"),

    F("train.steps", 20000, integer(">= 1"), SCHEDULE,
      "optimizer steps in the whole run"),
    F("train.batch_size", 256, integer(">= 1"), IDENTITY,
      "global batch, in sequences, across all hosts"),
    F("train.seq_len", 256, integer(">= 1"), IDENTITY,
      "tokens per training sequence (windows hold seq_len + 1)"),
    F("train.label_smoothing", 0.0, number("[0, 1)"), IDENTITY,
      "label-smoothing weight in the cross-entropy"),
    F("train.z_loss_weight", 0.0, number(">= 0"), IDENTITY,
      "weight of the z-loss, logsumexp(logits)**2"),
    F("train.entropy_weight", 0.0, number(">= 0"), IDENTITY,
      "beta in loss - beta x mean predictive entropy"),
    F("train.loss_chunk_size", 0, integer(), RUNTIME,
      "positions per chunk of the loss's logits; 0 = all"),
    F("train.grad_accum_steps", 1, integer(), RUNTIME,
      "micro-batches per optimizer step (same batch_size)"),
    F("train.log_every", 50, integer(">= 1"), SCHEDULE,
      "steps between metric lines"),
    F("train.eval_every", 1000, integer(">= 1"), SCHEDULE,
      "steps between evaluations (and one at the end)"),
    F("train.eval_batches", 8, integer(">= 1"), SCHEDULE,
      "batches of fixed validation windows per evaluation"),
    F("train.sample_prompts", 3, integer(">= 0"), SCHEDULE,
      "validation prompts continued at each eval; 0 = off"),
    F("train.sample_prompt_tokens", 16, integer(">= 0"), SCHEDULE,
      "tokens of each prompt (a validation window's)"),
    F("train.sample_new_tokens", 32, integer(">= 0"), SCHEDULE,
      "greedy tokens generated per prompt"),
    F("train.checkpoint_every", 1000, integer(">= 1"), SCHEDULE,
      "steps between checkpoints (and one at the end)"),
    F("train.keep_checkpoints", 3, integer(">= 1"), SCHEDULE,
      "newest checkpoints kept (plus the best eval one)"),
    F("train.allow_config_change", False, FLAG, RUNTIME,
      "resume despite changed identity keys"),
    F("train.start_over_if_unrestorable", False, FLAG, RUNTIME,
      "when no checkpoint of the run restores, start again at step 0, its "
      "metrics, samples and TensorBoard files kept in damaged_checkpoints/"),
    F("train.divergence_factor", 3.0, number("> 1", special=(0, "off")),
      SCHEDULE, "stop when the loss exceeds this x its running minimum"),
    F("train.divergence_patience", 3, integer(">= 1"), SCHEDULE,
      "consecutive losses above that limit before stopping"),
    F("train.lock_stale_seconds", 600.0, number("> 0"), RUNTIME,
      "seconds after which another host's unrefreshed lock is stale"),
    F("train.storage_timeout_seconds", deadline.DEFAULT_SECONDS,
      number("> 0"), RUNTIME,
      "deadline of each object-store (gs://) operation: checkpoint save, "
      "restore, appends, the lock; past it the run fails naming the path "
      "and the endpoint"),
    F("train.init_from", "", TEXT,
      RUNTIME,  # read at step 0 only: a resume restores its checkpoint
      "run dir or checkpoint whose params start a new run"),
    # Distillation from a frozen teacher (bitnet_jax.training.objectives;
    # BitDistill,
    # arXiv 2510.13998): loss = ce_weight x CE + distill_logit_weight x KL
    # + distill_attention_weight x attention-relation KL.
    F("train.teacher", "", TEXT, IDENTITY,
      "teacher run dir or RUN/checkpoints/N; '' = no teacher"),
    F("train.ce_weight", 1.0, number(">= 0"), IDENTITY,
      "weight of the next-token cross-entropy"),
    F("train.distill_logit_weight", 0.0, number(">= 0"), IDENTITY,
      "weight of T^2 KL(teacher || student) of the logits"),
    F("train.distill_temperature", 1.0, number("> 0"), IDENTITY,
      "softmax temperature T of the logit distillation"),
    F("train.distill_attention_weight", 0.0, number(">= 0"), IDENTITY,
      "weight of the Q-Q/K-K/V-V attention-relation KL"),
    F("train.distill_attention_layer", -1, integer(), IDENTITY,
      "block whose relations are distilled; -1 = the last"),

    F("optimizer.learning_rate", 1.5e-3, number(">= 0"), IDENTITY,
      "stage-1 peak learning rate"),
    F("optimizer.stage2_learning_rate", 1.0e-3, number(">= 0"), IDENTITY,
      "stage-2 peak (FAQ: 1.5e-3 -> 1e-3 at 700M)"),
    F("optimizer.warmup_steps", 375, integer(">= 0"), IDENTITY,
      "linear warmup from 0 to learning_rate; ends in stage 1"),
    F("optimizer.stage_boundary", 0.5, number("(0, 1)"), IDENTITY,
      "stage 2 starts at this fraction of train.steps"),
    F("optimizer.final_learning_rate_fraction", 0.0, number("[0, 1]"),
      IDENTITY, "end of the linear decay, x the stage peak"),
    F("optimizer.weight_decay", 0.1, number(">= 0"), IDENTITY,
      "stage-1 decoupled weight decay"),
    F("optimizer.stage2_weight_decay", 0.0, number(">= 0"), IDENTITY,
      "stage-2 weight decay (FAQ recipe: none in stage 2)"),
    F("optimizer.decay_embeddings", False, FLAG, IDENTITY,
      "also decay embed_tokens and lm_head"),
    F("optimizer.b1", 0.9, number("[0, 1)"), IDENTITY, "Adam beta1"),
    F("optimizer.b2", 0.95, number("[0, 1)"), IDENTITY, "Adam beta2"),
    F("optimizer.eps", 1e-8, number(">= 0"), IDENTITY, "Adam epsilon"),
    F("optimizer.mu_dtype", Dtype.FLOAT32.value, choice(Dtype), IDENTITY,
      "dtype of Adam's first moment (optax mu_dtype); bfloat16 saves 2 "
      "bytes per parameter"),
    F("optimizer.grad_clip_norm", 1.0, number(">= 0"), IDENTITY,
      "global-norm gradient clipping; 0 disables"),

    F("mesh.data", -1, integer(">= 1", special=(-1, "fill")), RUNTIME,
      "data-parallel axis size; -1 = the remaining devices"),
    F("mesh.fsdp", 1, integer(">= 1", special=(-1, "fill")), RUNTIME,
      "parameter-sharding axis size; -1 = the remaining devices"),

    F("distributed.initialize", False, FLAG, RUNTIME,
      "multi-host: call jax.distributed.initialize"),
    F("distributed.coordinator_address", "", TEXT, RUNTIME,
      "'host:port'; '' = auto-detect"),
    F("distributed.num_processes", 0, integer(">= 0"), RUNTIME,
      "processes in the job; 0 = auto-detect"),
    F("distributed.process_id", -1, integer(">= 0", special=(-1, "auto")),
      RUNTIME, "this process's index; -1 = auto-detect"),

    # Collapse alarms on every eval (bitnet_jax/metrics/health.py: the runs
    # behind
    # these defaults and what each alarm says on the tiny config).
    F("health.halt_on_alarm", False, FLAG, RUNTIME,
      "stop the run (HealthAlarmError) when an alarm fires"),
    F("health.grace_steps", 400, integer(">= 0"), RUNTIME,
      "collapse alarms wait at least this many steps (unigram phase)"),
    F("health.grace_fraction", 0.1, number("[0, 1)"), RUNTIME,
      "collapse alarms wait this fraction of train.steps, if longer"),
    F("health.patience", 2, integer(">= 1"), RUNTIME,
      "consecutive evals an alarm must hold (loss_too_fast: 1)"),
    F("health.copy_rate_floor", 0.2, number("(0, 1]"), RUNTIME,
      "copying: copy_rate >= this and >= eval_accuracy"),
    F("health.min_unique_predictions", 12, integer(">= 1"), RUNTIME,
      "vocabulary_collapse below this many distinct predictions"),
    F("health.max_top_token_share", 0.5, number("(0, 1)"), RUNTIME,
      "frequency_collapse above this top-token share"),
    F("health.memorization_gap", 1.5, number("> 0"), RUNTIME,
      "nats of eval_loss above the recent train loss"),
    F("health.loss_too_fast_fraction", 0.45, number("[0, 1)"), RUNTIME,
      "loss_too_fast: train loss below this x ln(vocab_size); 0 = off"),
    F("health.loss_too_fast_steps", 500, integer(">= 0"), RUNTIME,
      "loss_too_fast is checked at steps <= this only"),

    # lm-evaluation-harness tasks during training (bitnet_jax/evaluation).
    F("eval.harness_tasks", "", TEXT, SCHEDULE,
      "lm-eval tasks, comma separated; '' = none"),
    F("eval.harness_every", 0, integer(">= 0"), SCHEDULE,
      "steps between harness evaluations; 0 = at the end only"),
    F("eval.harness_include_path", "", TEXT, SCHEDULE,
      "folders of local lm-eval YAML tasks, comma separated"),
    F("eval.harness_num_fewshot", -1, integer(">= 0", special=(-1, "task's")),
      SCHEDULE, "few-shot examples per prompt; -1 = each task's default"),
    F("eval.harness_limit", 0, integer(">= 0"), SCHEDULE,
      "documents per task; 0 = all"),
    F("eval.harness_batch_size", 16, integer(">= 1"), RUNTIME,
      "rows per harness scoring / decoding call"),
)


def base_config() -> ml_collections.ConfigDict:
  """The defaults shared by every config (the BitNet b1.58 recipe).

  Returns:
    A ConfigDict with every key of `FIELDS` at its default, sections in
    table order (`seed`, model, data, train, optimizer, mesh, distributed,
    health, eval).
  """
  config = ml_collections.ConfigDict()
  for key, field in FIELDS.items():
    *sections, name = key.split(".")
    node = config
    for section in sections:
      if section not in node:
        node[section] = ml_collections.ConfigDict()
      node = node[section]
    node[name] = field.default
  return config


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
  o.stage2_weight_decay = 0.0  # and no decay after the boundary either
