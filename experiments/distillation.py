r"""Full precision to ternary four ways at one token budget, against scratch.

  python experiments/distillation.py --out=runs/distillation [--preset=cpu]

A full-precision teacher (`model.quantization="none"`, the student's shape)
trains first on the embedded stdlib corpus. Then five ternary students train
for the same steps on the same data order (the config's seed), each
evaluated on the same validation windows:

  fp_continued  the teacher itself trained on (full precision): what the
                same tokens give without quantization, the reference
  scratch       ternary from a random init (no teacher)
  qat           ternary from the teacher's weights, cross-entropy only
  warmup        + `model.quantization_warmup_steps` (lambda 0 -> 1 over the
                first half)
  logit_kd      + logit distillation from the frozen teacher (weight 1, T 2)
  attention_kd_10, attention_kd_100
                + attention-relation distillation of the last block, at
                weight 10 and 100

Prints a markdown table (eval loss in nats, its gap to the teacher's, unique
predictions of the eval windows, copy rate) and writes OUT/summary.json. A
rerun resumes or skips runs already in OUT.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bitnet_jax import metrics
from bitnet_jax.config import base_config  # noqa: E402
from bitnet_jax.training import loop  # noqa: E402

FLAGS = flags.DEFINE_string("out", "runs/distillation", "output directory")
PRESET = flags.DEFINE_enum("preset", "cpu", ["cpu", "smoke"],
                           "cpu: ~13 minutes on 2 cores; smoke: seconds")

# (teacher steps, student steps) per preset
STEPS = {"cpu": (2000, 300), "smoke": (8, 6)}
KD = {"train.distill_logit_weight": 1.0, "train.distill_temperature": 2.0}
STUDENTS = {
    "fp_continued": {"init": True, "model.quantization": "none"},
    "scratch": {},
    "qat": {"init": True},
    "warmup": {"init": True, "warmup": True},
    "logit_kd": {"init": True, "warmup": True, **KD},
    "attention_kd_10": {"init": True, "warmup": True, **KD,
                        "train.distill_attention_weight": 10.0},
    "attention_kd_100": {"init": True, "warmup": True, **KD,
                         "train.distill_attention_weight": 100.0},
}


def model_config(preset: str, steps: int):
  """The shared shape: 4 blocks of width 128 on the 512-token vocabulary."""
  c = base_config()
  c.model.vocab_size = 512
  c.model.d_model, c.model.n_layers = 128, 4
  c.model.n_heads, c.model.ffn_dim = 4, 384
  c.train.batch_size, c.train.seq_len = 16, 64  # 1,024 tokens per step
  c.train.steps = steps
  c.train.log_every = max(1, steps // 10)
  c.train.eval_every = c.train.checkpoint_every = steps
  c.train.eval_batches = 4  # 64 fixed validation windows
  c.train.sample_prompts = 0
  c.optimizer.warmup_steps = max(1, steps // 10)
  if preset == "smoke":
    c.model.d_model, c.model.n_layers, c.model.ffn_dim = 64, 2, 128
  return c


def run_student(name: str, fields: dict, teacher: str, out: str,
                steps: int) -> dict:
  c = model_config(PRESET.value, steps)
  c.data.tokenizer_path = os.path.join(teacher, "tokenizer.json")
  c.data.data_dir = os.path.join(out, "data")
  if fields.get("init"):
    c.train.init_from = teacher
  if fields.get("warmup"):
    c.model.quantization_warmup_steps = steps // 2
  for key, value in fields.items():
    if "." in key:
      section, field = key.split(".")
      c[section][field] = value
  if c.train.distill_logit_weight or c.train.distill_attention_weight:
    c.train.teacher = teacher
  workdir = os.path.join(out, name)
  loop.train_and_evaluate(c, workdir)
  return final_eval(workdir)


def final_eval(workdir: str) -> dict:
  records = [r for r in metrics.read_records(workdir) if "eval_loss" in r]
  last = records[-1]
  return {k: last[k] for k in ("step", "eval_loss", "unique_predictions",
                               "copy_rate", "eval_accuracy") if k in last}


def main(argv):
  del argv
  out = os.path.abspath(FLAGS.value)
  teacher_steps, student_steps = STEPS[PRESET.value]
  c = model_config(PRESET.value, teacher_steps)
  c.model.quantization = "none"
  c.optimizer.learning_rate = 1e-3  # the fp recipe's single peak
  c.optimizer.stage2_learning_rate = 1e-3
  c.data.data_dir = os.path.join(out, "data")
  teacher = os.path.join(out, "teacher")
  loop.train_and_evaluate(c, teacher)
  rows = {"teacher": final_eval(teacher)}
  for name, fields in STUDENTS.items():
    logging.info("student %s", name)
    rows[name] = run_student(name, fields, teacher, out, student_steps)
  with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
    json.dump({"teacher_steps": teacher_steps, "student_steps": student_steps,
               "tokens_per_step": c.train.batch_size * c.train.seq_len,
               "rows": rows}, f, indent=1)
  base = rows["teacher"]["eval_loss"]
  print("| run | eval loss (nats) | gap to teacher | unique predictions "
        "| copy rate |")
  print("|---|---|---|---|---|")
  for name, row in rows.items():
    print(f"| {name} | {row['eval_loss']:.4f} | {row['eval_loss'] - base:+.4f}"
          f" | {row.get('unique_predictions', float('nan')):.0f} | "
          f"{row.get('copy_rate', float('nan')):.3f} |")


if __name__ == "__main__":
  app.run(main)
