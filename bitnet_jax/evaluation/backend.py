"""`BitNetLM`: lm-evaluation-harness's `LM` interface on a bitnet_jax model.

Registered as "bitnet_jax", so `lm_eval.simple_evaluate(model=BitNetLM(...))`
and, once this module is imported, `model="bitnet_jax"` with
`model_args="workdir=RUN[,step=N,batch_size=16]"` both work.

Requests are handled as lm-eval's `hf` backend handles them
(lm_eval/models/huggingface.py, v0.4.13), so a run and its
`export-hf --format=bf16 --dtype=float32` score the same:

- context/continuation: `TemplateLM._encode_pair` (trailing context spaces
  move to the continuation; the pair is encoded whole and split at the
  context's length); an empty context is the prefix token (BOS, else EOS).
- loglikelihood: the window `(context + continuation)[-(max_length + 1):]`
  (left truncation), the continuation's log-probabilities summed, is_greedy
  when each continuation token is the argmax. A continuation that encodes to
  no tokens (the pair's tokens merge across the boundary, e.g. "retu" +
  "rn x") scores (0.0, True), with a warning (the `hf` backend fails an
  assertion on it: `_select_cont_toks` needs contlen > 0).
- loglikelihood_rolling: lm-eval's `get_rolling_token_windows` with the
  model's context (`max_length`) and `make_disjoint_window`, summed.
- generate_until: contexts left-truncated to `max_length - max_gen_toks`,
  greedy (or sampled) decoding of `max_gen_toks` tokens with the KV cache
  (`bitnet_jax.model.decode`), cut at the first EOS token, decoded without
  special
  tokens, cut at the first stop sequence.

Every request runs through the model's own quantized forward (fake-quantized
ternary weights, per-token int8 activations, as in training), which the
packed `export-hf --format=packed` reproduces in transformers
(tests/integration/test_hf_export.py compares their logits).

Differences, none of which changes a score: every request is scored on its
own (identical windows once), where the `hf` backend reuses one forward pass
for one-token continuations of a shared context; generation always runs
`max_gen_toks` steps (static shapes) where `hf` stops once every row has hit
a stop sequence; on several hosts every process runs the same requests and
receives every result (the scores are gathered to all, process 0 reports).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import jax
import tokenizers
from absl import logging
from flax import nnx
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
  handle_stop_sequences,
  has_bos_prefix,
  normalize_gen_kwargs,
  postprocess_generated_text,
)

from bitnet_jax.data.tokenizer import load_tokenizer
from bitnet_jax.distributed import sharding
from bitnet_jax.evaluation.scoring import Scorer, bucket_length
from bitnet_jax.model import decode
from bitnet_jax.runs import reader

MAX_GEN_TOKS = 256  # lm-eval's default `max_gen_toks` (as the hf backend)
_SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p")


def special_tokens(workdir: str, tokenizer) -> dict[str, int | None]:
  """`BitNetLM`'s `eos_token_id` / `bos_token_id` keywords for a run: its
  (imported model's) special tokens, the first of a list."""
  bos, eos = reader.special_token_ids(workdir, tokenizer)
  first = lambda ids: ids[0] if isinstance(ids, list) else ids  # noqa: E731
  return {"eos_token_id": first(eos), "bos_token_id": first(bos)}


@register_model("bitnet_jax")
class BitNetLM(TemplateLM):
  """A bitnet_jax model and tokenizer as an lm-eval language model.

  Args:
    graphdef, params: the model (`nnx.split` of a
      `bitnet_jax.model.transformer.Transformer`); the same quantized
      forward it trains
      with scores every request.
    tokenizer: its `tokenizers.Tokenizer` (the run's tokenizer.json).
    mesh: the (data, fsdp) mesh rows are sharded over.
    max_length: the model's context in tokens (`reader.context_length`).
    eos_token_id: end of text (generation stops there; lm-eval's `eot`).
    bos_token_id: the prefix of empty contexts and rolling windows, like the
      hf backend's `prefix_token_id` (None: EOS).
    batch_size: rows per scoring or decoding call (int).
    step: the optimizer step of `params` (`transformer.bind`).
    add_bos_token: None: the tokenizer's own post-processor decides (as
      `AutoTokenizer` does); True / False: force special tokens on / off.
  """

  def __init__(self, graphdef: nnx.GraphDef, params: Any,
               tokenizer: tokenizers.Tokenizer, *, mesh: jax.sharding.Mesh,
               max_length: int, eos_token_id: int,
               bos_token_id: int | None = None, batch_size: int = 16,
               step: int = 0,
               add_bos_token: bool | None = None):
    super().__init__()
    self.graphdef, self.tokenizer = graphdef, tokenizer
    self._max_length, self.batch_size = int(max_length), int(batch_size)
    self._eos, self._bos = int(eos_token_id), bos_token_id
    self.add_bos_token = add_bos_token
    self.scorer = Scorer(graphdef, params, mesh=mesh,
                         batch_size=self.batch_size,
                         max_length=self._max_length, step=step)

  @classmethod
  def from_run(cls, workdir: str, step: int | None = None,
               batch_size: int = 16, max_length: int | None = None,
               add_bos_token: bool | None = None) -> BitNetLM:
    """Loads a run's newest (or `step`) checkpoint onto the mesh of its
    config, with its tokenizer and special tokens.

    Raises:
      ConfigError: not a run, no checkpoint (or no `step`), no tokenizer.
      CheckpointMismatchError: the checkpoint does not fit the config.
    """
    mesh = sharding.make_mesh(reader.load_run_config(workdir).mesh)
    config, graphdef, params, found = reader.load_sharded_model(
        workdir, step, mesh)
    tokenizer = load_tokenizer(reader.tokenizer_path(workdir), "--workdir")
    logging.info("evaluating checkpoint %d of %s", found, workdir)
    lm = cls(graphdef, params, tokenizer, mesh=mesh,
             max_length=max_length or reader.context_length(workdir, config),
             **special_tokens(workdir, tokenizer), batch_size=batch_size,
             step=found,
             add_bos_token=add_bos_token)
    lm.step = found
    return lm

  @classmethod
  def create_from_arg_string(cls, arg_string: str,
                             additional_config: dict | None = None
                             ) -> BitNetLM:
    """`model_args="workdir=RUN,step=N,batch_size=16"` (lm-eval's CLI)."""
    args = lm_utils.simple_parse_args_string(arg_string)
    return cls.create_from_arg_obj(args, additional_config)

  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict,
                          additional_config: dict | None = None
                          ) -> BitNetLM:
    """`from_run(**arg_dict)`; of lm-eval's extra settings only batch_size
    is used (device and the others do not apply)."""
    args = dict(arg_dict)
    batch_size = (additional_config or {}).get("batch_size")
    if batch_size not in (None, "auto") and "batch_size" not in args:
      args["batch_size"] = int(batch_size)
    return cls.from_run(**args)

  # -- tokenization, as the hf backend -------------------------------------

  @property
  def eot_token_id(self) -> int:
    return self._eos

  @property
  def prefix_token_id(self) -> int:
    return self._eos if self._bos is None else int(self._bos)

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return MAX_GEN_TOKS

  @property
  def tokenizer_name(self) -> str:
    return "bitnet_jax"

  def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                 left_truncate_len: int | None = None, **kwargs
                 ) -> list[int]:
    """Token ids of `string`; special tokens as `HFLM.tok_encode` adds them
    (none when the string already starts with the BOS text)."""
    if add_special_tokens is None:
      add_special_tokens = (True if self.add_bos_token is None
                            else self.add_bos_token)
      if has_bos_prefix(string, self.tokenizer.id_to_token(
          self.prefix_token_id)):
        add_special_tokens = False
    ids = self.tokenizer.encode(string,
                                add_special_tokens=add_special_tokens).ids
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, tokens: Sequence[int],
                 skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(list(tokens),
                                 skip_special_tokens=skip_special_tokens)

  # -- scoring ---------------------------------------------------------------

  def set_params(self, params: Any, step: int) -> None:
    """Evaluates other weights of the same model (the train loop's), of
    optimizer step `step`."""
    self.scorer.set_params(params, step)

  def _window(self, context: list[int], continuation: list[int]
              ) -> tuple[list[int], int]:
    """The hf backend's `(context + continuation)[-(max_length + 1):]` and
    the number of continuation tokens scored in it (>= 1)."""
    whole = (context or [self.prefix_token_id]) + continuation
    return whole[-(self.max_length + 1):], min(len(continuation),
                                                self.max_length)

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                            **kwargs) -> list[tuple[float, bool]]:
    """Scores (request strings, context ids, continuation ids) triples:
    (sum of the continuation's log-probabilities in nats, is_greedy)."""
    scored = [i for i, (_, _, t) in enumerate(requests) if len(t)]
    windows = [self._window(list(requests[i][1]), list(requests[i][2]))
               for i in scored]
    truncated = sum(len(c) + len(t) > self.max_length + 1
                    for _, c, t in requests)
    if truncated:
      logging.warning("%d of %d requests exceed the model's context of %d "
                      "tokens: their contexts are truncated from the left",
                      truncated, len(requests), self.max_length)
    if len(scored) < len(requests):
      logging.warning("%d of %d continuations encode to no tokens (their "
                      "tokens merge with the context's): scored (0.0, True) "
                      "(lm-eval's hf backend asserts on them)",
                      len(requests) - len(scored), len(requests))
    results = [(0.0, True)] * len(requests)
    for i, answer in zip(scored, self.scorer.score(windows)):
      results[i] = answer
    for (request, _, _), answer in zip(requests, results):
      if request is not None:
        self.cache_hook.add_partial("loglikelihood", request, answer)
    return results

  def rolling_scores(self, strings: Sequence[str]
                     ) -> list[tuple[float, int]]:
    """(log-likelihood in nats, tokens scored) of each whole string, in
    lm-eval's rolling windows of the model's context (every token predicted
    once, the first from the prefix token)."""
    windows, counts = [], []
    for string in strings:
      tokens = self.tok_encode(string)
      pairs = [lm_utils.make_disjoint_window(pair)
               for pair in lm_utils.get_rolling_token_windows(
                   token_list=tokens, prefix_token=self.prefix_token_id,
                   max_seq_len=self.max_length, context_len=1)]
      windows.extend((None, c, t) for c, t in pairs)
      counts.append((len(pairs), len(tokens)))
    scores = iter(self._loglikelihood_tokens(windows))
    return [(sum(next(scores)[0] for _ in range(n)), length)
            for n, length in counts]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False
                            ) -> list[float]:
    strings = [request.args[0] for request in requests]
    results = [score for score, _ in self.rolling_scores(strings)]
    for string, result in zip(strings, results):
      self.cache_hook.add_partial("loglikelihood_rolling", (string,), result)
    return results

  # -- generation --------------------------------------------------------------

  def generate_until(self, requests, disable_tqdm: bool = False
                     ) -> list[str]:
    """Continues each (context, gen_kwargs) request; see the module
    docstring. Raises ValueError when `max_gen_toks` leaves no room for a
    context in the model's window, naming both."""
    results: list[str | None] = [None] * len(requests)
    groups: dict[str, list[int]] = {}
    for index, request in enumerate(requests):
      key = json.dumps(request.args[1], sort_keys=True, default=str)
      groups.setdefault(key, []).append(index)
    for indices in groups.values():
      gen_kwargs = requests[indices[0]].args[1]
      kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
      until = handle_stop_sequences(
          kwargs.pop("until", None), eos=self.tok_decode(
          [self.eot_token_id], skip_special_tokens=False))
      max_gen_toks = int(kwargs.pop("max_gen_toks"))
      max_context = self.max_length - max_gen_toks
      if max_context <= 0:
        raise ValueError(
            f"max_gen_toks={max_gen_toks} leaves no room for a context in "
            f"the model's {self.max_length} tokens: lower the task's "
            "generation_kwargs.max_gen_toks")
      sampling = self._sampling(kwargs)
      encoded = {i: self.tok_encode(requests[i].args[0],
                                    left_truncate_len=max_context)
                 or [self.prefix_token_id] for i in indices}
      order = sorted(indices, key=lambda i: (-len(encoded[i]),
                                             requests[i].args[0]))
      for start in range(0, len(order), self.batch_size):
        chunk = order[start:start + self.batch_size]
        texts = self._generate([encoded[i] for i in chunk], max_gen_toks,
                               sampling)
        for i, text in zip(chunk, texts):
          results[i] = postprocess_generated_text(text, until, None)
          self.cache_hook.add_partial(
              "generate_until", (requests[i].args[0], gen_kwargs), results[i])
    return results

  def _sampling(self, kwargs: dict) -> dict:
    """decode.generate's sampling arguments of normalized gen_kwargs."""
    ignored = sorted(set(kwargs) - set(_SAMPLING_KEYS))
    if ignored:
      logging.warning("bitnet_jax ignores the generation_kwargs %s", ignored)
    if not kwargs.get("do_sample"):
      return {"temperature": 0.0}
    return {"temperature": float(kwargs.get("temperature") or 1.0),
            "top_k": int(kwargs.get("top_k") or 0),
            "top_p": float(kwargs.get("top_p") or 1.0)}

  def _generate(self, prompts: list[list[int]], max_gen_toks: int,
                sampling: dict) -> list[str]:
    count = len(prompts)
    rows = prompts + [[self.prefix_token_id]] * (self.batch_size - count)
    length = bucket_length(max(map(len, rows)),
                           self.max_length - max_gen_toks)
    new = decode.generate(self.scorer.model, rows,
                          max_gen_toks, context_len=self.max_length,
                          prompt_len=length,
                          **sampling)
    texts = []
    for row in new[:count].tolist():
      if self.eot_token_id in row:
        row = row[:row.index(self.eot_token_id)]
      texts.append(self.tok_decode(row))
    return texts
