r"""Research configs compiled for TPU slices on this CPU host (issue 17).

For each (config, slice, variant) it compiles the train step with
`bitnet_jax.aot.compile_step.compile_report` at 8 sequences of 2048 tokens
per chip, FSDP over the slice (`mesh.fsdp=-1, mesh.data=1`), and, where
asked, searches the largest batch with `find_batch`. Each report is saved
as JSON under experiments/results/tpu_compile/ as soon as it is made (a
long run can be stopped and resumed: saved rows are skipped), and
`--table` prints the Markdown table for experiments/RESULTS.md from them.
All figures are XLA's compiler estimates, not measurements.

  python experiments/tpu_compile.py               # compile what is missing
  python experiments/tpu_compile.py --table       # print the table
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import importlib  # noqa: E402

from bitnet_jax.aot import compile_step, find_batch  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                   "tpu_compile")
VARIANTS = {"none": {"quantization": "none"},
            "fake_quant": {"bitlinear_matmul": "fake_quant"},
            "int8": {"bitlinear_matmul": "int8"}}
# (size, slice, variants, search the largest batch): the note's 700M rows
# first, then the larger models
JOBS = ([("700m", s, v, v == "int8") for s in ("v5p-8", "v5e-8")
         for v in VARIANTS]
        + [("700m", "v6e-8", v, False) for v in VARIANTS]
        + [(size, s, v, False) for size in ("1p3b", "3b", "2b4t")
           for s in ("v5p-8", "v5e-8", "v6e-8") for v in ("int8", "none")]
        + [("3b", "v5p-64", "int8", False)]
        + [(size, s, "fake_quant", False) for size in ("1p3b", "3b", "2b4t")
           for s in ("v5p-8",)])
PER_CHIP_BATCH = 8


def job_config(size: str, variant: str, chips: int | None):
  """configs/bitnet_<size>.py with the variant, FSDP over the slice and
  `PER_CHIP_BATCH` x chips sequences (the config's own batch if None)."""
  config = importlib.import_module(f"configs.bitnet_{size}").get_config()
  with config.unlocked():
    for key, value in VARIANTS[variant].items():
      config.model[key] = value
    config.mesh.data, config.mesh.fsdp = 1, -1
    config.model.dtype = "bfloat16"
    if chips:
      config.train.batch_size = PER_CHIP_BATCH * chips
      config.train.grad_accum_steps = 1
  return config


def run_job(size, tpu_slice, variant, search, redo_without_step_time=False):
  from bitnet_jax.aot import tpu
  path = os.path.join(OUT, f"{size}_{tpu_slice}_{variant}.json")
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if not (redo_without_step_time and "error" not in saved
            and "roofline_step_seconds" not in saved
            and (not saved.get("estimated_step_seconds")
                 or "flops_method" not in saved)):
      return
  config = job_config(size, variant, tpu.resolve(tpu_slice).chips)
  try:
    report = compile_step.compile_report(config, tpu_slice, eval_step=False)
  except compile_step.OutOfMemoryError as e:
    report = {"topology": tpu_slice, "error": str(e), "fits": False}
  if os.path.exists(path) and "error" not in report:  # keep the search
    with open(path) as f:
      saved = json.load(f)
    if "find_batch" in saved:
      report["find_batch"] = saved["find_batch"]
  if search and "error" not in report and "find_batch" not in report:
    # toward the config's own batch (512 x 2048 for the FAQ sizes)
    report["find_batch"] = find_batch.find_batch(
        job_config(size, variant, None), tpu_slice)
  os.makedirs(OUT, exist_ok=True)
  with open(path, "w") as f:
    json.dump(report, f, indent=1)
  print(path, "fits" if report["fits"] else "does not fit", flush=True)


def table() -> str:
  rows = ["| model | slice | variant | per chip (GiB of HBM) | fits | "
          "largest batch | step (s, est.) | MFU (est.) | vs none | "
          "int8 dots | compile (s) |", "|" + "---|" * 11]
  reports = {}
  for name in sorted(os.listdir(OUT)):
    with open(os.path.join(OUT, name)) as f:
      reports[tuple(name[:-5].split("_", 2))] = json.load(f)
  for (size, tpu_slice, variant), r in sorted(reports.items()):
    if "error" in r:
      rows.append(f"| {size} | {tpu_slice} | {variant} | > HBM | no (XLA: out "
                  "of memory) | | | | | | |")
      continue
    none = reports.get((size, tpu_slice, "none"))
    # reports made before the convolution FLOP count was corrected (no
    # "flops_method") give memory only; libtpu's cost model gives no step
    # time on v5e / v6e (estimated_step_seconds None)
    def seconds(report):
      return (report.get("estimated_step_seconds")
              if report and "flops_method" in report else None)
    ratio = (f"{seconds(r) / seconds(none):.2f}"
             if seconds(r) and seconds(none) else "n/a")
    step = f"{seconds(r):.3f}" if seconds(r) else "n/a"
    if seconds(r) and "roofline" in r.get("step_estimate", ""):
      step += " (roofline)"
    mfu = f"{100 * r['mfu']:.1f}%" if seconds(r) else "n/a"
    batch = r.get("find_batch", {}).get("largest_batch_size", "")
    rows.append(
        f"| {size} | {tpu_slice} | {variant} | {r['per_chip_bytes'] / 2**30:.2f}"
        f" of {r['hbm_bytes'] / 2**30:.0f} | {'yes' if r['fits'] else 'no'} | "
        f"{batch} | {step} | {mfu} | {ratio} | {r['int8_dots']} | "
        f"{r['compile_seconds']:.0f} |")
  return "\n".join(rows)


if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--table", action="store_true")
  parser.add_argument(
      "--redo_without_step_time", action="store_true",
      help="compile again the rows saved without a step time (libtpu's cost "
           "model gives none for v5e / v6e; the report now falls back to a "
           "roofline estimate)")
  args = parser.parse_args()
  if args.table:
    print(table())
  else:
    for job in JOBS:
      run_job(*job, redo_without_step_time=args.redo_without_step_time)
