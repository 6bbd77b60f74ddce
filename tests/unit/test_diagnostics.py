"""Weight diagnostics: zero share and mean |W| per BitLinear kind."""

import jax
import numpy as np
import pytest
from flax import nnx

from bitnet_jax.model import diagnostics
from bitnet_jax.model.transformer import Transformer
from bitnet_jax.model.tree_paths import bitlinear_kind


def _params(model_config, scan_layers: bool):
  model_config = model_config.copy_and_resolve_references()
  model_config.scan_layers = scan_layers
  model = Transformer(model_config, rngs=nnx.Rngs(0))
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def _half_zero(shape, scale: float) -> np.ndarray:
  """Alternating 0 and ±scale: gamma = scale/2, codes 0 or ±1 (share 0.5)."""
  signs = np.where(np.arange(np.prod(shape)) % 4 == 1, 1.0, -1.0)
  values = np.where(np.arange(np.prod(shape)) % 2 == 1, signs * scale, 0.0)
  return values.reshape(shape).astype(np.float32)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_zero_share_and_mean_abs_use_one_gamma_per_layer(tiny_config,
                                                         scan_layers):
  # Layer l's q_proj is the half-zero pattern at scale 10**l. With one gamma
  # per matrix every layer has zero share 0.5; a gamma over the whole stack
  # would round all of layer 0 to 0 (2 layers: share 0.75).
  params = _params(tiny_config.model, scan_layers)
  n_layers = tiny_config.model.n_layers

  def patterned(path, kernel):
    if bitlinear_kind(path) != "q_proj":
      return kernel
    if scan_layers:
      return np.stack([_half_zero(kernel.shape[1:], 10.0**l)
                       for l in range(n_layers)])
    layer = next(k.key for k in path if isinstance(k.key, int))
    return _half_zero(kernel.shape, 10.0**layer)

  params = jax.tree_util.tree_map_with_path(patterned, params)
  stats = diagnostics.weight_statistics(params)
  assert float(stats["zero_share/q_proj"]) == pytest.approx(0.5), (
      "the zero share does not quantize each layer with its own gamma")
  expected = np.mean([0.5 * 10.0**l for l in range(n_layers)])
  assert float(stats["mean_abs_weight/q_proj"]) == pytest.approx(
      expected, rel=1e-5), "mean |W| is not the mean over the layers"


def test_gaussian_init_gives_the_gaussian_zero_share(tiny_config):
  # |z| < 0.5 x E|z| = 0.5 x 0.798 for z ~ N(0, 1): P = 0.31; E|W| = 0.798 std.
  stats = diagnostics.weight_statistics(_params(tiny_config.model, True))
  std = tiny_config.model.init_std
  kinds = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
           "down_proj"}
  assert {k.split("/")[1] for k in stats} == kinds, sorted(stats)
  for kind in kinds:
    assert abs(float(stats[f"zero_share/{kind}"]) - 0.31) < 0.03, (
        kind, float(stats[f"zero_share/{kind}"]))
    assert float(stats[f"mean_abs_weight/{kind}"]) == pytest.approx(
        0.798 * std, rel=0.05), (kind, float(stats[f"mean_abs_weight/{kind}"]))
