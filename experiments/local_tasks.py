r"""Writes three lm-eval tasks on held-out Python stdlib code (no download).

  python experiments/local_tasks.py --out=runs/local_tasks

Each task is lm-eval YAML with a JSONL data file, built from the standard
library files that `data.dataset="stdlib"` holds out for evaluation
(`bitnet_jax.data.stdlib.is_eval_path`, fraction 0.05), so a model trained on
the embedded corpus never saw them:

  stdlib_choice    multiple choice (like ARC / PIQA): a code line cut at
                   the space nearest its middle, its true second half
                   (" rest", as ARC's " answer") among 3 halves of other
                   lines (acc, acc_norm; chance 0.25)
  stdlib_rolling   loglikelihood_rolling (like wikitext): whole files
                   (word_perplexity, byte_perplexity, bits_per_byte)
  stdlib_complete  generate_until (like a code completion task): complete a
                   line, stop at "\n" (exact_match)

Then `python -m bitnet_jax.evaluate --workdir=RUN --include_path=OUT
--tasks=stdlib_choice,stdlib_rolling,stdlib_complete`.
"""

from __future__ import annotations

import argparse
import json
import os
import random

from bitnet_jax.data import stdlib

TASK_NAMES = ("stdlib_choice", "stdlib_rolling", "stdlib_complete")

_CHOICE = """task: stdlib_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

_ROLLING = """task: stdlib_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
"""

_COMPLETE = """task: stdlib_complete
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_gen_toks}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def held_out_files(eval_fraction: float = stdlib.DEFAULT_EVAL_FRACTION
                   ) -> list[str]:
  """Absolute paths of the stdlib files the embedded corpus holds out."""
  root = stdlib.stdlib_root()
  return [os.path.join(root, f) for f in stdlib.stdlib_files(root)
          if stdlib.is_eval_path(f, eval_fraction)]


def _code_lines(files: list[str], min_chars: int, max_chars: int
                ) -> list[tuple[str, str]]:
  """(preceding line, line) pairs of stripped code lines of a fit size."""
  pairs = []
  for path in files:
    with open(path, encoding="utf-8", errors="replace") as f:
      lines = [line.rstrip() for line in f]
    for before, line in zip(lines, lines[1:]):
      text = line.strip()
      if (min_chars <= len(line) <= max_chars and not text.startswith("#")
          and '"' not in line and "'" not in line and " " in text):
        pairs.append((before, line))
  return pairs


def _word_cut(line: str) -> int:
  """The index of the space nearest the middle of `line` (past its indent):
  the choice then starts at a word, so its tokens never merge with the
  context's (a mid-word cut can leave a continuation of no tokens)."""
  indent = len(line) - len(line.lstrip())
  spaces = [i for i, ch in enumerate(line) if ch == " " and i > indent]
  return min(spaces, key=lambda i: abs(i - len(line) // 2))


def build_documents(count: int, seed: int = 0, rolling_chars: int = 600,
                    eval_fraction: float = stdlib.DEFAULT_EVAL_FRACTION
                    ) -> dict[str, list[dict]]:
  """{task name: its JSONL records}, `count` per task, drawn with `seed`."""
  files = held_out_files(eval_fraction)
  rng = random.Random(seed)
  lines = _code_lines(files, 24, 60)
  rng.shuffle(lines)
  choice, complete = [], []
  for k, (before, line) in enumerate(lines[:count]):
    cut = _word_cut(line)
    others = [lines[(k + j) % len(lines)][1] for j in (count, 2 * count,
                                                        3 * count)]
    choices = [line[cut:]] + [o[_word_cut(o):] for o in others]
    order = list(range(4))
    rng.shuffle(order)
    choice.append({"context": f"{before}\n{line[:cut]}",
                   "choices": [choices[i] for i in order],
                   "answer": order.index(0)})
  for before, line in lines[count:2 * count]:
    cut = len(line) - len(line.lstrip()) + 4  # the indent and 4 characters
    complete.append({"prompt": f"{before}\n{line[:cut]}",
                     "target": line[cut:]})
  rolling = []
  for path in rng.sample(files, len(files)):
    with open(path, encoding="utf-8", errors="replace") as f:
      text = f.read(rolling_chars)
    if len(text) == rolling_chars and len(rolling) < count:  # no stubs
      rolling.append({"text": text})
  return {"stdlib_choice": choice, "stdlib_rolling": rolling,
          "stdlib_complete": complete}


def write_tasks(out: str, count: int = 40, seed: int = 0,
                max_gen_toks: int = 16) -> str:
  """Writes the three tasks' YAML and JSONL files into `out`; returns it."""
  os.makedirs(out, exist_ok=True)
  out = os.path.abspath(out)
  templates = {"stdlib_choice": _CHOICE, "stdlib_rolling": _ROLLING,
               "stdlib_complete": _COMPLETE}
  for name, records in build_documents(count, seed).items():
    data = os.path.join(out, f"{name}.jsonl")
    with open(data, "w", encoding="utf-8") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)
    with open(os.path.join(out, f"{name}.yaml"), "w", encoding="utf-8") as f:
      f.write(templates[name].format(data=json.dumps(data),
                                     max_gen_toks=max_gen_toks))
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="runs/local_tasks")
  parser.add_argument("--count", type=int, default=200,
                      help="documents per task")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  print(write_tasks(args.out, args.count, args.seed))


if __name__ == "__main__":
  main()
