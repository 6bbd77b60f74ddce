"""The transformer: causality, BitLinear semantics, layout, precision switch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitnet_jax.config import (
  AttentionImplementation,
  BitLinearMatmul,
  FfnActivation,
  Quantization,
  RematPolicy,
)
from bitnet_jax.model import attention, layers, transformer
from bitnet_jax.model import block as block_lib
from bitnet_jax.model.layers import BitLinear
from bitnet_jax.model.layout import unstack_layers
from bitnet_jax.model.transformer import Transformer
from bitnet_jax.model.tree_paths import BITLINEAR_NAMES
from bitnet_jax.quant import quantizers


def _model(tiny_config, **overrides):
  config = tiny_config.model
  config.update(overrides)
  return Transformer(config, rngs=nnx.Rngs(0))


def _param_paths(model) -> dict[str, tuple]:
  """Parameter shapes by path, in the unrolled layout (layers/<i>/...)."""
  state = unstack_layers(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf.shape
          for path, leaf in jax.tree_util.tree_leaves_with_path(state)}


def test_logits_shape_and_dtype(tiny_config):
  model = _model(tiny_config)
  logits = model(jnp.zeros((3, 10), jnp.int32))
  assert logits.shape == (3, 10, tiny_config.model.vocab_size), logits.shape
  assert logits.dtype == jnp.float32, "logits must be float32 for the loss"


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["ternary", "none"])
def test_logits_at_position_i_ignore_later_tokens(tiny_config, quantization):
  model = _model(tiny_config, quantization=quantization)
  vocab = tiny_config.model.vocab_size
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, vocab)
  base = model(tokens)
  for i in (0, 5, 10):
    changed = tokens.at[:, i + 1:].set((tokens[:, i + 1:] + 7) % vocab)
    np.testing.assert_allclose(
        model(changed)[:, :i + 1], base[:, :i + 1], rtol=1e-5, atol=1e-5,
        err_msg=f"logits at positions <= {i} changed when later tokens did: "
        "attention is not causal")
    assert not np.allclose(model(changed)[:, i + 1:], base[:, i + 1:]), (
        "changing tokens changed no later logits: the test is vacuous")


def test_bitlinear_ternary_is_quantized_matmul():
  layer = BitLinear(16, 8, quantization="ternary", init_std=0.02,
                    dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 16))
  expected = quantizers.activation_quant(x) @ quantizers.weight_quant(layer.kernel[...])
  np.testing.assert_allclose(layer(x), expected, rtol=1e-6,
                             err_msg="BitLinear != actq(x) @ weightq(W)")
  assert not np.allclose(layer(x), x @ layer.kernel[...], rtol=1e-3), (
      "ternary BitLinear equals the full-precision matmul: not quantized")


def test_bitlinear_none_is_plain_matmul():
  layer = BitLinear(16, 8, quantization="none", init_std=0.02,
                    dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 16))
  np.testing.assert_allclose(layer(x), x @ layer.kernel[...], rtol=1e-6,
                             err_msg="quantization='none' is not x @ W")


def test_full_precision_baseline_has_identical_parameters(tiny_config):
  ternary = _param_paths(_model(tiny_config, quantization="ternary"))
  full = _param_paths(_model(tiny_config, quantization="none"))
  assert ternary == full, "'none' must be the same architecture as 'ternary'"


def test_block_layout_uses_2b4t_names(tiny_config):
  paths = _param_paths(_model(tiny_config))
  d, f = tiny_config.model.d_model, tiny_config.model.ffn_dim
  expected = {
      "self_attn/q_proj/kernel": (d, d), "self_attn/k_proj/kernel": (d, d),
      "self_attn/v_proj/kernel": (d, d), "self_attn/o_proj/kernel": (d, d),
      "self_attn/attn_sub_norm/scale": (d,), "mlp/gate_proj/kernel": (d, f),
      "mlp/up_proj/kernel": (d, f), "mlp/down_proj/kernel": (f, d),
      "mlp/ffn_sub_norm/scale": (f,), "input_layernorm/scale": (d,),
      "post_attention_layernorm/scale": (d,)}
  for layer in range(tiny_config.model.n_layers):
    for name, shape in expected.items():
      assert paths.get(f"layers/{layer}/{name}") == shape, (
          f"layers/{layer}/{name} missing or not {shape}")
  assert {p for p in paths if not p.startswith("layers/")} == {
      "embed_tokens/embedding", "norm/scale", "lm_head/kernel"}, paths.keys()


def test_only_block_linears_are_bitlinear(tiny_config):
  model = _model(tiny_config)
  bitlinear = {path[-1] for path, module in nnx.iter_modules(model)
               if isinstance(module, BitLinear)}
  assert bitlinear == set(BITLINEAR_NAMES), (
      f"BitLinear modules {bitlinear}; embeddings and lm_head must stay fp")


def test_untied_by_default_and_tying_shares_the_embedding(tiny_config):
  assert tiny_config.model.tie_embeddings is False, "default must be untied"
  tied = _model(tiny_config, tie_embeddings=True, scan_layers=False)
  assert "lm_head/kernel" not in _param_paths(tied), "tied model has lm_head"
  tokens = jnp.arange(8, dtype=jnp.int32)[None]
  hidden = tied.embed_tokens(tokens).astype(jnp.float32)
  for block in tied.layers:
    hidden, _ = block(hidden)
  expected = tied.norm(hidden) @ tied.embed_tokens.embedding[...].T
  np.testing.assert_allclose(tied(tokens), expected, rtol=1e-5, atol=1e-6,
                             err_msg="tied logits are not h @ E^T")


def test_relu2_activation_changes_the_ffn(tiny_config):
  tokens = jnp.arange(8, dtype=jnp.int32)[None]
  swiglu = _model(tiny_config, ffn_activation="swiglu")(tokens)
  relu2 = _model(tiny_config, ffn_activation="relu2")(tokens)
  assert not np.allclose(swiglu, relu2), "ffn_activation has no effect"


def test_bfloat16_compute_keeps_float32_params(tiny_config):
  model = _model(tiny_config, dtype="bfloat16")
  dtypes = {leaf.dtype for leaf in jax.tree.leaves(
      nnx.to_pure_dict(nnx.state(model, nnx.Param)))}
  assert dtypes == {jnp.dtype(jnp.float32)}, f"param dtypes {dtypes}"
  logits = model(jnp.zeros((1, 4), jnp.int32))
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))


@pytest.mark.slow
@pytest.mark.parametrize("quantization,n_kv_heads", [("ternary", 0),
                                                     ("none", 0),
                                                     ("ternary", 1)])
def test_packed_documents_do_not_see_each_other(tiny_config, quantization,
                                                n_kv_heads):
  """With segment ids and positions, document B in a packed window gets the
  logits it gets alone at the start of a window, whatever document A holds
  (also under grouped-query attention)."""
  # pylint: disable-next=g-import-not-at-top
  from bitnet_jax.data.batch import Batch
  model = _model(tiny_config, quantization=quantization,
                 n_kv_heads=n_kv_heads)
  vocab, eot = tiny_config.model.vocab_size, 0
  key_a, key_b = jax.random.split(jax.random.key(1))
  doc_a = np.asarray(jax.random.randint(key_a, (1, 7), 1, vocab))
  doc_b = np.asarray(jax.random.randint(key_b, (1, 9), 1, vocab))
  window = np.concatenate([doc_a, [[eot]], doc_b], axis=1)  # A EOT B
  features = Batch.packed(window, eot)
  np.testing.assert_array_equal(
      features.positions[0], list(range(8)) + list(range(9)),
      "positions must restart after the end-of-text token")
  packed = model(window, segment_ids=features.segment_ids,
                 positions=features.positions)
  alone = model(doc_b)
  np.testing.assert_allclose(
      packed[:, 8:], alone, rtol=1e-5, atol=1e-5,
      err_msg="document B's logits depend on document A")
  changed_a = window.copy()
  changed_a[:, :7] = (changed_a[:, :7] + 5) % (vocab - 1) + 1
  changed = model(changed_a, segment_ids=features.segment_ids,
                  positions=features.positions)
  np.testing.assert_array_equal(packed[:, 8:], changed[:, 8:],
                                "document B's logits depend on document A")
  unmasked = model(window)
  assert not np.allclose(unmasked[:, 8:], alone, atol=1e-3), (
      "without segment ids B should see A: the test cannot tell")


def test_cudnn_attention_falls_back_to_xla_with_a_warning(tiny_config,
                                                          caplog):
  # pylint: disable-next=g-import-not-at-top
  from bitnet_jax.model import attention
  attention._LOGGED.clear()  # pylint: disable=protected-access
  model = _model(tiny_config, attention_implementation="cudnn",
                 dtype="bfloat16")
  with caplog.at_level("INFO"):
    logits = model(jnp.zeros((2, 8), jnp.int32))
  assert logits.dtype == jnp.float32
  warnings = [r.getMessage() for r in caplog.records
              if r.levelname == "WARNING"]
  assert any("cuDNN cannot run" in w and "no GPU" in w for w in warnings), (
      f"no fallback WARNING: {warnings}")
  assert any("attention implementation: xla" in r.getMessage()
             for r in caplog.records), "the implementation used is not logged"


@pytest.mark.parametrize("dtype,head_dim,seq_len,masked,reason", [
    (jnp.bfloat16, 64, 2048, False, ""),
    (jnp.bfloat16, 128, 2047, False, ""),
    (jnp.float32, 64, 2048, False, "needs bfloat16 or float16"),
    (jnp.bfloat16, 100, 2048, False, "head dim 100"),  # configs/bitnet_3b.py
    (jnp.bfloat16, 256, 2048, False, "head dim 256"),
    (jnp.bfloat16, 64, 2047, True, "even sequence length"),
])
def test_cudnn_limits_are_named(dtype, head_dim, seq_len, masked, reason):
  # pylint: disable-next=g-import-not-at-top
  from bitnet_jax.model.attention import cudnn_unsupported
  found = cudnn_unsupported(dtype, head_dim, seq_len, masked, backend="gpu")
  assert (reason in found) if reason else found == "", found
  assert cudnn_unsupported(dtype, head_dim, seq_len, masked).startswith(
      "no GPU"), "these tests run on CPU"


def _subjaxprs(eqn):
  """The jaxprs nested in an equation's parameters (scan, remat, custom_vjp)."""
  for value in eqn.params.values():
    for item in value if isinstance(value, (list, tuple)) else [value]:
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def _dot_dtypes(model, tokens):
  """Input dtypes of every dot_general in the forward pass (nested too)."""
  graphdef, state = nnx.split(model)
  jaxpr = jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(tokens))(state)
  found = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.append(tuple(str(v.aval.dtype) for v in eqn.invars))
      for sub in _subjaxprs(eqn):
        visit(sub)

  visit(jaxpr.jaxpr)
  return found


@pytest.mark.parametrize("matmul,expected", [
    ("fake_quant", ("bfloat16", "bfloat16")), ("int8", ("int8", "int8"))])
def test_bf16_model_multiplies_in_the_compute_dtype(tiny_config, matmul,
                                                    expected):
  model = _model(tiny_config, dtype="bfloat16", bitlinear_matmul=matmul)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
  dots = _dot_dtypes(model, jnp.zeros((2, 8), jnp.int32))
  bitlinear = [d for d in dots if d == expected]  # scanned: one block body
  assert len(bitlinear) >= 7, f"fewer than 7 BitLinear dots: {dots}"
  attention_and_head = [d for d in dots if d != expected]
  assert all(d == ("bfloat16", "bfloat16") for d in attention_and_head), (
      f"a matmul ran outside bf16: {dots}")
  assert model(jnp.zeros((2, 8), jnp.int32)).dtype == jnp.float32


@pytest.mark.parametrize("table,choices", [
    (layers.BITLINEAR_MATMULS, BitLinearMatmul),
    (block_lib.FFN_ACTIVATIONS, FfnActivation),
    (transformer.REMAT_POLICIES, RematPolicy)],
    ids=["bitlinear_matmul", "ffn_activation", "remat_policy"])
def test_every_choice_has_an_entry_in_its_model_table(table, choices):
  assert len(choices) >= 2, f"{choices.__name__}: the test is vacuous"
  missing = [member.value for member in choices if member not in table]
  assert not missing, (
      f"{choices.__name__} {missing} pass config.validate but the model has "
      "no implementation: add the table entry")
  strays = [key for key in table if not isinstance(key, choices)]
  assert not strays, (
      f"table keys {strays} are not {choices.__name__} members: validate "
      "refuses them, so they are unreachable")
  for member in choices:  # a config holds the plain string
    assert table[str(member.value)] is table[member], member


@pytest.mark.parametrize("requested", [m.value for m in AttentionImplementation])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_every_attention_implementation_resolves_to_one_jax_runs(requested,
                                                                 dtype):
  chosen = attention.attention_implementation(requested, dtype, 64, 8, False)
  assert type(chosen) is str and chosen in ("xla", "cudnn"), (
      f"model.attention_implementation={requested!r} resolved to "
      f"{chosen!r}, which jax.nn.dot_product_attention does not run")


@pytest.mark.parametrize("matmul", [m.value for m in BitLinearMatmul])
@pytest.mark.parametrize("quantization", [m.value for m in Quantization])
def test_every_quantization_and_matmul_builds_a_bitlinear_that_runs(
    quantization, matmul):
  layer = BitLinear(16, 8, quantization=quantization, matmul=matmul,
                    init_std=0.02, dtype=jnp.float32, rngs=nnx.Rngs(0))
  y = layer(jax.random.normal(jax.random.key(1), (4, 16)))
  assert y.shape == (4, 8) and bool(jnp.all(jnp.isfinite(y))), y


@pytest.mark.parametrize("key,value", [
    ("quantization", "binary"), ("ffn_activation", "gelu"),
    ("bitlinear_matmul", "int4"), ("remat_policy", "offload")])
def test_a_name_outside_its_enum_fails_the_build_instead_of_running_another(
    tiny_config, key, value):
  """config.validate names the key; a model built without it must still not
  fall through to some other implementation."""
  with pytest.raises((KeyError, ValueError), match=value):
    _model(tiny_config, **{key: value})
