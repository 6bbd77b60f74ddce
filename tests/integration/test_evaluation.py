"""The lm-eval backend, the harness, perplexity, and the training hook.

One tiny run is trained for the module (150 steps of 64 tokens: enough to
generate newlines and names, not only spaces; stdlib_choice scored while it
trains), not the session's shared run; the local tasks are the three
of experiments/local_tasks.py (multiple choice, rolling loglikelihood,
generation with a stop sequence) on held-out stdlib code.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from bitnet_jax.config import ConfigError
from bitnet_jax.data.tokenizer import load_tokenizer
from bitnet_jax.evaluation import harness, perplexity
from bitnet_jax.evaluation.backend import BitNetLM
from bitnet_jax.model import decode
from bitnet_jax.runs import reader
from bitnet_jax.training import loop

from drivers import REPO, Driver, free_port, load_config

_SPEC = importlib.util.spec_from_file_location(
    "local_tasks", os.path.join(REPO, "experiments", "local_tasks.py"))
local_tasks = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(local_tasks)
TASKS = list(local_tasks.TASK_NAMES)
SEQ_LEN = 64


def _run_config(data_dir, **overrides):
  return load_config("configs/tiny.py", {
      "data.data_dir": data_dir, "train.seq_len": SEQ_LEN,
      "train.steps": 150, "train.eval_every": 150,
      "train.checkpoint_every": 150, "optimizer.learning_rate": 3e-3,
      **overrides})


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
  return local_tasks.write_tasks(str(tmp_path_factory.mktemp("tasks")),
                                 count=24, max_gen_toks=16)


HARNESS = {"eval.harness_tasks": "stdlib_choice", "eval.harness_every": 75,
           "eval.harness_limit": 4}


@pytest.fixture(scope="module")
def harness_run(tmp_path_factory, data_dir, task_dir):
  """The module's run: 150 steps, stdlib_choice scored during training."""
  workdir = str(tmp_path_factory.mktemp("evaluated"))
  loop.train_and_evaluate(_run_config(
      data_dir, **HARNESS, **{"eval.harness_include_path": task_dir}),
                           workdir)
  return workdir


@pytest.fixture(scope="module")
def manager(task_dir):
  return harness.task_manager(task_dir, include_defaults=False)


@pytest.fixture(scope="module")
def lm(harness_run):
  return BitNetLM.from_run(harness_run, batch_size=8)


class _Request:  # what lm-eval hands a backend: `.args`
  def __init__(self, *args):
    self.args = args


def _reference_log_probs(lm, tokens):
  """float64 log-softmax of one unpadded row through the plain forward."""
  model = lm.scorer.model
  logits = np.asarray(model(jnp.asarray([tokens[:-1]])))[0].astype(np.float64)
  logits -= logits.max(-1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return log_probs[np.arange(len(tokens) - 1), tokens[1:]], logits


def test_is_greedy_holds_exactly_for_the_argmax_continuation(lm):
  context = lm.tok_encode("def main(argv):\n    ")
  _, logits = _reference_log_probs(lm, context + [0])
  greedy_token = int(np.argmax(logits[-1]))
  other = (greedy_token + 1) % 512
  (_, is_greedy), (_, is_not) = lm._loglikelihood_tokens(
      [(None, context, [greedy_token]), (None, context, [other])])
  assert is_greedy and not is_not, "is_greedy must be argmax == continuation"


def test_an_empty_context_is_the_prefix_token(lm):
  text = "import os\n"
  (total, _), = lm.loglikelihood([_Request("", text)])
  tokens = [lm.prefix_token_id] + lm.tok_encode(text)
  expected, _ = _reference_log_probs(lm, tokens)
  assert total == pytest.approx(expected.sum(), rel=1e-5)


def test_a_continuation_of_no_tokens_scores_zero_and_true(lm):
  """lm-eval's `_encode_pair` can give no continuation tokens when the
  pair's tokens merge across the boundary ("retu" + "rn x"; the hf
  backend fails an assertion there): scored (0.0, True), the other requests
  of the call as they score alone."""
  context = lm.tok_encode("def main(argv):\n    retu")
  alone = lm._loglikelihood_tokens([(None, context, [7])])
  results = lm._loglikelihood_tokens([(None, context, []),
                                      (None, context, [7])])
  assert results[0] == (0.0, True)
  assert results[1][0] == pytest.approx(alone[0][0], rel=1e-6)


def test_a_context_longer_than_the_model_is_truncated_from_the_left(lm):
  continuation = lm.tok_encode(" return x")
  long_context = lm.tok_encode("x = 1\n" * 40)  # far over 64 tokens
  assert len(long_context) > SEQ_LEN
  kept = long_context[-(SEQ_LEN + 1 - len(continuation)):]
  (full, _), (cut, _) = lm._loglikelihood_tokens(
      [(None, long_context, continuation), (None, kept, continuation)])
  assert full == pytest.approx(cut, rel=1e-6), (
      "an over-long request must score as its last max_length + 1 tokens")


def test_rolling_windows_predict_every_token_once(lm):
  text = "def f(x):\n    return x + 1\n" * 12
  tokens = lm.tok_encode(text)
  assert len(tokens) > 2 * SEQ_LEN, "the text must need several windows"
  (total, count), = lm.rolling_scores([text])
  expected = 0.0
  for start in range(0, len(tokens), SEQ_LEN):  # the windows, by hand
    end = min(start + SEQ_LEN, len(tokens))
    window = ([lm.prefix_token_id] + tokens[:end]) if start == 0 else (
        tokens[max(end - SEQ_LEN - 1, 0):end])
    scores, _ = _reference_log_probs(lm, window)
    expected += scores[-(end - start):].sum()
  assert count == len(tokens)
  assert total == pytest.approx(expected, rel=1e-5)


def test_generation_is_greedy_decoding_cut_at_the_stop_sequence(lm):
  for prompt in ("from ", "import ", "self.", "def ", "class "):
    greedy = decode.generate(lm.scorer.model,
                             [lm.tok_encode(prompt)], 12,
                             context_len=SEQ_LEN)[0].tolist()
    text = lm.tok_decode(greedy)
    if len(text.strip()) >= 2:
      break
  assert len(text.strip()) >= 2, f"the model generates only blanks: {text!r}"
  stop = text.strip()[-2:]  # something the model really generates
  until = {"until": [stop], "max_gen_toks": 12, "do_sample": False}
  out, _ = lm.generate_until([_Request(prompt, until),  # a batch of two
                              _Request("import os\n" + prompt, until)])
  assert out == text.split(stop)[0], (out, text, stop)


def test_a_generation_budget_beyond_the_context_names_max_gen_toks(lm):
  with pytest.raises(ValueError, match="max_gen_toks=64"):
    lm.generate_until([_Request("x", {"until": ["\n"], "max_gen_toks": 64})])


def test_local_tasks_run_through_lm_eval(lm, manager):
  results = harness.evaluate(lm, TASKS, manager, bootstrap_iters=0)
  metrics = harness.flat_metrics(results)
  for key in ("stdlib_choice/acc", "stdlib_choice/acc_norm",
              "stdlib_rolling/bits_per_byte", "stdlib_complete/exact_match"):
    assert f"harness/{key}" in metrics, sorted(metrics)
  assert 0.0 <= metrics["harness/stdlib_choice/acc"] <= 1.0
  assert 0 < metrics["harness/stdlib_rolling/bits_per_byte"] < 8
  assert "stdlib_choice" in harness.table(results)


def test_perplexity_and_bits_per_byte_of_a_jsonl_corpus(lm, tmp_path):
  texts = ["def f(x):\n    return x\n", "import sys\nprint(sys.argv)\n"]
  (tmp_path / "part-0.jsonl").write_text(
      "".join(json.dumps({"body": t}) + "\n" for t in texts))
  corpus = list(perplexity.corpus_texts(
      f"jsonl:{tmp_path}/*.jsonl", text_feature="body"))
  assert corpus == texts
  figures = perplexity.perplexity(lm, iter(corpus))
  nll = tokens = 0
  for text in texts:  # each fits one window: one plain forward each
    ids = lm.tok_encode(text)
    scores, _ = _reference_log_probs(lm, [lm.prefix_token_id] + ids)
    nll, tokens = nll - scores.sum(), tokens + len(ids)
  size = sum(len(t.encode()) for t in texts)
  assert figures["tokens"] == tokens and figures["bytes"] == size
  assert figures["token_perplexity"] == pytest.approx(math.exp(nll / tokens),
                                                      rel=1e-5)
  assert figures["bits_per_byte"] == pytest.approx(
      nll / size / math.log(2), rel=1e-5)
  with pytest.raises(ConfigError, match="--perplexity"):
    next(perplexity.corpus_texts("csv:*.csv"))


def test_training_writes_harness_metrics_and_refuses_tasks_it_cannot_load(
    harness_run, data_dir, tmp_path):
  """(Which task errors there are: test_harness_and_scoring.py; an unknown
  name's needs lm-eval's whole task index, so a missing folder stands in.)"""
  records = [json.loads(line)
             for line in open(f"{harness_run}/metrics.jsonl")]
  harness_steps = [r["step"] for r in records
                   if "harness/stdlib_choice/acc" in r]
  assert harness_steps == [75, 150], (
      f"harness metrics at steps {harness_steps}, expected [75, 150]")
  events = os.listdir(f"{harness_run}/tensorboard")
  assert events, "no TensorBoard events"
  bad = {**HARNESS,
         "eval.harness_include_path": str(tmp_path / "no_such_tasks")}
  with pytest.raises(harness.TaskError,
                     match="config.eval.harness_include_path=.*no_such_tasks"):
    loop.train_and_evaluate(_run_config(data_dir, **bad),
                             str(tmp_path / "bad"))
  saved = os.listdir(tmp_path / "bad" / "checkpoints")
  assert not any(name.isdigit() for name in saved), (
      f"a run with an unknown task must stop before it trains: {saved}")


# --- the cross-check against lm-eval's own hf backend ----------------------

def _responses(results, task):
  return [sample["resps"] for sample in sorted(
      results["samples"][task], key=lambda s: s["doc_id"])]


@pytest.mark.slow
def test_scores_and_generations_equal_lm_evals_hf_backend_on_the_export(
    harness_run, lm, manager, tmp_path):
  """The run's `export-hf --format=bf16 --dtype=float32` through lm-eval's
  `hf` backend: per-request loglikelihoods to 1e-4 relative (as for the
  export's logits, an int8 rounding tie may move a request by ~1e-3: at
  least 90% must match and none by 1e-2), the same acc / acc_norm, the same
  generations."""
  os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
  import lm_eval  # pylint: disable=g-import-not-at-top

  from bitnet_jax.interop import exporter  # pylint: disable=g-import-not-at-top
  folder = exporter.export_hf(harness_run, str(tmp_path / "hf"), "bf16",
                              dtype="float32")
  ours = lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=manager,
                                 log_samples=True, bootstrap_iters=0)
  theirs = lm_eval.simple_evaluate(
      model="hf", model_args=f"pretrained={folder},dtype=float32",
      batch_size=8, device="cpu", tasks=TASKS, task_manager=manager,
      log_samples=True, bootstrap_iters=0)
  errors = []
  for task in ("stdlib_choice", "stdlib_rolling"):
    for a, b in zip(_responses(ours, task), _responses(theirs, task)):
      for x, y in zip(a, b):
        x, y = np.ravel(x[0])[0], np.ravel(y[0])[0]
        errors.append(abs(float(x) - float(y)) / max(abs(float(y)), 1e-9))
  errors = np.array(errors)
  assert len(errors) == 24 * 4 + 24
  assert np.mean(errors <= 1e-4) >= 0.9 and errors.max() < 1e-2, (
      f"loglikelihoods differ by up to {errors.max():.2e} (relative); "
      f"{np.mean(errors <= 1e-4):.0%} within 1e-4")
  for metric in ("acc,none", "acc_norm,none"):
    assert (ours["results"]["stdlib_choice"][metric]
            == theirs["results"]["stdlib_choice"][metric]), metric
  generated = _responses(ours, "stdlib_complete")
  assert generated == _responses(theirs, "stdlib_complete")
  assert any(g[0][0].strip() for g in generated), "only blank generations"
  print(f"cross-check: {len(errors)} loglikelihoods, max relative "
        f"difference {errors.max():.2e}, median {np.median(errors):.2e}")


# --- several hosts --------------------------------------------------------------

WORKER = """
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax
jax.distributed.initialize("127.0.0.1:{port}", 2, int(sys.argv[1]))
assert jax.process_count() == 2 and jax.device_count() == 8
from bitnet_jax.evaluation.backend import BitNetLM
class Request:
  def __init__(self, *args):
    self.args = args
lm = BitNetLM.from_run({workdir!r}, batch_size=8)
pairs = {pairs!r}
results = {{
    "loglikelihood": lm.loglikelihood([Request(*p) for p in pairs]),
    "rolling": lm.loglikelihood_rolling([Request(p[0] * 6) for p in pairs]),
    "generated": lm.generate_until([Request(p[0], {{"until": ["\\n"],
                                   "max_gen_toks": 8}}) for p in pairs])}}
if jax.process_index() == 0:
  with open({out!r}, "w") as f:
    json.dump(results, f)
"""

PAIRS = [("def main(argv):\n    ", "return 0"), ("import ", "os"),
         ("class Foo(object):\n    def ", "__init__(self)"),
         ("for i in range(", "10):"), ("x = [", "1, 2, 3]"),
         ("if __name__ == ", "'__main__':"), ("    return ", "None"),
         ("from . import ", "util"), ("print(", "x)"), ("with open(", "path)")]


@pytest.mark.slow
def test_two_hosts_score_like_one(lm, harness_run, tmp_path):
  """Two processes of 4 devices each (jax.distributed over loopback) load
  their shards, score their rows and all get every result: the same as this
  process's 8-device mesh."""
  out = str(tmp_path / "scores.json")
  program = WORKER.format(port=free_port(), workdir=harness_run, pairs=PAIRS,
                          out=out)
  workers = [Driver(program, str(tmp_path / f"worker{i}.log"), [i],
                   unset=["XLA_FLAGS"]) for i in range(2)]
  logs = [w.communicate(timeout=300)[0] for w in workers]
  for worker, log in zip(workers, logs):
    assert worker.returncode == 0, log[-4000:]
  with open(out) as f:
    theirs = json.load(f)
  ours = [list(x) for x in lm.loglikelihood([_Request(*p) for p in PAIRS])]
  np.testing.assert_allclose([x[0] for x in theirs["loglikelihood"]],
                             [x[0] for x in ours], rtol=1e-5)
  assert [x[1] for x in theirs["loglikelihood"]] == [x[1] for x in ours]
  np.testing.assert_allclose(theirs["rolling"], lm.loglikelihood_rolling(
      [_Request(p[0] * 6) for p in PAIRS]), rtol=1e-5)
  assert theirs["generated"] == lm.generate_until([_Request(
      p[0], {"until": ["\n"], "max_gen_toks": 8}) for p in PAIRS])


# --- the command line ---------------------------------------------------------

def _cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "bitnet_jax.evaluate", *args],
                        cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_command_line_prints_the_table_and_writes_the_json(
    harness_run, task_dir, tmp_path):
  out = tmp_path / "results.json"
  done = _cli(f"--workdir={harness_run}", f"--include_path={task_dir}",
              "--tasks=stdlib_choice,stdlib_complete", "--limit=4",
              f"--output_path={out}")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "|stdlib_choice" in done.stdout and "acc_norm" in done.stdout
  saved = json.loads(out.read_text())
  assert saved["config"]["step"] == 150 and "stdlib_complete" in (
      saved["results"])


@pytest.mark.slow
def test_command_line_perplexity_and_a_run_without_checkpoint(
    harness_run, tmp_path):
  """Also the command's one-line errors (`main` reports a ConfigError, a
  TaskError and a checkpoint mismatch alike; a TaskError's message:
  test_training_writes_harness_metrics_and_refuses_tasks_it_cannot_load)."""
  done = _cli(f"--workdir={harness_run}", "--perplexity=stdlib", "--limit=3")
  assert done.returncode == 0, done.stderr[-3000:]
  figures = json.loads(done.stdout)
  assert figures["documents"] == 3 and figures["bits_per_byte"] > 0
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text(
      open(f"{harness_run}/config.json").read())
  done = _cli(f"--workdir={empty}", "--perplexity=stdlib")
  assert done.returncode == 2 and "no checkpoint" in done.stderr, (
      done.stderr[-2000:])
  assert "Traceback" not in done.stderr


def test_a_run_trained_here_has_its_context_and_special_tokens(harness_run):
  assert reader.context_length(harness_run, reader.load_run_config(
      harness_run)) == SEQ_LEN
  tokenizer = load_tokenizer(reader.tokenizer_path(harness_run))
  bos, eos = reader.special_token_ids(harness_run, tokenizer)
  assert bos == eos == tokenizer.token_to_id("<|endoftext|>")
