"""Config validation, and the names every config imports.

Every experiment config in `configs/` starts from `base_config()` (defined,
one comment per field, in `bitnet_jax.defaults`) and overrides fields.
`validate(config)` runs once at start-up and raises `ConfigError` naming
the offending key, its value and the allowed values.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping

import ml_collections

from bitnet_jax.defaults import apply_fine_tuning, base_config

__all__ = [
    "ATTENTION_IMPLEMENTATIONS", "BITLINEAR_MATMULS", "ConfigError",
    "DATASET_SCHEMES", "DATA_MODES", "DTYPES", "FFN_ACTIVATIONS", "PACKINGS",
    "QUANTIZATIONS", "REMAT_POLICIES", "RESIDUALS", "STREAM_SCHEMES",
    "apply_fine_tuning", "base_config", "check_vocab", "validate"]

QUANTIZATIONS = ("ternary", "none")
FFN_ACTIVATIONS = ("swiglu", "relu2")
DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")
REMAT_POLICIES = ("none", "full", "dots_saveable", "save_qkv_out")
BITLINEAR_MATMULS = ("fake_quant", "int8")
RESIDUALS = ("standard", "mhc_lite")
# data.dataset schemes: random-access sources, and sharded file sources that
# can stream (see bitnet_jax.data.sources).
DATASET_SCHEMES = ("tfds", "files")
STREAM_SCHEMES = ("parquet", "jsonl", "arrayrecord")
DATA_MODES = ("auto", "stream", "prepared")
PACKINGS = ("concat", "document")


class ConfigError(ValueError):
  """A config value is invalid; the message names the key and the fix."""


def _fail(key: str, value, allowed: str) -> None:
  raise ConfigError(f"config.{key}={value!r} is invalid: {allowed}.")


def _check_choice(config, key: str, choices) -> None:
  value = _get(config, key)
  if value not in choices:
    _fail(key, value, f"allowed values are {', '.join(map(repr, choices))}")


def _check_positive(config, key: str, minimum: float = 1) -> None:
  value = _get(config, key)
  if not isinstance(value, (int, float)) or value < minimum:
    _fail(key, value, f"must be a number >= {minimum}")


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
  """Rejects NaN and +/-inf in every float leaf, present and future."""
  for key, value in _leaves(config):
    if (isinstance(value, numbers.Real)
        and not isinstance(value, numbers.Integral)
        and not math.isfinite(value)):
      _fail(key, value, "must be a finite number")


def _check_train_safety(config) -> None:
  """Checks the divergence stop, the lock timeout and the resume switch."""
  t = config.train
  factor = t.divergence_factor
  if (not isinstance(factor, numbers.Real) or isinstance(factor, bool)
      or not (factor == 0 or factor > 1)):
    _fail("train.divergence_factor", factor,
          "must be 0 (off) or a number > 1: the run stops when the loss "
          "exceeds this multiple of its running minimum")
  patience = t.divergence_patience
  if not isinstance(patience, int) or isinstance(patience, bool) or (
      patience < 1):
    _fail("train.divergence_patience", patience,
          "must be an integer >= 1 (consecutive losses above the limit "
          "before the run stops)")
  stale = t.lock_stale_seconds
  if (not isinstance(stale, numbers.Real) or isinstance(stale, bool)
      or not stale > 0):
    _fail("train.lock_stale_seconds", stale,
          "must be a number of seconds > 0")
  if not isinstance(t.allow_config_change, bool):
    _fail("train.allow_config_change", t.allow_config_change,
          "must be True or False")


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


def _check_batch_split(config) -> None:
  """Checks train.loss_chunk_size and train.grad_accum_steps."""
  t = config.train
  chunk = t.loss_chunk_size
  if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0 or (
      chunk and t.seq_len % chunk):
    _fail("train.loss_chunk_size", chunk,
          f"must be 0 (no chunks) or divide train.seq_len={t.seq_len}")
  accum = t.grad_accum_steps
  if not isinstance(accum, int) or isinstance(accum, bool) or accum < 1 or (
      t.batch_size % accum):
    _fail("train.grad_accum_steps", accum,
          f"must be an integer >= 1 dividing train.batch_size="
          f"{t.batch_size} (each micro-batch holds batch_size / "
          "grad_accum_steps sequences)")


def _check_remedies(config) -> None:
  """Checks the seeds' remedies: dropout, quantization warmup, mHC-lite,
  the entropy bonus, and the eval samples."""
  m, t = config.model, config.train
  if not isinstance(m.dropout_rate, numbers.Real) or not (
      0.0 <= m.dropout_rate < 1.0):
    _fail("model.dropout_rate", m.dropout_rate, "must lie in [0, 1)")
  warmup = m.quantization_warmup_steps
  if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
    _fail("model.quantization_warmup_steps", warmup,
          "must be an integer >= 0 (0: ternary from the first step)")
  if warmup and m.quantization != "ternary":
    _fail("model.quantization_warmup_steps", warmup,
          "blends full precision into ternary: it needs "
          "model.quantization='ternary' (set it to 0 for the fp baseline)")
  if warmup and m.bitlinear_matmul != "fake_quant":
    _fail("model.quantization_warmup_steps", warmup,
          "the blend runs on fake-quantized values: set "
          "model.bitlinear_matmul='fake_quant' (or the warmup to 0)")
  _check_choice(config, "model.residual", RESIDUALS)
  if m.residual_streams not in (2, 3, 4):
    _fail("model.residual_streams", m.residual_streams,
          "must be 2, 3 or 4 (mhc_lite mixes the streams with all n! "
          "permutation matrices)")
  _check_positive(config, "train.entropy_weight", minimum=0)
  for key in ("train.sample_prompts", "train.sample_prompt_tokens",
              "train.sample_new_tokens"):
    value = _get(config, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      _fail(key, value, "must be an integer >= 0")
  if t.sample_prompts and not 1 <= t.sample_prompt_tokens < t.seq_len:
    _fail("train.sample_prompt_tokens", t.sample_prompt_tokens,
          f"with train.sample_prompts > 0, prompts need >= 1 token and fewer "
          f"than train.seq_len={t.seq_len} (set train.sample_prompts=0 to "
          "turn samples off)")
  if t.sample_prompts and t.sample_new_tokens < 1:
    _fail("train.sample_new_tokens", t.sample_new_tokens,
          "with train.sample_prompts > 0, samples need >= 1 new token (set "
          "train.sample_prompts=0 to turn samples off)")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field once at start-up.

  Every float leaf, including fields added later, must be finite (NaN
  passes every `<` / `>` comparison check, so it is rejected first).

  Raises:
    ConfigError: on the first invalid field, naming `config.<key>`, the bad
      value and the allowed values.
  """
  _check_finite(config)
  for key in ("model.vocab_size", "model.d_model", "model.n_layers",
              "model.n_heads", "model.ffn_dim", "train.steps",
              "train.batch_size", "train.seq_len", "train.log_every",
              "train.eval_every", "train.eval_batches",
              "train.checkpoint_every", "train.keep_checkpoints"):
    _check_positive(config, key)
  _check_choice(config, "model.quantization", QUANTIZATIONS)
  _check_choice(config, "model.ffn_activation", FFN_ACTIVATIONS)
  _check_choice(config, "model.dtype", DTYPES)
  _check_choice(config, "model.attention_implementation",
                ATTENTION_IMPLEMENTATIONS)
  _check_choice(config, "model.remat_policy", REMAT_POLICIES)
  _check_choice(config, "model.bitlinear_matmul", BITLINEAR_MATMULS)
  _check_choice(config, "model.scan_layers", (True, False))
  if config.model.bitlinear_matmul == "int8" and (
      config.model.quantization != "ternary"):
    _fail("model.bitlinear_matmul", "int8", "the int8 matmul multiplies "
          "ternary weights: it needs model.quantization='ternary'")
  m = config.model
  if m.d_model % m.n_heads:
    _fail("model.d_model", m.d_model,
          f"must be divisible by model.n_heads={m.n_heads}")
  if not isinstance(m.n_kv_heads, int) or m.n_kv_heads < 0 or (
      m.n_kv_heads and m.n_heads % m.n_kv_heads):
    _fail("model.n_kv_heads", m.n_kv_heads,
          f"must be 0 (= n_heads) or divide model.n_heads={m.n_heads} "
          "(grouped-query attention)")
  if (m.d_model // m.n_heads) % 2:
    _fail("model.n_heads", m.n_heads,
          "d_model / n_heads must be even for RoPE")
  for key in ("model.rope_theta", "model.norm_eps", "model.init_std"):
    _check_positive(config, key, minimum=1e-30)

  d = config.data
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
  _check_choice(config, "data.mode", DATA_MODES)
  _check_choice(config, "data.packing", PACKINGS)
  if d.mode == "stream" and d.dataset.split(":")[0] not in STREAM_SCHEMES:
    _fail("data.mode", d.mode, f"streaming reads {', '.join(STREAM_SCHEMES)}"
          f" globs; data.dataset={d.dataset!r} needs data.mode='prepared' or "
          "'auto'")
  for key in ("data.shuffle_buffer_size", "data.read_concurrency"):
    _check_positive(config, key)
  if not 0.0 < d.eval_fraction < 1.0:
    _fail("data.eval_fraction", d.eval_fraction, "must lie in (0, 1)")
  for key in ("data.worker_count", "data.shuffle_seed", "seed"):
    _check_positive(config, key, minimum=0)
  if d.shuffle_seed >= 2**32:
    _fail("data.shuffle_seed", d.shuffle_seed, "grain needs a seed < 2**32")
  _check_positive(config, "data.prefetch_buffer_size", minimum=1)

  t, o = config.train, config.optimizer
  _check_batch_split(config)
  _check_remedies(config)
  for key in ("train.label_smoothing", "train.z_loss_weight"):
    _check_positive(config, key, minimum=0)
  if t.label_smoothing >= 1:
    _fail("train.label_smoothing", t.label_smoothing, "must lie in [0, 1)")
  if not 0.0 < o.stage_boundary < 1.0:
    _fail("optimizer.stage_boundary", o.stage_boundary,
          "must lie in (0, 1): the fraction of train.steps where stage 2 "
          "starts")
  if not 0 <= o.warmup_steps < o.stage_boundary * t.steps:
    _fail("optimizer.warmup_steps", o.warmup_steps,
          f"must be >= 0 and end before the stage boundary at step "
          f"{int(o.stage_boundary * t.steps)} (stage_boundary x train.steps)")
  for key in ("optimizer.learning_rate", "optimizer.stage2_learning_rate",
              "optimizer.weight_decay", "optimizer.stage2_weight_decay",
              "optimizer.final_learning_rate_fraction", "optimizer.eps",
              "optimizer.grad_clip_norm"):
    _check_positive(config, key, minimum=0)
  if o.final_learning_rate_fraction > 1:
    _fail("optimizer.final_learning_rate_fraction",
          o.final_learning_rate_fraction, "must lie in [0, 1]")
  for key in ("optimizer.b1", "optimizer.b2"):
    if not 0.0 <= _get(config, key) < 1.0:
      _fail(key, _get(config, key), "must lie in [0, 1)")

  for key in ("mesh.data", "mesh.fsdp"):
    value = _get(config, key)
    if not isinstance(value, int) or value == 0 or value < -1:
      _fail(key, value, "must be a positive device count or -1 (fill)")
  if config.mesh.data == -1 and config.mesh.fsdp == -1:
    _fail("mesh.fsdp", -1, "only one mesh axis may be -1")
  _check_train_safety(config)
  _check_health(config)


def _check_health(config) -> None:
  """Checks the collapse alarms' thresholds (bitnet_jax/health.py).

  Raises:
    ConfigError: naming `config.health.<key>`, its value and the range.
  """
  h = config.health
  if not isinstance(h.halt_on_alarm, bool):
    _fail("health.halt_on_alarm", h.halt_on_alarm, "must be True or False")
  for key, minimum in (("grace_steps", 0), ("patience", 1),
                       ("min_unique_predictions", 1),
                       ("loss_too_fast_steps", 0)):
    value = h[key]
    if not isinstance(value, int) or isinstance(value, bool) or (
        value < minimum):
      _fail(f"health.{key}", value, f"must be an integer >= {minimum}")
  for key, low_ok, high_ok, interval in (  # all within 0 .. 1
      ("grace_fraction", True, False, "[0, 1)"),
      ("copy_rate_floor", False, True, "(0, 1]"),
      ("max_top_token_share", False, False, "(0, 1)"),
      ("loss_too_fast_fraction", True, False, "[0, 1) (0: off)")):
    value = h[key]
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not (
        (0 <= value if low_ok else 0 < value) and
        (value <= 1 if high_ok else value < 1)):
      _fail(f"health.{key}", value, f"must lie in {interval}")
  gap = h.memorization_gap
  if not isinstance(gap, numbers.Real) or isinstance(gap, bool) or gap <= 0:
    _fail("health.memorization_gap", gap, "must be a number of nats > 0")


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
