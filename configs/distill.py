"""distill: turn a converted full-precision model into a 1.58-bit one.

The BitDistill recipe (Wu et al., "BitNet Distillation", arXiv 2510.13998)
after `convert import-hf` (its stage 1, SubLN: `--sub_norms=insert`):

  # the student (ternary, sub-norms inserted) and the frozen teacher
  python -m bitnet_jax.convert import-hf --hf_dir=hf/qwen3 --workdir=runs/q_ternary
  python -m bitnet_jax.convert import-hf --hf_dir=hf/qwen3 --workdir=runs/q_fp \\
      --quantization=none --sub_norms=none
  # stage 2: continued pre-training of the student, quantization warm-up on
  python -m bitnet_jax.main --config=configs/distill.py:continue,runs/q_ternary \\
      --workdir=runs/q_continue --config.data.dataset='parquet:/data/web/*.parquet'
  # stage 3: distillation-based fine-tuning against the teacher
  python -m bitnet_jax.main --config=configs/distill.py:distill,runs/q_continue,runs/q_fp \\
      --workdir=runs/q_distill --config.data.dataset='jsonl:/data/task/*.jsonl'

The argument is "STAGE,STUDENT_RUN[,TEACHER_RUN]": the student run gives the
model (its config.py or config.json) and the starting weights
(`train.init_from`, its newest checkpoint); the teacher run is the
full-precision import. Every other field can be overridden with --config.*
as for any config. The result exports with `convert export-hf` / GGUF like
any BitNet run (the export refuses, naming the field, what BitNet's format
cannot hold: Qwen's biases and QK-norm, Llama 3.1's RoPE scaling).

Published values (BitDistill sec. 4, as read by this file's author; this
machine cannot reach the paper, so check them there before citing):
temperature tau = 5.0; lambda (logits) = 10 and gamma (attention) = 1e5 for
classification, lambda = 1 and gamma = 1e3 for summarization; stage 2 on
10B tokens of a general corpus; relations distilled at one (late) layer.
Values marked "ours" are this project's choices, not published ones.
"""

from bitnet_jax.config import ConfigError
from bitnet_jax.runs import reader

STAGES = ("continue", "distill")


def get_config(argument: str = ""):
  """Returns the stage's config for "STAGE,STUDENT_RUN[,TEACHER_RUN]".

  Raises:
    ConfigError: naming the argument when the stage is unknown, a run is
      missing, or the distill stage has no teacher.
  """
  parts = [p for p in argument.split(",") if p]
  if len(parts) < 2 or parts[0] not in STAGES:
    raise ConfigError(
        f"--config=configs/distill.py:{argument}: give STAGE,STUDENT_RUN"
        f"[,TEACHER_RUN] with STAGE one of {', '.join(STAGES)} (e.g. "
        "configs/distill.py:distill,runs/q_continue,runs/q_fp)")
  stage, student = parts[0], parts[1]
  c = reader.load_run_config(student)  # the converted model, as imported
  c.train.init_from = student  # its newest checkpoint starts this stage
  c.model.quantization = "ternary"
  c.optimizer.learning_rate = 1e-4  # ours: a fine-tuning peak, not 1.5e-3
  c.optimizer.stage2_learning_rate = 5e-5  # ours: half of it after 50%
  c.optimizer.warmup_steps = 100  # ours
  if stage == "continue":
    c.train.steps = 10000  # ours (BitDistill: 10B tokens; set to your budget)
    # ours: lambda from 0 to 1 over the first 10% (the HF 1.58-bit
    # fine-tuning's quantization warm-up, bitnet_jax.model.transformer.quantization_blend)
    c.model.quantization_warmup_steps = 1000
    return c
  if len(parts) < 3:
    raise ConfigError(
        f"--config=configs/distill.py:{argument}: the distill stage needs "
        "the teacher run: distill,STUDENT_RUN,TEACHER_RUN")
  c.train.teacher = parts[2]  # the full-precision import, frozen
  c.train.steps = 2000  # ours: a fine-tuning run
  c.model.quantization_warmup_steps = 0  # stage 2 already warmed it in
  c.train.ce_weight = 1.0  # BitDistill eq. 13: L_CE + lambda L_LD + gamma L_AD
  c.train.distill_logit_weight = 10.0  # lambda (published, classification)
  c.train.distill_temperature = 5.0  # tau (published)
  c.train.distill_attention_weight = 1e5  # gamma (published, classification)
  c.train.distill_attention_layer = -1  # ours: the last block
  return c
