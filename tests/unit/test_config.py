"""Configs carry the recipe and bad values fail at start-up, naming the key."""

import json
import os

import pytest

from bitnet_jax import config as config_lib
from bitnet_jax.config import ConfigError, choices, defaults, fields

from drivers import REPO

RESEARCH = ["configs/bitnet_125m.py", "configs/bitnet_700m.py",
            "configs/bitnet_1p3b.py", "configs/bitnet_3b.py"]
CONFIGS = ["configs/tiny.py", "configs/d20.py", "configs/d20.py:cpu",
           "configs/d20.py:cpu_fp", "configs/bitnet_2b4t.py"] + RESEARCH + [f"{n}:fp" for n in RESEARCH]


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_validate(load_config, name):
  config_lib.validate(load_config(name))


def test_d20_is_the_seeds_model_with_the_microsoft_recipe(load_config):
  c = load_config("configs/d20.py")
  m, o = c.model, c.optimizer
  assert (m.d_model, m.n_layers, m.n_heads) == (256, 6, 4), "d20 shape"
  assert m.tie_embeddings is False, "d20 must be untied (seeds: copying)"
  assert m.quantization == "ternary"
  assert (o.learning_rate, o.warmup_steps, o.stage_boundary) == (
      1.5e-3, 375, 0.5), "Microsoft BitNet b1.58 LR schedule"
  assert (o.weight_decay, o.stage2_weight_decay) == (0.1, 0.0), (
      "weight decay must be 0.1 then 0.0 (seeds: 0.05 in stage 2 collapsed)")
  assert (o.b1, o.b2, o.grad_clip_norm) == (0.9, 0.95, 1.0)
  assert c.train.steps == 20000


def test_d20_cpu_keeps_the_architecture_and_shrinks_the_run(load_config):
  full, cpu = load_config("configs/d20.py"), load_config("configs/d20.py:cpu")
  architecture = {k: v for k, v in full.model.items() if k != "dtype"}
  assert architecture == {k: v for k, v in cpu.model.items() if k != "dtype"}
  assert cpu.optimizer == full.optimizer, "the recipe must not change"
  for key in ("batch_size", "seq_len", "steps"):
    assert cpu.train[key] < full.train[key], f"train.{key} not shrunk"


def test_unknown_variant_is_rejected(load_config):
  with pytest.raises(ValueError, match="d20.py:cpu"):
    load_config("configs/d20.py:gpu")


@pytest.mark.parametrize("key,value,allowed", [
    ("train.steps", -5, ">= 1"),
    ("train.steps", 0, ">= 1"),
    ("optimizer.stage_boundary", 0.0, "(0, 1)"),
    ("optimizer.stage_boundary", 1.0, "(0, 1)"),
    ("optimizer.stage_boundary", 1.5, "(0, 1)"),
    ("model.d_model", 65, "divisible by model.n_heads"),
    ("model.n_kv_heads", 3, "divide model.n_heads=2"),
    ("model.n_kv_heads", -1, "divide model.n_heads=2"),
    ("model.quantization", "binary", "'ternary', 'none'"),
    ("model.ffn_activation", "gelu", "'swiglu', 'relu2'"),
    ("model.dtype", "float16", "'float32', 'bfloat16'"),
    ("data.dataset", "wikipedia", "'tfds:NAME"),
    ("data.dataset", "tfds:", "'tfds:NAME"),
    ("data.eval_fraction", 1.0, "(0, 1)"),
    ("optimizer.warmup_steps", 40, "before the stage boundary"),
    ("optimizer.b2", 1.0, "[0, 1)"),
    ("train.label_smoothing", 1.0, "[0, 1)"),
    ("mesh.fsdp", 0, "-1 (fill)"),
    ("data.shuffle_seed", 2**32, "< 2**32"),
    ("train.divergence_factor", 1.0, "0 (off) or a number > 1"),
    ("train.divergence_factor", -3.0, "0 (off) or a number > 1"),
    ("train.divergence_patience", 0, "integer >= 1"),
    ("train.lock_stale_seconds", 0.0, "> 0"),
    ("model.remat_policy", "offload", "'none', 'full', 'dots_saveable'"),
    ("model.bitlinear_matmul", "int4", "'fake_quant', 'int8'"),
    ("train.loss_chunk_size", 5, "divide train.seq_len=32"),
    ("train.loss_chunk_size", -8, "divide train.seq_len=32"),
    ("train.grad_accum_steps", 3, "dividing train.batch_size=8"),
    ("train.grad_accum_steps", 0, "dividing train.batch_size=8"),
    ("train.sample_prompt_tokens", 32, "fewer than train.seq_len=32"),
    ("train.sample_new_tokens", 0, ">= 1 new token"),
])
def test_bad_value_names_the_key_and_the_allowed_values(tiny_config, key,
                                                        value, allowed):
  section, field = key.split(".")
  tiny_config[section][field] = value
  with pytest.raises(ConfigError) as error:
    config_lib.validate(tiny_config)
  assert f"config.{key}=" in str(error.value), str(error.value)
  assert allowed in str(error.value), str(error.value)


def test_vocab_smaller_than_the_tokenizer_is_rejected(tiny_config):
  with pytest.raises(ConfigError, match="model.vocab_size=512.*600 tokens"):
    config_lib.check_vocab(tiny_config, 600, "tokenizer.json")
  config_lib.check_vocab(tiny_config, 512, "tokenizer.json")  # equal is fine


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("key", ["model.norm_eps", "optimizer.learning_rate",
                                 "model.rope_theta", "train.z_loss_weight",
                                 "train.lock_stale_seconds"])
def test_non_finite_float_is_rejected_naming_the_key(tiny_config, key, value):
  section, field = key.split(".")
  tiny_config[section][field] = value
  with pytest.raises(ConfigError) as error:
    config_lib.validate(tiny_config)
  expected = f"config.{key}={value!r} is invalid: must be a finite number."
  assert str(error.value) == expected, (
      f"{key}={value} passed or gave another message: {error.value}")


def test_a_float_field_added_later_is_checked_for_nan(tiny_config):
  tiny_config.train.future_weight = float("nan")
  with pytest.raises(ConfigError, match=r"config\.train\.future_weight=nan"):
    config_lib.validate(tiny_config)


@pytest.mark.parametrize("key,value,allowed", [
    ("train.allow_config_change", "yes", "True or False"),
    ("train.divergence_patience", 1.5, "integer >= 1"),
])
def test_wrongly_typed_value_names_the_key(tiny_config, key, value, allowed):
  section, field = key.split(".")
  with tiny_config.ignore_type():  # bypass ConfigDict's own type check
    tiny_config[section][field] = value
  with pytest.raises(ConfigError) as error:
    config_lib.validate(tiny_config)
  assert f"config.{key}={value!r}" in str(error.value), str(error.value)
  assert allowed in str(error.value), str(error.value)


@pytest.mark.parametrize("name,shape,peaks,billions", [
    ("configs/bitnet_700m.py", (1536, 4096, 24, 24), (1.5e-3, 1e-3), 0.78),
    ("configs/bitnet_1p3b.py", (2048, 5460, 32, 24), (1.2e-3, 8e-4), 1.34),
    ("configs/bitnet_3b.py", (3200, 8640, 32, 26), (1.2e-3, 8e-4), 3.43),
])
def test_research_configs_follow_the_faq_tables(load_config, name, shape,
                                                peaks, billions):
  # pylint: disable-next=g-import-not-at-top
  import jax

  from bitnet_jax.runs import reader
  c = load_config(name)
  m, o, t = c.model, c.optimizer, c.train
  assert (m.d_model, m.ffn_dim, m.n_heads, m.n_layers) == shape, name
  assert (o.learning_rate, o.stage2_learning_rate) == peaks, name
  assert (o.weight_decay, o.stage2_weight_decay, o.warmup_steps) == (
      0.1, 0.0, 375), name
  assert t.seq_len == 2048 and t.batch_size * t.seq_len == 2**20, (
      f"{name}: not the FAQ's 1M tokens per step at seq 2048")
  assert m.quantization == "ternary" and m.dtype == "bfloat16"
  n_params = sum(x.size for x in jax.tree.leaves(
      reader.abstract_params(m)))
  assert n_params / 1e9 == pytest.approx(billions, abs=0.01), (
      f"{name}: {n_params:,} parameters")
  fp = load_config(name + ":fp")
  assert fp.model.quantization == "none"
  assert fp.optimizer.learning_rate == fp.optimizer.stage2_learning_rate == (
      2.5e-4 if "700m" in name else 2e-4), "FP16 baseline learning rate"
  assert fp.optimizer.stage2_weight_decay == fp.optimizer.weight_decay == 0.1


# The field table (bitnet_jax.config.defaults.FIELDS).


def _flat(config) -> dict:
  """{dotted key: value} in config.json's order (ConfigDict.items() sorts)."""
  def walk(node, prefix):
    for name, value in node.items():
      if isinstance(value, dict):
        yield from walk(value, f"{prefix}{name}.")
      else:
        yield f"{prefix}{name}", value
  return dict(walk(json.loads(config.to_json_best_effort()), ""))


def test_every_base_config_leaf_has_exactly_one_table_line_in_order():
  leaves = list(_flat(config_lib.base_config()))
  assert leaves == list(config_lib.FIELDS), (
      "base_config() and the table disagree: "
      f"{set(leaves) ^ set(config_lib.FIELDS) or 'same keys, other order'}")
  assert len(leaves) > 50, f"only {len(leaves)} leaves: the test is vacuous"


def test_a_key_listed_twice_in_the_table_is_refused():
  field = config_lib.FIELDS["train.steps"]
  with pytest.raises(ValueError, match="train.steps.*twice"):
    fields.field_table(field, field)


@pytest.mark.parametrize("key", list(config_lib.FIELDS))
def test_every_table_default_passes_its_own_rule_with_its_type(key):
  field = config_lib.FIELDS[key]
  assert field.error(field.default) is None, field.error(field.default)
  wanted = {"integer": int, "number": float, "flag": bool, "text": str,
            "choice": str}[field.rule.kind]
  default_type = type(field.default)  # exactly: a bool is an int too
  assert default_type is wanted, (
      f"config.{key}: default {field.default!r} is a "
      f"{default_type.__name__}, its rule wants {wanted.__name__} (a "
      "number field needs a float default, or ConfigDict types it int)")
  assert field.doc and field.resume in fields.RESUME_CLASSES


@pytest.mark.parametrize("key,value,allowed", [
    ("seed", -1, "must be an integer >= 0"),
    ("train.log_every", 0, "must be an integer >= 1"),
    ("health.grace_steps", -1, "must be an integer >= 0"),
    ("model.residual_streams", 5, "must be an integer in [2, 4]"),
    ("model.residual_streams", 1, "must be an integer in [2, 4]"),
    ("mesh.data", -2, "must be -1 (fill) or an integer >= 1"),
    ("distributed.process_id", -2, "must be -1 (auto) or an integer >= 0"),
    ("model.dropout_rate", 1.0, "must lie in [0, 1)"),
    ("optimizer.eps", -1e-8, "must be a number >= 0"),
    ("model.norm_eps", 0.0, "must be a number > 0"),
    ("health.copy_rate_floor", 0.0, "must lie in (0, 1]"),
    ("optimizer.final_learning_rate_fraction", 1.5, "must lie in [0, 1]"),
    ("train.divergence_factor", 0.5, "must be 0 (off) or a number > 1"),
    ("data.packing", "documents", "allowed values are 'concat', 'document'"),
    ("model.residual", "mhc", "allowed values are 'standard', 'mhc_lite'"),
])
def test_a_value_outside_its_table_rule_is_rejected_naming_the_key(
    tiny_config, key, value, allowed):
  *sections, name = key.split(".")
  node = tiny_config
  for section in sections:
    node = node[section]
  node[name] = value
  with pytest.raises(ConfigError) as error:
    config_lib.validate(tiny_config)
  assert str(error.value).startswith(f"config.{key}={value!r} is invalid: "
                                     f"{allowed} ("), str(error.value)
  assert config_lib.FIELDS[key].doc in str(error.value), "doc not named"


# Each choice field and the enum of its names (bitnet_jax.config.choices).
_CHOICE_ENUMS = {
    "model.ffn_activation": choices.FfnActivation,
    "model.quantization": choices.Quantization,
    "model.rope_scaling": choices.RopeScaling,
    "model.dtype": choices.Dtype,
    "optimizer.mu_dtype": choices.Dtype,
    "model.attention_implementation": choices.AttentionImplementation,
    "model.remat_policy": choices.RematPolicy,
    "model.bitlinear_matmul": choices.BitLinearMatmul,
    "model.residual": choices.Residual,
    "data.mode": choices.DataMode,
    "data.packing": choices.Packing,
}


def test_every_choice_field_is_listed_with_its_enum():
  table = {key for key, field in config_lib.FIELDS.items()
           if field.rule.kind == "choice"}
  assert table == set(_CHOICE_ENUMS), (
      f"choice fields without an enum here: {table - set(_CHOICE_ENUMS)}; "
      f"listed but not choices: {set(_CHOICE_ENUMS) - table}")


@pytest.mark.parametrize("key", list(_CHOICE_ENUMS))
def test_a_choice_allows_exactly_its_enums_values_naming_the_key(
    tiny_config, key):
  names = _CHOICE_ENUMS[key]
  assert len(names) >= 2, f"{names.__name__}: the test is vacuous"
  field = config_lib.FIELDS[key]
  for member in names:
    assert field.error(member.value) is None, f"{key} refuses {member!r}"
  *sections, name = key.split(".")
  node = tiny_config
  for section in sections:
    node = node[section]
  node[name] = "not_a_choice"
  with pytest.raises(ConfigError) as error:
    config_lib.validate(tiny_config)
  allowed = ", ".join(repr(member.value) for member in names)
  assert str(error.value).startswith(
      f"config.{key}='not_a_choice' is invalid: allowed values are "
      f"{allowed} ("), str(error.value)


@pytest.mark.parametrize("key", ["train.steps", "optimizer.b1",
                                 "model.scan_layers", "data.data_dir",
                                 "model.dtype"])
def test_none_which_configdict_accepts_in_any_field_is_rejected(tiny_config,
                                                               key):
  section, field = key.split(".")
  tiny_config[section][field] = None  # ConfigDict lets None into any field
  assert tiny_config[section][field] is None, "ConfigDict refused None"
  with pytest.raises(ConfigError, match=rf"config\.{key}=None is invalid"):
    config_lib.validate(tiny_config)


def test_a_bool_which_configdict_accepts_in_an_int_field_is_rejected(
    tiny_config):
  tiny_config.train.steps = True  # bool is an int: ConfigDict accepts it
  assert tiny_config.train.steps is True, "ConfigDict refused a bool"
  with pytest.raises(ConfigError,
                     match=r"config\.train\.steps=True is invalid: must be "
                     r"an integer >= 1"):
    config_lib.validate(tiny_config)


@pytest.mark.parametrize("bounds", ["1", "[0, 1", ">> 0", "(a, b)"])
def test_malformed_bounds_in_the_table_fail_at_import(bounds):
  with pytest.raises(ValueError, match="bounds"):
    fields.number(bounds)


# Unknown keys: ml_collections names the nearest key on the command line,
# validate() for keys a config file or a saved config.json adds silently.


def test_an_unknown_command_line_key_names_the_nearest_key():
  # pylint: disable-next=g-import-not-at-top
  from absl import flags
  from ml_collections import config_flags
  argv = ["main", f"--config={os.path.join(REPO, 'configs/tiny.py')}",
          "--config.train.stepz=5"]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", lock_config=True,
                                  flag_values=flag_values, sys_argv=argv)
  with pytest.raises(AttributeError,
                     match='Did you mean "steps" instead of "stepz"'):
    flag_values(argv)


def test_an_unknown_key_set_in_a_config_file_names_the_nearest_key(
    tiny_config):
  tiny_config.train.stepz = 5  # ConfigDict adds a new key silently
  with pytest.raises(ConfigError,
                     match=r"config\.train\.stepz=5 is invalid: no such "
                     r"config key; did you mean config\.train\.steps\?"):
    config_lib.validate(tiny_config)


def test_an_unknown_key_in_a_saved_config_json_names_the_nearest_key(
    tiny_config, tmp_path):
  # pylint: disable-next=g-import-not-at-top
  from bitnet_jax.runs import reader
  saved = json.loads(tiny_config.to_json_best_effort())
  saved["optimizer"]["lerning_rate"] = 3e-3  # a typo in the file
  (tmp_path / "config.json").write_text(json.dumps(saved))
  config = reader.load_run_config(str(tmp_path))  # update() adds it silently
  assert config.optimizer.lerning_rate == 3e-3, "update() refused the key"
  with pytest.raises(ConfigError,
                     match=r"config\.optimizer\.lerning_rate=0\.003 is "
                     r"invalid: no such config key; did you mean "
                     r"config\.optimizer\.learning_rate\?"):
    config_lib.validate(config)


def test_a_missing_key_is_rejected_naming_it_and_its_default(tiny_config):
  del tiny_config.train["seq_len"]
  with pytest.raises(ConfigError, match=r"config\.train\.seq_len is missing"
                     r".*default 256"):
    config_lib.validate(tiny_config)


def test_window_length_is_seq_len_plus_the_shifted_target(tiny_config):
  # pylint: disable-next=g-import-not-at-top
  import numpy as np

  from bitnet_jax.data.batch import split_window
  tiny_config.train.seq_len = 7
  length = config_lib.window_length(tiny_config)
  inputs, targets = split_window(np.zeros((2, length), np.int32))
  assert length == 8 and inputs.shape == targets.shape == (2, 7), (
      f"window_length={length} does not split into seq_len=7 positions")


# Configs list only what they change.

# Set by a recipe for every size or config it is applied to, so it may equal
# a default: the FAQ size table's peaks (700M's are the defaults), and
# apply_fine_tuning's stage-2 weight decay.
_FAQ_PEAKS = {"optimizer.learning_rate", "optimizer.stage2_learning_rate"}
_SET_BY_A_RECIPE = {"configs/bitnet_2b4t.py": {"optimizer.stage2_weight_decay"},
                    **{name: _FAQ_PEAKS for name in RESEARCH}}


def _shifted_base():
  """base_config() with every default changed (same type)."""
  config = defaults.base_config()  # not the monkeypatched name
  for key, field in config_lib.FIELDS.items():
    *sections, name = key.split(".")
    node = config
    for section in sections:
      node = node[section]
    value = field.default
    node[name] = (not value if isinstance(value, bool) else value + 1
                  if isinstance(value, (int, float)) else value + "~")
  return config


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_set_only_fields_that_differ_from_the_defaults(
    load_config, monkeypatch, name):
  # pylint: disable-next=g-import-not-at-top
  from bitnet_jax.config import recipes
  monkeypatch.setattr(config_lib, "base_config", _shifted_base)
  monkeypatch.setattr(recipes, "base_config", _shifted_base)
  config, shifted = _flat(load_config(name)), _flat(_shifted_base())
  restated = [key for key, value in config.items()
              if value != shifted[key]
              and key not in _SET_BY_A_RECIPE.get(name.split(":")[0], ())
              and value == config_lib.FIELDS[key].default]
  assert not restated, f"{name} sets defaults again: {restated}"
  assert any(value != shifted[key] for key, value in config.items()), (
      f"{name} changed nothing: the test is vacuous")
