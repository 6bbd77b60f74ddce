"""The names of every choice field, each listed once, as a `StrEnum`.

The field table (`bitnet_jax.config.defaults.FIELDS`) allows a choice field
exactly its enum's values (`fields.choice(Quantization)`), and the modules
that implement the choices key their tables by the members, e.g.
`bitnet_jax.model.transformer.REMAT_POLICIES[RematPolicy.FULL]`. A config
holds the plain string; a `StrEnum` member equals and hashes like its value,
so `table[config.model.remat_policy]` finds the member's entry. A new choice
is a member here plus its implementation's table row (tests check every
member has one); `bitnet_jax.config.validate` is the only check of a
config's value, naming the key.

Typed choices as in MaxText (`RematPolicy` and its siblings in its
`configs/types.py`).

Compare a value with a member (`config.quantization == Quantization.NONE`)
or test it against the tuples of values below (`STREAM_SCHEMES`), never
with `value in Enum`: Python 3.11 raises TypeError for a string there.
"""

from __future__ import annotations

import enum


class Quantization(enum.StrEnum):
  """`model.quantization`: what a BitLinear does to its weights and inputs."""
  TERNARY = "ternary"  # BitNet b1.58: ternary weights, int8 activations
  NONE = "none"  # the same parameters in full precision (the baseline)


class FfnActivation(enum.StrEnum):
  """`model.ffn_activation`: the gate's activation (model.transformer)."""
  SWIGLU = "swiglu"  # SiLU gate, the b1.58 paper
  RELU2 = "relu2"  # squared ReLU, BitNet b1.58 2B4T


class Dtype(enum.StrEnum):
  """`model.dtype`: the compute dtype (parameters stay float32)."""
  FLOAT32 = "float32"
  BFLOAT16 = "bfloat16"


class AttentionImplementation(enum.StrEnum):
  """`model.attention_implementation` (model.attention)."""
  AUTO = "auto"  # cudnn on a GPU in bfloat16, else xla
  XLA = "xla"
  CUDNN = "cudnn"


class RematPolicy(enum.StrEnum):
  """`model.remat_policy`: what the backward pass recomputes."""
  NONE = "none"
  FULL = "full"
  DOTS_SAVEABLE = "dots_saveable"
  SAVE_QKV_OUT = "save_qkv_out"


class BitLinearMatmul(enum.StrEnum):
  """`model.bitlinear_matmul`: how a ternary BitLinear multiplies."""
  FAKE_QUANT = "fake_quant"  # dequantized values in the compute dtype
  INT8 = "int8"  # int8 codes, int32 accumulation


class Residual(enum.StrEnum):
  """`model.residual`: the residual stream (model.residual)."""
  STANDARD = "standard"
  MHC_LITE = "mhc_lite"  # manifold-constrained hyper-connections


class RopeScaling(enum.StrEnum):
  """`model.rope_scaling`: the RoPE frequency scaling (model.layers)."""
  NONE = "none"
  LLAMA3 = "llama3"  # Llama 3.1's


class DatasetScheme(enum.StrEnum):
  """Random-access `data.dataset` schemes, `SCHEME:REST`
  (bitnet_jax.data.sources)."""
  TFDS = "tfds"
  FILES = "files"


class StreamScheme(enum.StrEnum):
  """`data.dataset` schemes of sharded files that can stream,
  `SCHEME:GLOB` (bitnet_jax.data.sources)."""
  PARQUET = "parquet"
  JSONL = "jsonl"
  ARRAYRECORD = "arrayrecord"


class DataMode(enum.StrEnum):
  """`data.mode` (bitnet_jax.data.pipeline)."""
  AUTO = "auto"  # stream for globs of a StreamScheme, else prepared
  STREAM = "stream"
  PREPARED = "prepared"  # a token cache


class Packing(enum.StrEnum):
  """`data.packing` (bitnet_jax.data.stream)."""
  CONCAT = "concat"
  DOCUMENT = "document"  # no attention across documents


def values(choices: type[enum.StrEnum]) -> tuple[str, ...]:
  """The members' values as plain strings, in definition order."""
  return tuple(member.value for member in choices)


# The same names as tuples of plain strings, for code that slices,
# concatenates or compares them with tuples (`bitnet_jax.data.sources`,
# `STREAM_SCHEMES[...]` in messages); derived, never listed again.
QUANTIZATIONS = values(Quantization)
FFN_ACTIVATIONS = values(FfnActivation)
DTYPES = values(Dtype)
ATTENTION_IMPLEMENTATIONS = values(AttentionImplementation)
REMAT_POLICIES = values(RematPolicy)
BITLINEAR_MATMULS = values(BitLinearMatmul)
RESIDUALS = values(Residual)
ROPE_SCALINGS = values(RopeScaling)
DATASET_SCHEMES = values(DatasetScheme)
STREAM_SCHEMES = values(StreamScheme)
DATA_MODES = values(DataMode)
PACKINGS = values(Packing)
