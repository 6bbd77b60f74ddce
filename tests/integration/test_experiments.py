"""experiments/run.py end to end: the smoke preset trains (results.csv,
curves.png, summary.md), reruns and rebuilds its report; the command line
refuses an unknown experiment (the experiment files themselves:
tests/unit/test_experiment_files.py)."""

import csv
import importlib.util
import os
import struct
import subprocess
import sys

import pytest

from drivers import REPO

_SPEC = importlib.util.spec_from_file_location(
    "experiments_run", os.path.join(REPO, "experiments", "run.py"))
run = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(run)

HEADER = ["Variant", "Step", "Loss", "EvalLoss", "UniquePredictions",
          "CopyRate", "LR", "WD"]
SMOKE = "stage2_weight_decay"  # cheap: a different number, the same model
TRAINED = ["wd0.0", "wd0.1"]  # --variants: one variant stays untrained


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_dir):
  """Trains TRAINED with the smoke preset; returns (out, paths)."""
  out = str(tmp_path_factory.mktemp("experiments"))
  paths = run.run_experiment(SMOKE, "smoke", out, variants=TRAINED,
                             extra={"data.data_dir": data_dir})
  return out, paths


def _csv_rows(path):
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.reader(f))


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def _cell(value):
  """A metrics.jsonl value as results.csv writes it ("" when absent)."""
  return "" if value is None else str(value)


@pytest.mark.slow
def test_results_csv_has_exactly_the_notes_columns(smoke_run):
  _, paths = smoke_run
  header = _csv_rows(paths["csv"])[0]
  assert header == HEADER, f"results.csv header {header}, expected {HEADER}"


def test_results_csv_rows_equal_each_variants_metrics(smoke_run):
  out, paths = smoke_run
  rows = _csv_rows(paths["csv"])[1:]
  for variant in TRAINED:
    merged = {}
    for record in run.step_records(os.path.join(out, SMOKE, variant)):
      merged[record["step"]] = record
    assert sorted(merged) == list(range(7)), (
        f"{variant}: metrics.jsonl steps {sorted(merged)}, expected 0..6 "
        "(log_every 1 over 6 steps and the step-0 evaluation)")
    got = [row for row in rows if row[0] == variant]
    assert [int(row[1]) for row in got] == sorted(merged), (
        f"{variant}: results.csv steps {[row[1] for row in got]} are not one "
        f"row per logged step {sorted(merged)}")
    for row in got:
      record = merged[int(row[1])]
      expected = [_cell(record.get(key)) for key in
                  ("loss", "eval_loss", "unique_predictions", "copy_rate",
                   "learning_rate", "weight_decay")]
      assert row[2:] == expected, (
          f"{variant} step {row[1]}: results.csv {row[2:]} != metrics.jsonl "
          f"{expected}")
    assert got[0][2] == "" and got[0][3] != "", (
        f"{variant}: step 0 has only an evaluation, its row is {got[0]}")


def test_variants_flag_trains_only_the_chosen_variants(smoke_run):
  out, paths = smoke_run
  trained = {row[0] for row in _csv_rows(paths["csv"])[1:]}
  assert trained == set(TRAINED), f"results.csv has variants {trained}"
  assert not os.path.exists(os.path.join(out, SMOKE, "wd0.05")), (
      "wd0.05 was not in --variants but has a workdir")


def test_curves_png_is_a_valid_png_of_the_chosen_size(smoke_run):
  _, paths = smoke_run
  with open(paths["plot"], "rb") as f:
    head = f.read(24)
  assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{paths['plot']} is not a PNG"
  assert head[12:16] == b"IHDR", "the PNG does not start with its header"
  size = struct.unpack(">II", head[16:24])
  assert size == (720, 480), f"curves.png is {size}, expected 9x6 in at 80 dpi"


def test_summary_has_a_row_per_variant_with_the_final_values(smoke_run):
  out, paths = smoke_run
  with open(paths["summary"], encoding="utf-8") as f:
    text = f.read()
  rows = {line.split("|")[1].strip(): line for line in text.splitlines()
          if line.startswith("| ") and not line.startswith("| Variant")}
  assert set(rows) == {"wd0.0", "wd0.05", "wd0.1"}, (
      f"summary.md rows {sorted(rows)}: expected every variant")
  assert "--experiment=stage2_weight_decay --preset=smoke" in text, (
      "summary.md lacks the command")
  assert "](curves.png)" in text, "summary.md does not link the plot"
  for variant in TRAINED:
    last_eval = [r for r in run.step_records(os.path.join(out, SMOKE, variant))
                 if "eval_loss" in r][-1]
    assert f"{last_eval['eval_loss']:.4f}" in rows[variant], (
        f"{variant}: the final eval loss {last_eval['eval_loss']:.4f} is not "
        f"in its summary row {rows[variant]}")
    assert "6/6" in rows[variant], f"{variant} did not report 6/6 steps"
  assert "0/6" in rows["wd0.05"], "the untrained variant is not shown as such"


def test_rerun_skips_finished_variants_and_report_only_rebuilds(smoke_run,
                                                                data_dir):
  out, paths = smoke_run
  before = {name: _read(path) for name, path in paths.items()
            if name != "plot"}
  for name in before:
    os.remove(paths[name])
  run.run_experiment(SMOKE, "smoke", out, report_only=True)
  after = {name: _read(paths[name]) for name in before}
  assert after == before, "--report_only did not rebuild the same report"
  logs = [os.path.join(out, SMOKE, v, "metrics.jsonl") for v in TRAINED]
  stamps = [os.stat(path).st_mtime_ns for path in logs]
  run.run_experiment(SMOKE, "smoke", out, variants=TRAINED,
                     extra={"data.data_dir": data_dir})  # finished: no steps
  assert [os.stat(path).st_mtime_ns for path in logs] == stamps, (
      "rerunning finished variants wrote their metrics.jsonl again")
  assert _read(paths["csv"]) == before["csv"], (
      "rerunning finished variants changed their metrics")


def test_command_line_rejects_an_unknown_experiment():
  result = subprocess.run(
      [sys.executable, "experiments/run.py", "--experiment=nonsense",
       "--preset=smoke", "--report_only"], cwd=REPO, capture_output=True,
      text=True, timeout=120, check=False)
  assert result.returncode != 0, "an unknown experiment exited with 0"
  assert "stage2_weight_decay" in result.stderr + result.stdout, (
      f"the error does not list the valid experiments: {result.stderr}")
