"""Config validation, and the names every config imports.

Every experiment config in `configs/` starts from `base_config()` and sets
only the fields it changes. The fields, with default, allowed values, resume
class and doc, are the table `bitnet_jax.config.defaults.FIELDS`.
`validate(config)`
runs once at start-up and raises `ConfigError` naming the offending key, its
value and the allowed values: every per-field check comes from the table;
the relations between fields are written out below.

What ml_collections' type-safe ConfigDict enforces itself, measured with
ml_collections 1.1.0 (`config.x = v`, `config["x"] = v`, `config.update()`
and `update_from_flattened_dict` behave alike):

  int field    str, float, numpy scalars: TypeError. bool: accepted (an int
               subclass). None: accepted.
  float field  int and bool: accepted, cast to float (True -> 1.0, so a bool
               cannot be seen afterwards). str: TypeError. NaN, inf: accepted.
  bool field   int (0, 1), str: TypeError. None: accepted.
  str field    int: TypeError. None: accepted.
  any field    anything, under `with config.ignore_type():`.
  unknown key  added silently by assignment and `update` (a typo in a config
               file, or in a saved config.json that `runs.load_run_config`
               applies with `update`); a locked config refuses it (KeyError
               listing the fields); reading one raises AttributeError
               'Did you mean "steps" instead of "stepz"?'.

Command-line overrides (`ml_collections.config_flags`) parse the text with
the field's type: `--config.train.steps=abc` (also `=5.0`, `=True`) stops
with "invalid literal for int()"; a bool field takes true/false/1/0 (`=yes`:
"Non-boolean argument to boolean flag"); a float field takes `nan`; a str
field any text. An unknown key, `--config.train.stepz=5`, raises
AttributeError 'Did you mean "steps" instead of "stepz"?', an unknown section
(`--config.trian.steps=5`) KeyError 'Did you mean "train" ...'.

So the table's rules check the type as well as the range, for what gets
through: None anywhere, a bool in an int field, anything under
`ignore_type()`; and `validate` rejects a key the table lacks, naming the
nearest known key.
"""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterator, Mapping

import ml_collections

from bitnet_jax.config.choices import (
  ATTENTION_IMPLEMENTATIONS,
  BITLINEAR_MATMULS,
  DATA_MODES,
  DATASET_SCHEMES,
  DTYPES,
  FFN_ACTIVATIONS,
  PACKINGS,
  QUANTIZATIONS,
  REMAT_POLICIES,
  RESIDUALS,
  ROPE_SCALINGS,
  STREAM_SCHEMES,
  AttentionImplementation,
  BitLinearMatmul,
  DataMode,
  DatasetScheme,
  Dtype,
  FfnActivation,
  Packing,
  Quantization,
  RematPolicy,
  Residual,
  RopeScaling,
  StreamScheme,
)
from bitnet_jax.config.defaults import FIELDS, apply_fine_tuning, base_config

__all__ = [
    "ATTENTION_IMPLEMENTATIONS", "BITLINEAR_MATMULS", "ConfigError",
    "DATASET_SCHEMES", "DATA_MODES", "DTYPES", "FFN_ACTIVATIONS", "FIELDS",
    "PACKINGS", "QUANTIZATIONS", "REMAT_POLICIES", "RESIDUALS",
    "ROPE_SCALINGS", "STREAM_SCHEMES", "AttentionImplementation",
    "BitLinearMatmul", "DataMode", "DatasetScheme", "Dtype",
    "FfnActivation", "Packing", "Quantization", "RematPolicy", "Residual",
    "RopeScaling", "StreamScheme", "apply_fine_tuning", "base_config",
    "check_vocab", "validate", "window_length"]


class ConfigError(ValueError):
  """A config value is invalid; the message names the key and the fix."""


def _fail(key: str, value, allowed: str) -> None:
  raise ConfigError(f"config.{key}={value!r} is invalid: {allowed}.")


def _get(config, key: str):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def _leaves(node, prefix: str = "") -> Iterator[tuple[str, object]]:
  """Yields (dotted key, value) for every leaf under `node`.

  ConfigDicts (and mappings) and lists/tuples are descended into; list items
  are named `key[i]`.
  """
  if isinstance(node, (ml_collections.ConfigDict, Mapping)):
    for key, value in node.items():
      yield from _leaves(value, f"{prefix}.{key}" if prefix else str(key))
  elif isinstance(node, (list, tuple)):
    for i, value in enumerate(node):
      yield from _leaves(value, f"{prefix}[{i}]")
  else:
    yield prefix, node


def _check_finite(config) -> None:
  """Rejects NaN and +/-inf in every float leaf, known to the table or not."""
  for key, value in _leaves(config):
    if (isinstance(value, numbers.Real)
        and not isinstance(value, numbers.Integral)
        and not math.isfinite(value)):
      _fail(key, value, "must be a finite number")


def _check_fields(config) -> None:
  """Checks every leaf against its table rule; a key not in it is an error.

  ml_collections adds an unknown key silently (see the module docstring), so
  a typo here names the nearest key of the table.
  """
  for key, value in _leaves(config):
    if key not in FIELDS:
      near = difflib.get_close_matches(key, FIELDS, n=1)
      _fail(key, value, "no such config key" + (
          f"; did you mean config.{near[0]}?" if near else
          " (the keys are listed in bitnet_jax/config/defaults.py)"))
  for key, field in FIELDS.items():
    try:
      value = _get(config, key)
    except (KeyError, AttributeError):
      raise ConfigError(f"config.{key} is missing: every config needs it "
                        f"(default {field.default!r}: start from "
                        "base_config())") from None
    message = field.error(value)
    if message:
      raise ConfigError(message)


def _check_dataset(key: str, spec: str, stdlib: bool = True) -> None:
  """Checks a `data.dataset`-style spec: "stdlib" or "SCHEME:REST"."""
  scheme, _, rest = spec.partition(":")
  if not ((stdlib and spec == "stdlib") or (
      scheme in DATASET_SCHEMES + STREAM_SCHEMES and rest)):
    _fail(key, spec,
          "use 'stdlib', 'tfds:NAME[/CONFIG]' (a prepared TFDS dataset), "
          "'files:GLOB' (text files, one document each), 'parquet:GLOB', "
          "'jsonl:GLOB' (.jsonl, .jsonl.gz, .jsonl.zst) or 'arrayrecord:GLOB'"
          "; GLOB may be a gs:// or s3:// URL")


def _check_model(m) -> None:
  """Checks the relations between `config.model` fields."""
  if not m.head_dim and m.d_model % m.n_heads:
    _fail("model.d_model", m.d_model,
          f"must be divisible by model.n_heads={m.n_heads} (or set "
          "model.head_dim)")
  if m.n_kv_heads < 0 or (m.n_kv_heads and m.n_heads % m.n_kv_heads):
    _fail("model.n_kv_heads", m.n_kv_heads,
          f"must be 0 (= n_heads) or divide model.n_heads={m.n_heads} "
          "(grouped-query attention)")
  if m.head_dim % 2:
    _fail("model.head_dim", m.head_dim, "must be even for RoPE")
  if not m.head_dim and (m.d_model // m.n_heads) % 2:
    _fail("model.n_heads", m.n_heads,
          "d_model / n_heads must be even for RoPE")
  if (m.bitlinear_matmul == BitLinearMatmul.INT8
      and m.quantization != Quantization.TERNARY):
    _fail("model.bitlinear_matmul", "int8", "the int8 matmul multiplies "
          "ternary weights: it needs model.quantization='ternary'")
  if m.rope_scaling == RopeScaling.LLAMA3 and (
      m.rope_high_freq_factor <= m.rope_low_freq_factor):
    _fail("model.rope_high_freq_factor", m.rope_high_freq_factor,
          f"must exceed model.rope_low_freq_factor={m.rope_low_freq_factor} "
          "(Llama 3.1's smooth interpolation divides by their difference)")
  warmup = m.quantization_warmup_steps
  if warmup and m.quantization != Quantization.TERNARY:
    _fail("model.quantization_warmup_steps", warmup,
          "blends full precision into ternary: it needs "
          "model.quantization='ternary' (set it to 0 for the fp baseline)")
  if warmup and m.bitlinear_matmul != BitLinearMatmul.FAKE_QUANT:
    _fail("model.quantization_warmup_steps", warmup,
          "the blend runs on fake-quantized values: set "
          "model.bitlinear_matmul='fake_quant' (or the warmup to 0)")


def _check_data(d) -> None:
  """Checks the dataset specs and the relations of `config.data` fields."""
  _check_dataset("data.dataset", d.dataset)
  if d.eval_dataset:
    _check_dataset("data.eval_dataset", d.eval_dataset, stdlib=False)
    scheme = d.dataset.partition(":")[0]
    if scheme not in STREAM_SCHEMES or (
        d.eval_dataset.partition(":")[0] != scheme):
      _fail("data.eval_dataset", d.eval_dataset,
            f"must be a glob of the same scheme as data.dataset={d.dataset!r}"
            f" ({', '.join(STREAM_SCHEMES)}); the other datasets choose eval "
            "data with data.eval_fraction / data.eval_split")
  if (d.mode == DataMode.STREAM
      and d.dataset.split(":")[0] not in STREAM_SCHEMES):
    _fail("data.mode", d.mode, f"streaming reads {', '.join(STREAM_SCHEMES)}"
          f" globs; data.dataset={d.dataset!r} needs data.mode='prepared' or "
          "'auto'")
  if d.shuffle_seed >= 2**32:
    _fail("data.shuffle_seed", d.shuffle_seed, "grain needs a seed < 2**32")


def _check_train(t) -> None:
  """Checks the relations of `config.train` fields: batch split, samples."""
  chunk = t.loss_chunk_size
  if chunk < 0 or (chunk and t.seq_len % chunk):
    _fail("train.loss_chunk_size", chunk,
          f"must be 0 (no chunks) or divide train.seq_len={t.seq_len}")
  accum = t.grad_accum_steps
  if accum < 1 or t.batch_size % accum:
    _fail("train.grad_accum_steps", accum,
          f"must be an integer >= 1 dividing train.batch_size="
          f"{t.batch_size} (each micro-batch holds batch_size / "
          "grad_accum_steps sequences)")
  if t.sample_prompts and not 1 <= t.sample_prompt_tokens < t.seq_len:
    _fail("train.sample_prompt_tokens", t.sample_prompt_tokens,
          f"with train.sample_prompts > 0, prompts need >= 1 token and fewer "
          f"than train.seq_len={t.seq_len} (set train.sample_prompts=0 to "
          "turn samples off)")
  distilling = t.distill_logit_weight > 0 or t.distill_attention_weight > 0
  if distilling and not t.teacher:
    _fail("train.teacher", t.teacher,
          "train.distill_logit_weight or train.distill_attention_weight is "
          "> 0: name the teacher run (a run directory or "
          "RUN/checkpoints/<step>), or set both weights to 0")
  if not distilling and not t.ce_weight:
    _fail("train.ce_weight", t.ce_weight,
          "with no distillation weight > 0, the loss would be 0: set "
          "train.ce_weight > 0")
  if t.sample_prompts and t.sample_new_tokens < 1:
    _fail("train.sample_new_tokens", t.sample_new_tokens,
          "with train.sample_prompts > 0, samples need >= 1 new token (set "
          "train.sample_prompts=0 to turn samples off)")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field once at start-up.

  In order: every float leaf, in the table or not, must be finite (NaN
  passes every `<` / `>` comparison, so it is rejected first); every leaf
  must be a key of `FIELDS` and satisfy its rule; then the relations
  between fields.

  Raises:
    ConfigError: on the first invalid field, naming `config.<key>`, the bad
      value and the allowed values (for an unknown key, the nearest known
      one).
  """
  _check_finite(config)
  _check_fields(config)
  _check_model(config.model)
  _check_data(config.data)
  _check_train(config.train)
  o, t = config.optimizer, config.train
  if o.warmup_steps >= o.stage_boundary * t.steps:
    _fail("optimizer.warmup_steps", o.warmup_steps,
          f"must end before the stage boundary at step "
          f"{int(o.stage_boundary * t.steps)} (stage_boundary x train.steps)")
  if config.mesh.data == -1 and config.mesh.fsdp == -1:
    _fail("mesh.fsdp", -1, "only one mesh axis may be -1")


def window_length(config: ml_collections.ConfigDict) -> int:
  """Tokens in one training window: `config.train.seq_len + 1`.

  A window holds the inputs and, shifted by one, their next-token targets
  (`bitnet_jax.data.batch.split_window` splits `[batch, seq_len + 1]` into
  two `[batch, seq_len]` halves), so data sources cut windows of this length.
  """
  return int(config.train.seq_len) + 1


def check_vocab(config: ml_collections.ConfigDict, tokenizer_vocab_size: int,
                source: str) -> None:
  """Checks the model's vocabulary covers a loaded tokenizer's.

  Raises:
    ConfigError: naming `model.vocab_size` when the tokenizer (read from
      `source`) has more tokens than the model has logits; token ids past
      `vocab_size` would otherwise be clamped silently by the embedding gather.
  """
  if tokenizer_vocab_size > config.model.vocab_size:
    _fail("model.vocab_size", config.model.vocab_size,
          f"the tokenizer {source} has {tokenizer_vocab_size} tokens; set "
          f"--config.model.vocab_size={tokenizer_vocab_size} (or larger)")
