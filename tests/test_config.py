"""Configs carry the recipe and bad values fail at start-up, naming the key."""

import pytest

from bitnet_jax import config as config_lib
from bitnet_jax.config import ConfigError

RESEARCH = ["configs/bitnet_125m.py", "configs/bitnet_700m.py",
            "configs/bitnet_1p3b.py", "configs/bitnet_3b.py"]
CONFIGS = ["configs/tiny.py", "configs/d20.py", "configs/d20.py:cpu",
           "configs/bitnet_2b4t.py"] + RESEARCH + [f"{n}:fp" for n in RESEARCH]


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
  from bitnet_jax import runs
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
      runs.abstract_params(m)))
  assert n_params / 1e9 == pytest.approx(billions, abs=0.01), (
      f"{name}: {n_params:,} parameters")
  fp = load_config(name + ":fp")
  assert fp.model.quantization == "none"
  assert fp.optimizer.learning_rate == fp.optimizer.stage2_learning_rate == (
      2.5e-4 if "700m" in name else 2e-4), "FP16 baseline learning rate"
  assert fp.optimizer.stage2_weight_decay == fp.optimizer.weight_decay == 0.1
