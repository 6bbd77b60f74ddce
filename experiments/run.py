r"""Trains every variant of an experiment and reports them side by side.

  python experiments/run.py --experiment=stage2_weight_decay --preset=cpu \
      --out=runs/experiments [--variants=wd0.0,wd0.1] [--report_only]

An experiment is a file `experiments/NAME.py` listing only what it changes: a
docstring (the seeds' question), `VARIANTS` {variant: {"section.key": value}},
optionally `SMOKE_VARIANTS` (the smoke preset's instead) and
`PRESET_OVERRIDES` {preset: {"section.key": value}}. A variant's config: the
preset's file and overrides (PRESETS), PRESET_OVERRIDES[preset], the variant's.

Variants train one after another in this process, each in OUT/NAME/VARIANT/
(a rerun resumes an unfinished one and skips a finished one); a failing one is
logged and the rest still train (exit status 1 at the end), SIGTERM or Ctrl-C
stops at a checkpoint (rerun to go on). Then, from every variant's
metrics.jsonl (also those of earlier --variants runs), OUT/NAME/ gets
results.csv (the seeds' columns, a row per variant and logged step),
curves.png (loss, eval loss, unique predictions, copy rate against step) and
summary.md (the final values per variant). --report_only only rebuilds these.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import logging as py_logging
import os
import sys

from absl import app, flags, logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = ("stage2_weight_decay", "learning_rate", "tied_embeddings",
               "loss_regularizers", "residual", "quantization", "scaling",
               "memory_lean")

# preset: (config file[:variant], its overrides); experiments apply theirs on
# top. Costs are for two CPU cores (d20:cpu: ~1.5 s/step at batch 16).
PRESETS = {
    # CI: configs/tiny.py for a few steps, ~10 s per variant
    "smoke": ("configs/tiny.py", {
        "train.steps": 6,  # exercises the pipeline, not the learning
        "train.log_every": 1,  # a row per step
        "train.eval_every": 3,  # evaluations at steps 0, 3 and 6
        "train.eval_batches": 1,  # 8 validation windows
        "train.sample_prompts": 0,  # no generated samples
        "optimizer.warmup_steps": 1,  # ends before the boundary at step 3
    }),
    # two CPU cores: d20 at half its cpu batch, ~10 minutes per variant
    "cpu": ("configs/d20.py:cpu", {
        "train.steps": 600,  # ~0.8 s/step at batch 8; boundary at step 300
        "train.batch_size": 8,  # 1k tokens per step (seq_len 128)
        "optimizer.warmup_steps": 60,  # 10% of the run
        "train.log_every": 10,  # 60 points per loss curve
        "train.eval_every": 50,  # 13 evaluations (with the one at step 0)
        "train.eval_batches": 4,  # 32 validation windows
        "train.checkpoint_every": 100,  # a resume point every ~1.5 minutes
    }),
    # an accelerator: the seeds' scale, 20,000 steps of 64 x 256 tokens
    "full": ("configs/d20.py", {
        "train.eval_every": 500,  # 41 evaluations (with the one at step 0)
    }),
}
CSV_COLUMNS = {"Step": "step", "Loss": "loss", "EvalLoss": "eval_loss",
               "UniquePredictions": "unique_predictions",
               "CopyRate": "copy_rate", "LR": "learning_rate",
               "WD": "weight_decay"}  # results.csv column: metrics.jsonl key
PANELS = (("loss", "train loss (cross-entropy)", False),
          ("eval_loss", "eval loss", False),
          ("unique_predictions", "unique predictions", True),
          ("copy_rate", "copy rate (argmax = input token)", False))
FINAL_LOSS_RECORDS = 5  # last train losses averaged into the final loss


class ExperimentError(ValueError):
  """An unknown experiment, preset, variant or config key, or OUT/NAME holds
  another preset's runs."""


class VariantsFailedError(RuntimeError):
  """Variants raised; the others trained and the report was written."""


def _load_module(path: str, name: str):
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_experiment(name: str):
  """The module experiments/NAME.py; ExperimentError lists the valid names."""
  if name not in EXPERIMENTS:
    raise ExperimentError(f"unknown experiment {name!r}; valid experiments: "
                          f"{', '.join(EXPERIMENTS)}")
  return _load_module(os.path.join(REPO, "experiments", f"{name}.py"),
                      f"experiment_{name}")


def variants_of(name: str, preset: str) -> dict[str, dict[str, object]]:
  """{variant: overrides} of experiment `name` in `preset`."""
  if preset not in PRESETS:
    raise ExperimentError(f"unknown preset {preset!r}; valid presets: "
                          f"{', '.join(PRESETS)}")
  experiment = load_experiment(name)
  if preset == "smoke" and hasattr(experiment, "SMOKE_VARIANTS"):
    return experiment.SMOKE_VARIANTS
  return experiment.VARIANTS


def apply_overrides(config, overrides: dict[str, object], source: str):
  """Sets each "section.key" of `overrides` in `config`; ExperimentError
  names `source` and the key if `config` lacks it or the type is wrong."""
  for key, value in overrides.items():
    section, _, field = key.partition(".")
    node = config.get(section) if field else None
    if not hasattr(node, "keys") or field not in node:
      raise ExperimentError(f"{source}: {key!r} is not a config key (keys "
                            "are 'section.key', e.g. 'train.steps')")
    try:
      config[section][field] = value
    except TypeError as e:
      raise ExperimentError(f"{source}: {key}={value!r}: {e}") from e
  return config


def build_config(name: str, preset: str, variant: str,
                 extra: dict[str, object] | None = None):
  """One variant's ConfigDict (module docstring); `extra` overrides last."""
  variants = variants_of(name, preset)
  if variant not in variants:
    raise ExperimentError(f"{name!r} has no variant {variant!r} in preset "
                          f"{preset!r}; its variants: {', '.join(variants)}")
  path, _, config_variant = PRESETS[preset][0].partition(":")
  module = _load_module(os.path.join(REPO, path), "experiment_base_config")
  config = module.get_config(config_variant) if config_variant else (
      module.get_config())
  apply_overrides(config, PRESETS[preset][1], f"preset {preset!r}")
  apply_overrides(config, getattr(load_experiment(name), "PRESET_OVERRIDES",
                                  {}).get(preset, {}),
                  f"experiments/{name}.py PRESET_OVERRIDES[{preset!r}]")
  apply_overrides(config, variants[variant],
                  f"experiments/{name}.py variant {variant!r}")
  return apply_overrides(config, extra or {}, "extra overrides")


def step_records(workdir: str) -> list[dict]:
  """The records of workdir/metrics.jsonl merged per step, by step."""
  from bitnet_jax import metrics  # pylint: disable=g-import-not-at-top
  merged = {}
  for record in metrics.read_records(workdir):
    merged.setdefault(record["step"], {}).update(record)
  return [merged[step] for step in sorted(merged)]


def train_nll(record: dict) -> float | None:
  """The train cross-entropy: `nll` where logged (`loss` then includes the
  regularizers' terms: label smoothing, z-loss, entropy), else `loss`."""
  return record.get("nll", record.get("loss"))


def run_experiment(name: str, preset: str, out: str,
                   variants: list[str] | None = None,
                   report_only: bool = False,
                   extra: dict[str, object] | None = None) -> dict[str, str]:
  """Trains `variants` (default all) unless `report_only`, then reports.

  Returns {"csv", "plot", "summary"}: the paths written. Raises
  ExperimentError before any training, VariantsFailedError after the report.
  """
  every = variants_of(name, preset)
  unknown = sorted(set(variants or ()) - set(every))
  if unknown:
    raise ExperimentError(f"{name!r} has no variants {unknown} in preset "
                          f"{preset!r}; its variants: {', '.join(every)}")
  configs = {v: build_config(name, preset, v, extra) for v in every}
  directory = os.path.join(out, name)
  marker = os.path.join(directory, "experiment.json")  # the preset it ran
  if os.path.exists(marker):
    with open(marker, encoding="utf-8") as f:
      earlier = json.load(f)["preset"]
    if earlier != preset:
      raise ExperimentError(f"{directory} holds runs of preset {earlier!r},"
                            f" not {preset!r}: pass another --out")
  os.makedirs(directory, exist_ok=True)
  failures = {}
  if not report_only:
    with open(marker, "w", encoding="utf-8") as f:
      json.dump({"experiment": name, "preset": preset}, f)
    from bitnet_jax.training import loop  # pylint: disable=g-import-not-at-top
    for variant in variants or every:
      logging.info("experiment %s (%s): variant %s %s", name, preset, variant,
                   every[variant])
      steps = configs[variant].train.steps
      try:
        final = loop.train_and_evaluate(configs[variant],
                                         os.path.join(directory, variant))
      except Exception as e:  # pylint: disable=broad-except
        logging.exception("variant %s failed", variant)
        failures[variant] = f"{type(e).__name__}: {e}"
        continue
      if final.get("step", steps) < steps:  # SIGTERM / SIGINT: stop here
        logging.warning("variant %s stopped at step %d: rerun to go on",
                        variant, final["step"])
        break
  results = {v: step_records(os.path.join(directory, v)) for v in every}
  paths = {kind: os.path.join(directory, file) for kind, file in (
      ("csv", "results.csv"), ("plot", "curves.png"),
      ("summary", "summary.md"))}
  write_csv(paths["csv"], results)
  plot(paths["plot"], results, configs, f"{name}, {preset} preset")
  write_summary(paths["summary"], name, preset, out, results, configs,
                failures)
  if failures:
    raise VariantsFailedError(f"variants of {name!r} failed (the others "
                              f"trained; see {paths['summary']}): {failures}")
  return paths


def write_csv(path: str, results: dict[str, list[dict]]) -> None:
  """A row per (variant, step); a cell is empty where the step lacks it."""
  with open(path, "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f)
    writer.writerow(["Variant", *CSV_COLUMNS])
    for variant, records in results.items():
      for record in records:
        writer.writerow([variant, *(record.get(key, "")
                                    for key in CSV_COLUMNS.values())])


def plot(path: str, results: dict[str, list[dict]], configs: dict,
         title: str) -> None:
  """A 2x2 PNG of PANELS against step: a line per variant, dashed at the
  stage boundary (round(stage_boundary x steps), as bitnet_jax.optim.optimizer)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(2, 2, figsize=(9, 6), dpi=80, sharex=True)
  boundaries = sorted({round(c.optimizer.stage_boundary * c.train.steps)
                       for c in configs.values()})
  for ax, (key, label, log_scale) in zip(axes.flat, PANELS):
    for index, (variant, records) in enumerate(results.items()):
      points = [(r["step"], train_nll(r) if key == "loss" else r[key])
                for r in records if key in r]
      if points:  # a fixed color per variant across the panels
        ax.plot(*zip(*points), color=f"C{index}", label=variant,
                marker="." if len(points) <= 20 else None)
    for step in boundaries:
      ax.axvline(step, color="gray", linestyle="--", linewidth=1)
    if log_scale:  # plain numbers (80, 100), not 8x10^1
      ax.set_yscale("log")
      ax.yaxis.set_major_formatter(ticker.LogFormatter())
      ax.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False))
    ax.set_title(label, fontsize="medium")
    ax.grid(alpha=0.3)
  for ax in axes[1]:
    ax.set_xlabel("step")
  if any(results.values()):
    axes[0, 0].legend(fontsize="small")
  fig.suptitle(f"{title}; dashed: stage 2 starts (step "
               f"{', '.join(map(str, boundaries))})", fontsize="medium")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def final_values(records: list[dict], config) -> list[str]:
  """One variant's summary cells: steps, final train loss (mean of the last
  FINAL_LOSS_RECORDS train_nll), the last evaluation's eval loss, accuracy,
  unique predictions and copy rate, and the fewest unique predictions (with its
  step) at the evaluations after optimizer.warmup_steps."""
  losses = [train_nll(r) for r in records if "loss" in r][
      -FINAL_LOSS_RECORDS:]
  evals = [r for r in records if "eval_loss" in r]
  last = evals[-1] if evals else {}
  low = min((r for r in evals if r["step"] > config.optimizer.warmup_steps),
            key=lambda r: r["unique_predictions"], default=None)

  def fmt(value, spec):
    return "–" if value is None else format(value, spec)

  return [f"{records[-1]['step'] if records else 0}/{config.train.steps}",
          fmt(sum(losses) / len(losses) if losses else None, ".4f"),
          fmt(last.get("eval_loss"), ".4f"),
          fmt(last.get("eval_accuracy"), ".4f"),
          fmt(last.get("unique_predictions"), "d"),
          fmt(last.get("copy_rate"), ".4f"),
          f"{low['unique_predictions']} ({low['step']})" if low else "–"]


def write_summary(path: str, name: str, preset: str, out: str,
                  results: dict, configs: dict, failures: dict) -> None:
  """summary.md: the question, the command, the table, the plot."""
  question = (load_experiment(name).__doc__ or "").strip().split("\n\n")[0]
  lines = [f"# Experiment `{name}`, preset `{preset}`", "", question, "",
           f"    python experiments/run.py --experiment={name} "
           f"--preset={preset} --out={out}", "",
           "| Variant | Overrides | Steps | Train loss | Eval loss | Eval "
           "accuracy | Unique predictions | Copy rate | Min unique after "
           "warmup (step) |", "|---|---|" + "--:|" * 7]
  for variant, overrides in variants_of(name, preset).items():
    cells = final_values(results[variant], configs[variant])
    if variant in failures:
      cells[0] += " (failed)"
    changed = ", ".join(f"`{k}={v!r}`" for k, v in overrides.items())
    lines.append(f"| {variant} | {changed or '(preset)'} | "
                 + " | ".join(cells) + " |")
  lines += ["", f"Train loss: the mean of the last {FINAL_LOSS_RECORDS} "
            "logged cross-entropies (`nll`, without the regularizers' terms "
            "that results.csv's `Loss` includes); eval columns: the last "
            "evaluation; min unique: the fewest unique predictions at an "
            "evaluation after optimizer.warmup_steps.", ""]
  lines += [f"Failed: **{v}**: `{e[:300]}`\n" for v, e in failures.items()]
  lines += ["![loss, eval loss, unique predictions and copy rate against"
            " step](curves.png)", ""]
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(  # orbax's INFO lines per save: off
      lambda r: r.levelno >= py_logging.WARNING or "orbax" not in r.pathname)
  f = flags.FLAGS
  extra = {"data.data_dir": f.data_dir} if f.data_dir else {}
  try:
    paths = run_experiment(f.experiment, f.preset, f.out, f.variants,
                           f.report_only, extra)
  except ExperimentError as e:
    raise app.UsageError(str(e)) from e
  except VariantsFailedError as e:
    logging.error("%s", e)
    sys.exit(1)
  print("\n".join(paths.values()))


if __name__ == "__main__":
  flags.DEFINE_string("experiment", None, ", ".join(EXPERIMENTS))
  flags.DEFINE_string("preset", None, ", ".join(PRESETS))
  flags.DEFINE_string("out", "runs/experiments", "Writes OUT/EXPERIMENT/.")
  flags.DEFINE_list("variants", None, "Trains only these variants.")
  flags.DEFINE_bool("report_only", False, "Rebuilds the report only.")
  flags.DEFINE_string("data_dir", "", "data.data_dir; default the config's.")
  flags.mark_flags_as_required(["experiment", "preset"])
  app.run(main)
