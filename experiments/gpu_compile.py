r"""The research configs compiled for NVIDIA GPUs on this CPU host (issue 35).

For each (config, GPU target, variant) it compiles the train step `main`
would run with `bitnet_jax.aot.compile_step.compile_report` (JAX's CUDA
plugin, XLA's GPU specs; no GPU), the parameters FSDP-sharded over all GPUs
(`mesh.data=1, mesh.fsdp=-1`), bf16 compute, the configs' own remat policy
and loss chunking. The batch is 8 sequences per GPU at the config's
seq_len, except tiny and d20 (their own batch) and the 2B-4T fine-tune (its
own 8 x 2048, the defaults the README gives); each at least one sequence per
GPU. With --find_batch the int8
rows of h100-1 and h100-8 also search, per remat policy, the largest batch
toward the config's own `train.batch_size` and the best (policy, batch) by
estimated tokens/s. Each report is saved as JSON under
experiments/results/gpu_compile/ as soon as it is made (a stopped run
resumes; saved rows are skipped), and `--table` prints the Markdown table
for experiments/RESULTS.md. Memory is the compiler's; step time and MFU are
roofline estimates (no GPU ran them).

  python experiments/gpu_compile.py                 # compile what is missing
  python experiments/gpu_compile.py --find_batch    # and the batch searches
  python experiments/gpu_compile.py --table         # print the table
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import importlib  # noqa: E402

from bitnet_jax.aot import compile_step, find_batch, gpu  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                   "gpu_compile")
VARIANTS = {"none": {"quantization": "none"},
            "fake_quant": {"bitlinear_matmul": "fake_quant"},
            "int8": {"bitlinear_matmul": "int8"}}
SIZES = ("tiny", "d20", "125m", "700m", "1p3b", "3b", "2b4t")
TARGETS = ("h100-1", "h100-8", "h200-8", "h100-2x8")
SEARCHED = ("h100-1", "h100-8")  # --find_batch: int8 rows of these
PER_GPU_BATCH = 8


def job_config(size: str, variant: str, gpus: int | None):
  """The config of one row; `gpus` None keeps the config's own batch (the
  batch search's target)."""
  module = {"tiny": "configs.tiny", "d20": "configs.d20",
            "2b4t": "configs.bitnet_2b4t"}.get(size, f"configs.bitnet_{size}")
  config = importlib.import_module(module).get_config()
  with config.unlocked():
    for key, value in VARIANTS[variant].items():
      config.model[key] = value
    config.mesh.data, config.mesh.fsdp = 1, -1
    config.model.dtype = "bfloat16"
    if gpus and size not in ("tiny", "d20", "2b4t"):
      config.train.batch_size = PER_GPU_BATCH * gpus
      config.train.grad_accum_steps = 1
    if gpus and size in ("tiny", "d20", "2b4t"):  # a multiple of the GPUs
      config.train.batch_size = max(config.train.batch_size, gpus)
  return config


def run_job(size: str, target: str, variant: str, search: bool) -> None:
  path = os.path.join(OUT, f"{size}_{target}_{variant}.json")
  if os.path.exists(path):
    with open(path) as f:
      report = json.load(f)
    if not search or "find_batch" in report or "error" in report:
      return
  else:
    gpus = gpu.resolve(target).devices_count
    config = job_config(size, variant, gpus)
    try:
      report = compile_step.compile_report(config, target, eval_step=False)
    except compile_step.CompileError as e:
      report = {"topology": target, "error": str(e), "fits": False}
  if search and "error" not in report:
    try:
      report["find_batch"] = find_batch.find_batch(
          job_config(size, variant, None), target)
    except compile_step.CompileError as e:  # nothing fits one GPU
      report["find_batch"] = {"error": str(e)}
  os.makedirs(OUT, exist_ok=True)
  with open(path, "w") as f:
    json.dump(report, f, indent=1)
  print(path, "fits" if report["fits"] else "does not fit", flush=True)


def table() -> str:
  rows = ["| model | GPUs | variant | batch x seq | per GPU (GiB, of usable) "
          "| fits | best (remat, batch) | cuDNN attention | int8 GEMMs "
          "(dots, executions) | step >= (s, roofline) | MFU <= (roofline) "
          "| compile (s) |",
          "|" + "---|" * 12]
  order = {s: i for i, s in enumerate(SIZES)}
  targets = {t: i for i, t in enumerate(TARGETS)}
  reports = []
  for name in os.listdir(OUT):
    size, rest = name[:-5].split("_", 1)
    target, variant = rest.rsplit("_", 1) if not rest.endswith(
        "fake_quant") else (rest[:-len("_fake_quant")], "fake_quant")
    with open(os.path.join(OUT, name)) as f:
      reports.append((order[size], targets[target], list(VARIANTS).index(
          variant), size, target, variant, json.load(f)))
  for *_, size, target, variant, r in sorted(reports):
    if "error" in r:
      rows.append(f"| {size} | {target} | {variant} | | XLA refused: "
                  f"{r['error'][:80]} | no | | | | | | |")
      continue
    best = r.get("find_batch")
    best_text = ("" if not best else "none fits" if "error" in best else
                 f"{best['remat_policy']}, {best['largest_batch_size']}")
    cudnn = ("yes (fwd x{}, bwd x{})".format(r["cudnn_attention_forward"],
                                             r["cudnn_attention_backward"])
             if r["attention_kernel"] == "cudnn" else
             f"no ({r['attention_why_not_cudnn']})")
    int8 = (f"{r['int8_dots']}, {r['int8_dot_executions']}"
            if r["int8_dots"] else "0")
    rows.append(
        f"| {size} | {target} | {variant} | {r['batch_size']} x "
        f"{r['seq_len']} ({r['remat_policy']}) | "
        f"{r['per_chip_bytes'] / 2**30:.2f} of "
        f"{r['memory_limit_bytes'] / 2**30:.1f} | "
        f"{'yes' if r['fits'] else 'no'} | {best_text} | {cudnn} | {int8} | "
        f"{r['estimated_step_seconds']:.3f} | {100 * r['mfu']:.1f}% | "
        f"{r['compile_seconds']:.0f}{' (cuBLAS)' if r.get('compile_note') else ''} |")
  return "\n".join(rows)


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--table", action="store_true")
  parser.add_argument("--find_batch", action="store_true")
  args = parser.parse_args()
  if args.table:
    print(table())
  else:
    for size in SIZES:
      for target in TARGETS:
        for variant in VARIANTS:
          run_job(size, target, variant, args.find_batch and variant == "int8"
                  and target in SEARCHED)
