"""KV-cache decoding, sampling, and the generate command's debug table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitnet_jax.evaluation import diagnose
from bitnet_jax.model import decode
from bitnet_jax.model.transformer import Transformer


def _model(tiny_config, **overrides):
  config = tiny_config.model
  config.update({"n_kv_heads": 1, **overrides})  # GQA: 2 query heads, 1 kv
  return Transformer(config, rngs=nnx.Rngs(0))


def _prompts(vocab, lengths, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab, n).tolist() for n in lengths]


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [True, False])
def test_cached_logits_equal_the_full_forward(tiny_config, scan_layers):
  model = _model(tiny_config, scan_layers=scan_layers)
  prompts = _prompts(tiny_config.model.vocab_size, (9, 4))  # row 1 padded
  new = 7
  tokens, logits = decode.generate(model, prompts, new, context_len=32,
                                   return_logits=True)
  for row, prompt in enumerate(prompts):
    sequence = jnp.asarray([prompt + tokens[row].tolist()])
    full = np.asarray(model(sequence))[0, len(prompt) - 1:-1]
    scale = np.max(np.abs(full))
    error = np.max(np.abs(logits[row] - full)) / scale
    assert error <= 1e-5, (
        f"row {row} (prompt {len(prompt)} tokens, left-padded "
        f"{9 - len(prompt)}): cached logits differ from the full forward by "
        f"{error:.2e} (relative)")


@pytest.mark.slow
def test_greedy_is_deterministic_and_the_full_forward_argmax(tiny_config):
  model = _model(tiny_config, quantization="none")
  prompt = _prompts(tiny_config.model.vocab_size, (6,), seed=1)[0]
  first = decode.generate(model, [prompt], 10, context_len=32)
  second = decode.generate(model, [prompt], 10, context_len=32)
  np.testing.assert_array_equal(first, second, "greedy decoding varies")
  sequence = list(prompt)
  for i in range(10):  # token by token, no cache
    expected = int(jnp.argmax(model(jnp.asarray([sequence]))[0, -1]))
    assert first[0, i] == expected, (
        f"token {i}: cached greedy gave {first[0, i]}, the full forward's "
        f"argmax is {expected}")
    sequence.append(expected)


def test_prompt_plus_new_tokens_beyond_the_context_names_the_flag(
    tiny_config):
  model = _model(tiny_config)
  with pytest.raises(ValueError, match="--max_new_tokens=30"):
    decode.generate(model, [[1, 2, 3]], 30, context_len=32)


@pytest.mark.parametrize("kwargs,flag", [
    ({"temperature": -1.0}, "--temperature"), ({"top_p": 0.0}, "--top_p"),
    ({"top_p": 1.5}, "--top_p"), ({"top_k": -2}, "--top_k")])
def test_invalid_sampling_settings_name_their_flag(tiny_config, kwargs,
                                                   flag):
  model = _model(tiny_config)
  with pytest.raises(ValueError, match=flag):
    decode.generate(model, [[1, 2, 3]], 4, context_len=32, **kwargs)


def test_a_prompt_longer_than_the_context_names_the_prompt(tiny_config):
  model = _model(tiny_config)
  with pytest.raises(ValueError, match="shorten --prompt"):
    decode.generate(model, [list(range(40))], 1, context_len=32)


def test_top_k_1_and_a_tiny_nucleus_are_greedy():
  logits = jax.random.normal(jax.random.key(0), (64, 50))
  greedy = np.asarray(jnp.argmax(logits, -1))
  for kwargs in ({"top_k": 1}, {"top_p": 1e-6}):
    drawn = decode.sample_logits(logits, jax.random.key(1), temperature=1.0,
                                 **kwargs)
    np.testing.assert_array_equal(drawn, greedy,
                                  f"{kwargs}: not the argmax")


def test_sampling_stays_in_the_top_k_and_follows_the_seed():
  logits = jax.random.normal(jax.random.key(0), (256, 50))
  top5 = np.asarray(jax.lax.top_k(logits, 5)[1])
  drawn = np.asarray(decode.sample_logits(
      logits, jax.random.key(3), temperature=1.0, top_k=5))
  assert all(d in row for d, row in zip(drawn, top5)), "drew outside top 5"
  assert len(set(drawn.tolist())) > 5, "top-k 5 sampling looks greedy"
  again = decode.sample_logits(logits, jax.random.key(3), temperature=1.0,
                               top_k=5)
  np.testing.assert_array_equal(drawn, again, "same seed, other tokens")


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
  probs = jnp.array([[0.5, 0.3, 0.15, 0.05]])
  logits = jnp.log(probs)
  draws = {int(decode.sample_logits(logits, jax.random.key(s),
                                    temperature=1.0, top_p=0.7)[0])
           for s in range(200)}
  assert draws == {0, 1}, f"top_p 0.7 of {probs}: drew {draws}, want {{0, 1}}"


class _Chars:
  """A tokenizer stand-in: token t decodes to chr(97 + t)."""

  def decode(self, ids):
    return "".join(chr(97 + i) for i in ids)


def test_debug_table_marks_copies_and_hits():
  class Copier:
    def __call__(self, tokens, **_):  # predicts the input token
      return 10.0 * jax.nn.one_hot(tokens, 8)

  tokens = [1, 1, 2, 3, 3, 3]  # next == input at positions 0, 3, 4
  table, summary = diagnose.debug_table(Copier(), tokens, _Chars())
  assert summary["copy_rate"] == 1.0, summary
  assert summary["accuracy"] == pytest.approx(3 / 5), summary
  rows = table.splitlines()[1:-1]
  hits = [i for i, row in enumerate(rows) if "hit" in row]
  assert hits == [0, 3, 4], f"hit marks at {hits}:\n{table}"
  assert all("copy" in row for row in rows), table
