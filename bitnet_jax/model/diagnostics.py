"""Weight diagnostics of the ternary layers, computed at every evaluation.

For each BitLinear kind (q/k/v/o_proj, gate/up/down_proj) over all blocks:

- `zero_share/<kind>`: the share of latent weights whose ternary code is 0
  (|W| / gamma rounds to 0, gamma = mean|W| of their matrix; `quant.
  weight_codes`). About 0.31 for Gaussian weights (|z| < 0.5 x 0.798);
  a share drifting toward 1 means the layer is switching itself off.
- `mean_abs_weight/<kind>`: mean |W| of the latent weights (the scale
  gamma), which weight decay shrinks: stage-2 weight decay on ternary
  weights drives codes to 0 (the FAQ recipe turns it off there).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from bitnet_jax.model.tree_paths import bitlinear_kind, in_stacked_layers
from bitnet_jax.quant import quantizers


@jax.jit
def weight_statistics(params: Any) -> dict[str, jax.Array]:
  """Per-kind zero share and mean |W| of the BitLinear latent weights.

  Args:
    params: the model's parameter tree (pure dict), either layer layout;
      scanned kernels `[n_layers, in, out]` get one gamma per layer.

  Returns:
    float32 scalars `zero_share/<kind>` and `mean_abs_weight/<kind>` for
    every kind present (none for a tree without BitLinear kernels).
  """
  zeros: dict[str, list] = {}
  means: dict[str, list] = {}
  for path, kernel in jax.tree_util.tree_leaves_with_path(params):
    kind = bitlinear_kind(path)
    if kind is None:
      continue
    codes_of = (jax.vmap(lambda w: quantizers.weight_codes(w)[0])
                if in_stacked_layers(path)
                else lambda w: quantizers.weight_codes(w)[0])
    codes = codes_of(kernel)
    zeros.setdefault(kind, []).append(jnp.mean(codes == 0))
    means.setdefault(kind, []).append(jnp.mean(jnp.abs(kernel)))
  stats = {}
  for kind in zeros:
    stats[f"zero_share/{kind}"] = jnp.mean(jnp.stack(zeros[kind]))
    stats[f"mean_abs_weight/{kind}"] = jnp.mean(jnp.stack(means[kind]))
  return stats
