r"""Compares the metrics of two runs, timings aside: are they the same run?

  python experiments/compare_metrics.py RUN_A RUN_B [--max_step=100]

Reads `metrics.jsonl` (and `samples.jsonl` when both runs have one) of two
run directories and compares every record of every step up to `--max_step`
(all steps by default) key by key, values exactly (no tolerance), except the
wall-clock keys `TIMING_KEYS`. Prints one line per difference and a summary;
exits 1 if the runs differ, 0 if they are identical.

Used to check that a change of code structure left the numbers alone (the
identical-metrics comparisons in `experiments/RESULTS.md`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# Wall-clock figures: they differ between any two runs.
TIMING_KEYS = frozenset({"steps_per_sec", "step_time_ms", "tokens_per_sec",
                         "eta_seconds", "mfu"})


def read_lines(path: str, max_step: int | None) -> list[dict]:
  """The JSON records of a JSON-lines file with `step` <= `max_step`."""
  with open(path, encoding="utf-8") as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if max_step is None or r["step"] <= max_step]


def differences(a: list[dict], b: list[dict]) -> list[str]:
  """One line per record or value that differs between two record lists."""
  lines = []
  if len(a) != len(b):
    lines.append(f"{len(a)} records vs {len(b)}: steps "
                 f"{[r['step'] for r in a]} vs {[r['step'] for r in b]}")
  for left, right in zip(a, b):
    keys = (left.keys() | right.keys()) - TIMING_KEYS
    for key in sorted(keys):
      if left.get(key, "<absent>") != right.get(key, "<absent>"):
        lines.append(f"step {left['step']} {key}: "
                     f"{left.get(key, '<absent>')!r} vs "
                     f"{right.get(key, '<absent>')!r}")
  return lines


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("run_a")
  parser.add_argument("run_b")
  parser.add_argument("--max_step", type=int, default=None,
                      help="compare the records of steps <= this only")
  args = parser.parse_args(argv)
  failed = False
  for name in ("metrics.jsonl", "samples.jsonl"):
    paths = [os.path.join(run, name) for run in (args.run_a, args.run_b)]
    if name == "samples.jsonl" and not all(map(os.path.exists, paths)):
      continue
    a, b = (read_lines(path, args.max_step) for path in paths)
    found = differences(a, b)
    values = sum(len(set(r) - TIMING_KEYS) for r in a)
    for line in found:
      print(f"{name}: {line}")
    print(f"{name}: {len(a)} records, {values} values compared: "
          f"{'IDENTICAL' if not found else f'{len(found)} differences'}")
    failed = failed or bool(found)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
