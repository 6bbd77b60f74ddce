r"""How closely transformers reproduces a run's model after export.

  python experiments/hf_parity.py --workdir=runs/tiny_2b4t_shape

For every export (bf16 / packed, float32 / bfloat16 tensors) prints the
largest relative logit difference between transformers' `BitNetForCausalLM`
(float32, CPU) and our model on the same weights, the share of positions
matching to 1e-4, whether greedy 20-token continuations agree, and how many
layer-0 activations sit within 1e-6 of an int8 rounding tie (where the two
frameworks may round differently). Needs the `test` extra (torch,
transformers).
"""

from __future__ import annotations

import os
import sys
import tempfile

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import app, flags  # noqa: E402
from flax import nnx  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bitnet_jax.interop import exporter, importer  # noqa: E402
from bitnet_jax.model.decode import greedy  # noqa: E402
from bitnet_jax.runs import reader  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run.")
_BATCH = flags.DEFINE_integer("batch", 8, "Sequences compared.")
_SEQ = flags.DEFINE_integer("seq", 16, "Tokens per sequence.")


def _near_ties(model, tokens: np.ndarray) -> tuple[int, int]:
  """(layer-0 q/k/v input activations within 1e-6 of a .5 tie, total)."""
  if model.scan_layers:  # layer 0's slice of the stacked blocks
    graphdef, state = nnx.split(model.layers)
    first = nnx.merge(graphdef, jax.tree.map(lambda x: x[0], state))
  else:
    first = model.layers[0]
  h = first.input_layernorm(model.embed_tokens(jnp.asarray(tokens)))
  scaled = np.asarray(h * 127 / jnp.max(jnp.abs(h), -1, keepdims=True))
  distance = np.abs(scaled - np.floor(scaled) - 0.5)
  return int(np.sum(distance < 1e-6)), scaled.size


def main(argv):
  del argv
  config = reader.load_run_config(_WORKDIR.value)
  tokens = np.random.default_rng(0).integers(
      0, config.model.vocab_size, (_BATCH.value, _SEQ.value), np.int32)
  print("| export | tensors | max rel. logit diff | positions within 1e-4 "
        "| greedy 20 equal | layer-0 near-ties |")
  print("|---|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as tmp:
    for fmt in ("bf16", "packed"):
      for dtype in ("float32", "bfloat16"):
        out = exporter.export_hf(_WORKDIR.value, f"{tmp}/{fmt}_{dtype}",
                                 fmt, dtype=dtype)
        reference = _WORKDIR.value
        if dtype == "bfloat16":  # our model on the rounded weights
          reference = f"{tmp}/{fmt}_{dtype}_run"
          importer.import_hf(out, reference)
        _, model, _ = reader.load_model(reference)
        ours = np.asarray(model(jnp.asarray(tokens)))
        theirs_model = AutoModelForCausalLM.from_pretrained(
            out, dtype=torch.float32)
        with torch.no_grad():
          theirs = theirs_model(torch.tensor(tokens, dtype=torch.long)
                                ).logits.numpy()
        scale = np.abs(ours).max()
        per_position = np.abs(ours - theirs).max(-1) / scale
        generated = theirs_model.generate(
            torch.tensor(tokens[:1, :8], dtype=torch.long),
            max_new_tokens=20, min_new_tokens=20, do_sample=False)
        same = np.array_equal(greedy(model, tokens[:1, :8], 20),
                              generated.numpy()[:, 8:])
        ties, total = _near_ties(model, tokens)
        print(f"| {fmt} | {dtype} | {per_position.max():.1e} | "
              f"{np.mean(per_position <= 1e-4):.0%} | {same} | "
              f"{ties} / {total} |")


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
