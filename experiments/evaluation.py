r"""Scores runs on the local lm-eval tasks and held-out stdlib perplexity.

  python -m bitnet_jax.main --config=configs/d20.py:cpu --workdir=runs/d20_cpu
  python -m bitnet_jax.main --config=configs/d20.py:cpu_fp \
      --workdir=runs/d20_cpu_fp
  python experiments/evaluation.py --runs=runs/d20_cpu,runs/d20_cpu_fp

For each run: the three tasks of experiments/local_tasks.py (written to
--tasks_dir, --count documents each) through `BitNetLM` and lm-eval's
`simple_evaluate`, each task timed twice (the first pass compiles the bucket
shapes, the second is the throughput reported, in requests per second),
then `--perplexity=stdlib` figures. Prints markdown tables for
experiments/RESULTS.md and writes the raw figures to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import local_tasks  # noqa: E402  (this folder)

from bitnet_jax.evaluation import harness, perplexity  # noqa: E402
from bitnet_jax.evaluation.backend import BitNetLM  # noqa: E402
from bitnet_jax.metrics import read_records  # noqa: E402
from bitnet_jax.runs import reader  # noqa: E402

_METHODS = ("loglikelihood", "loglikelihood_rolling", "generate_until")
_SHOWN = (("stdlib_choice", "acc,none"), ("stdlib_choice", "acc_norm,none"),
          ("stdlib_complete", "exact_match,none"),
          ("stdlib_rolling", "bits_per_byte,none"))


def _count_requests(lm: BitNetLM, counts: dict[str, int]) -> None:
  """Makes `lm` add the requests of each call to `counts`."""
  for name in _METHODS:
    method = getattr(lm, name)

    def counted(requests, *args, method=method, **kwargs):
      counts["requests"] += len(requests)
      return method(requests, *args, **kwargs)
    setattr(lm, name, counted)


def evaluate_run(workdir: str, manager, batch_size: int,
                 step: int | None = None) -> dict:
  """{"step", "tokens_seen", "quantization", "tasks": {...}, "perplexity"}
  of the run's checkpoint `step` (default: its newest)."""
  config = reader.load_run_config(workdir)
  lm = BitNetLM.from_run(workdir, step, batch_size=batch_size)
  counts = {"requests": 0}
  _count_requests(lm, counts)
  tasks = {}
  for task in local_tasks.TASK_NAMES:
    for attempt in ("compile", "timed"):
      counts["requests"] = 0
      start = time.perf_counter()
      results = harness.evaluate(lm, [task], manager, bootstrap_iters=0)
      seconds = time.perf_counter() - start
    tasks[task] = {"metrics": results["results"][task],
                   "requests": counts["requests"], "seconds": seconds,
                   "requests_per_sec": counts["requests"] / seconds}
  start = time.perf_counter()
  figures = perplexity.perplexity(lm, perplexity.corpus_texts("stdlib"))
  figures["seconds"] = time.perf_counter() - start
  records = read_records(workdir)
  return {"workdir": workdir, "step": lm.step,
          "quantization": config.model.quantization,
          "tokens_seen": max(r.get("tokens_seen", 0) for r in records
                             if r.get("step", 0) <= lm.step),
          "tasks": tasks, "perplexity": figures}


def tables(scores: list[dict]) -> str:
  """The markdown tables of RESULTS.md."""
  lines = ["| run | quantization | step | tokens | " + " | ".join(
      f"{t} {m.split(',')[0]}" for t, m in _SHOWN)
           + " | stdlib token ppl | stdlib bits/byte |",
           "|---" * (6 + len(_SHOWN)) + "|"]
  for s in scores:
    values = " | ".join(f"{s['tasks'][t]['metrics'][m]:.4f}"
                        for t, m in _SHOWN)
    p = s["perplexity"]
    lines.append(f"| {s['workdir']} | {s['quantization']} | {s['step']} | "
                 f"{s['tokens_seen']:,} | {values} | "
                 f"{p['token_perplexity']:.3f} | {p['bits_per_byte']:.4f} |")
  lines += ["", "| run | task | requests | seconds | requests/s |",
            "|---|---|---|---|---|"]
  for s in scores:
    for task, t in s["tasks"].items():
      lines.append(f"| {s['workdir']} | {task} | {t['requests']} | "
                   f"{t['seconds']:.2f} | {t['requests_per_sec']:.1f} |")
    p = s["perplexity"]
    lines.append(f"| {s['workdir']} | perplexity=stdlib ({p['documents']} "
                 f"files, {p['tokens']:,} tokens) | {p['documents']} | "
                 f"{p['seconds']:.2f} | {p['tokens'] / p['seconds']:,.0f} "
                 "tokens/s |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", default="runs/d20_cpu,runs/d20_cpu_fp")
  parser.add_argument("--tasks_dir", default="runs/local_tasks")
  parser.add_argument("--count", type=int, default=200)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--step", type=int, default=None,
                      help="checkpoint step of every run (default newest)")
  parser.add_argument("--out", default="experiments/results/evaluation.json")
  args = parser.parse_args()
  folder = local_tasks.write_tasks(args.tasks_dir, args.count)
  manager = harness.task_manager(folder, include_defaults=False)
  scores = [evaluate_run(w, manager, args.batch_size, args.step)
            for w in args.runs.split(",")]
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(scores, f, indent=2, default=str)
  print(tables(scores))


if __name__ == "__main__":
  main()
