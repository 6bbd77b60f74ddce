"""Evaluation the way papers report it: lm-evaluation-harness tasks and
corpus perplexity, natively in JAX.

  scoring.py     the device side: token rows -> summed log-probabilities and
                 greedy flags, in a few static bucket shapes, over the mesh
  backend.py     `BitNetLM`, lm-eval's `LM` interface (registered as
                 "bitnet_jax"), scoring requests as lm-eval's `hf` backend does
  harness.py     tasks by name (`TaskManager`), `simple_evaluate`, the results
                 table, `harness/<task>/<metric>` scalars, clear errors for
                 unknown tasks and datasets not on the machine
  perplexity.py  token perplexity and bits per byte of a corpus
  diagnose.py    the per-position prediction table of a text (copy rate,
                 accuracy), `python -m bitnet_jax.generate --debug`

The command line is `python -m bitnet_jax.evaluate` (bitnet_jax/evaluate.py);
the train loop runs the tasks through `bitnet_jax.training.harness`.
"""
