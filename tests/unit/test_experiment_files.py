"""experiments/run.py without training: every experiment file's question,
variants and presets build valid configs; bad names and keys are refused."""

import importlib.util
import os

import pytest

from bitnet_jax import config as config_lib

from drivers import REPO

_SPEC = importlib.util.spec_from_file_location(
    "experiments_run", os.path.join(REPO, "experiments", "run.py"))
run = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(run)

SMOKE = "stage2_weight_decay"  # cheap: a different number, the same model


@pytest.mark.parametrize("preset", ["smoke", "cpu", "full"])
@pytest.mark.parametrize("name", run.EXPERIMENTS)
def test_every_variant_names_existing_keys_and_validates(name, preset):
  base = run.build_config(name, preset, next(iter(run.variants_of(
      name, preset))))
  for variant, overrides in run.variants_of(name, preset).items():
    for key in overrides:
      section, _, field = key.partition(".")
      assert section in base and field in base[section], (
          f"{name}/{variant}: {key} is not a config key")
    config = run.build_config(name, preset, variant)
    for key, value in overrides.items():
      section, _, field = key.partition(".")
      assert config[section][field] == value, f"{name}/{variant}: {key} unset"
    config_lib.validate(config)  # raises ConfigError naming the key


def test_experiment_files_state_their_question_and_variants():
  for name in run.EXPERIMENTS:
    module = run.load_experiment(name)
    assert module.__doc__ and "?" in module.__doc__.split("\n\n")[0], (
        f"experiments/{name}.py: the docstring does not ask its question")
    assert len(module.VARIANTS) >= 2, f"{name}: fewer than two variants"
    extra = set(getattr(module, "PRESET_OVERRIDES", {})) - set(run.PRESETS)
    assert not extra, f"{name}: PRESET_OVERRIDES for unknown presets {extra}"


def test_variants_hold_what_the_notes_compare():
  lr = run.variants_of("learning_rate", "cpu")
  ratios = {v: o["optimizer.stage2_learning_rate"] / o[
      "optimizer.learning_rate"] for v, o in lr.items()}
  assert len({round(r, 9) for r in ratios.values()}) == 1, (
      f"stage-2 / stage-1 peak differs between the LR variants: {ratios}")
  for preset in ("cpu", "smoke"):
    for variant in run.variants_of("scaling", preset):
      config = run.build_config("scaling", preset, variant)
      m = config.model
      assert m.ffn_dim == 3 * m.d_model, f"{variant}: ffn_dim != 3 x d_model"
      assert m.d_model // m.n_heads == (64 if preset == "cpu" else 32), (
          f"{variant}: head dim {m.d_model // m.n_heads}")
      assert m.n_layers == 6 or preset == "smoke", f"{variant}: not d20 depth"


@pytest.mark.parametrize("name,preset,valid", [
    ("nonsense", "cpu", run.EXPERIMENTS), ("scaling", "gpu", run.PRESETS)])
def test_unknown_experiment_or_preset_raises_with_the_valid_names(
    name, preset, valid, tmp_path):
  with pytest.raises(ValueError) as error:
    run.run_experiment(name, preset, str(tmp_path))
  for valid_name in valid:
    assert valid_name in str(error.value), (
        f"the error {error.value} does not list {valid_name!r}")
  assert not os.listdir(tmp_path), "a bad name still wrote files"


def test_unknown_override_key_is_rejected():
  config = run.build_config(SMOKE, "smoke", "wd0.0")
  with pytest.raises(run.ExperimentError, match="optimizer.stage2_wd"):
    run.apply_overrides(config, {"optimizer.stage2_wd": 0.0}, "test")
