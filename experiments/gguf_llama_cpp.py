r"""Does upstream llama.cpp run our GGUF export as we do?

  pip install llama-cpp-python   # builds llama.cpp from source: ~7 min here
  python -m bitnet_jax.convert export-hf --workdir=RUN --out=OUT --format=gguf
  python experiments/gguf_llama_cpp.py --workdir=RUN --gguf=OUT/model-TQ2_0.gguf

Prints, for a few prompts, whether llama.cpp's greedy 20-token continuation
equals ours (`bitnet_jax.model.decode.greedy`), and the relative difference of
the next-token logits along one prompt. llama.cpp quantizes activations per
block of 256 (q8_K), not per token, so small differences are expected.
Upstream's "bitnet" graph is SiLU-gated and has no separate output matrix:
use a run with ffn_activation="swiglu" and tie_embeddings=True.
"""

from __future__ import annotations

import os
import sys

import jax.numpy as jnp
import numpy as np
from absl import app, flags
from llama_cpp import Llama

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bitnet_jax.data.tokenizer import load_tokenizer  # noqa: E402
from bitnet_jax.model.decode import greedy  # noqa: E402
from bitnet_jax.runs import reader  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "The exported run.")
_GGUF = flags.DEFINE_string("gguf", None, "Its GGUF file.")
PROMPTS = ("import os\nimport sys\n", "def main(",
           "class Foo:\n    def __init__(self")
LOGIT_PROMPT = "def main(argv):\n    parser = argparse.ArgumentParser("


def main(argv):
  del argv
  tokenizer = load_tokenizer(reader.tokenizer_path(_WORKDIR.value))
  _, model, _ = reader.load_model(_WORKDIR.value)
  llm = Llama(model_path=_GGUF.value, n_ctx=128, logits_all=True,
              verbose=False)
  for prompt in PROMPTS:
    ids = tokenizer.encode(prompt).ids
    ours = greedy(model, np.array([ids]), 20)[0].tolist()
    theirs = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
      theirs.append(token)
      if len(theirs) == 20:
        break
    first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                 None)
    print(f"{prompt!r}: greedy 20 equal: {ours == theirs} (first "
          f"difference at token {first})")
  ids = tokenizer.encode(LOGIT_PROMPT).ids
  llm.reset()
  llm.eval(ids)
  theirs = np.array(llm.scores[:len(ids)])
  ours = np.asarray(model(jnp.asarray([ids])))[0]
  error = np.abs(ours - theirs).max(-1) / np.abs(ours).max()
  print(f"logits along {len(ids)} positions: max relative difference "
        f"{error.max():.2e}, median {np.median(error):.2e}, argmax equal at "
        f"{np.mean(ours.argmax(-1) == theirs.argmax(-1)):.0%}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "gguf"])
  app.run(main)
