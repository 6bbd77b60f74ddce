"""The batch search of `python -m bitnet_jax.compile --find_batch`
(`aot.find_batch`) on a compiler with a known memory curve.

`compile_step.compile_report` is replaced by a function of the batch size and
the remat policy, so the search is checked against the brute-force answer
without compiling. What one real TPU compile reports, the search
through it and the command line: tests/integration/test_compile.py.
"""

import jax
import pytest

from bitnet_jax.aot import compile_step, find_batch, tpu
from configs import tiny

HBM = 100_000  # bytes per chip of the fake chip
LIMIT = (1.0 - compile_step.HEADROOM) * HBM
DEVICES = 4  # v5e-4: the data axis of the mesh, sequences per step at least


def _fake_compiler(monkeypatch, per_chip_bytes):
  """Makes `compile_report` return `per_chip_bytes(batch, remat_policy)`
  (raising OutOfMemoryError above HBM, as XLA does); returns the list of
  (batch, policy) compiled."""
  compiled = []

  def report(config, topology, num_slices=1, eval_step=True):
    del topology, num_slices, eval_step
    assert config.train.grad_accum_steps == 1, "the search compiles one step"
    batch, policy = config.train.batch_size, config.model.remat_policy
    compiled.append((batch, policy))
    used = per_chip_bytes(batch, policy)
    if used > HBM:
      raise compile_step.OutOfMemoryError(f"{used} bytes > {HBM}")
    return {"per_chip_bytes": used, "hbm_bytes": HBM,
            "memory_limit_bytes": HBM, "headroom": 1.0 - used / HBM}

  monkeypatch.setattr(compile_step, "compile_report", report)
  monkeypatch.setattr(tpu, "devices",
                      lambda tpu_slice, num_slices=1: jax.devices()[:DEVICES])
  return compiled


def _config(batch_size=256, remat_policy="none"):
  config = tiny.get_config()
  config.train.batch_size = batch_size
  config.model.remat_policy = remat_policy
  return config


def _largest(per_chip_bytes, target, policy="none"):
  """The brute-force answer: the largest multiple of DEVICES that fits."""
  return max(b for b in range(DEVICES, target + 1, DEVICES)
             if per_chip_bytes(b, policy) <= LIMIT)


def test_an_affine_memory_curve_is_solved_exactly_in_three_compiles(
    monkeypatch):
  def per_chip_bytes(batch, policy):
    del policy
    return 20_000 + 700 * batch  # fixed (weights, state, code) + per sequence
  compiled = _fake_compiler(monkeypatch, per_chip_bytes)
  found = find_batch.find_batch(_config(), "v5e-4", policies=("none",))
  assert found["largest_batch_size"] == _largest(per_chip_bytes, 256), found
  assert found["compiles"] == len(compiled) == 3, (
      f"two points give the line, one compile verifies it: {compiled}")
  assert found["per_chip_bytes"] <= LIMIT
  fewest = min(k for k in range(1, 257) if 256 % k == 0 and (
      256 // k <= found["largest_batch_size"]) and (256 // k) % DEVICES == 0)
  assert found["grad_accum_steps"] == fewest, (
      f"256 sequences need {fewest} micro-batches that fit: {found}")


def test_a_curve_steeper_than_its_line_steps_down_to_a_size_that_fits(
    monkeypatch):
  def per_chip_bytes(batch, policy):
    del policy  # affine at small batches; XLA re-layouts past 40
    return 20_000 + 700 * batch + (12_000 if batch > 40 else 0)
  _fake_compiler(monkeypatch, per_chip_bytes)
  found = find_batch.find_batch(_config(), "v5e-4", policies=("none",))
  largest = found["largest_batch_size"]
  assert per_chip_bytes(largest, "none") <= LIMIT, found
  best = _largest(per_chip_bytes, 256)
  assert largest * 5 // 4 > best, (
      f"found {largest}, but {best} fits: the search stopped more than 25% "
      "short")


def test_the_target_batch_caps_the_search(monkeypatch):
  _fake_compiler(monkeypatch, lambda batch, policy: 1_000 + batch)
  found = find_batch.find_batch(_config(batch_size=32), "v5e-4",
                                policies=("none",))
  assert (found["largest_batch_size"], found["grad_accum_steps"]) == (32, 1)


def test_full_remat_is_found_when_one_sequence_per_device_fits_no_other(
    monkeypatch):
  def per_chip_bytes(batch, policy):
    return 50_000 + (5_000 if policy == "full" else 15_000) * batch
  compiled = _fake_compiler(monkeypatch, per_chip_bytes)
  found = find_batch.find_batch(_config(), "v5e-4")
  assert compiled[0] == (DEVICES, "none") and found["remat_policy"] == "full"
  assert found["largest_batch_size"] == _largest(per_chip_bytes, 256, "full")
  assert found["policies"]["none"] == {"fits": False, "compiles": 1}, found


def test_the_best_policy_is_the_fastest_estimate_not_the_largest_batch(
    monkeypatch):
  """Recomputation costs time: a policy that fits twice the batch but runs
  each sequence slower loses to the faster one (tokens/s estimated from
  each policy's largest batch)."""
  seconds_per_sequence = {"none": 1.0, "save_qkv_out": 1.1,
                          "dots_saveable": 1.2, "full": 1.4}
  per_sequence = {"none": 4_000, "save_qkv_out": 2_000,
                  "dots_saveable": 1_500, "full": 700}

  def per_chip_bytes(batch, policy):
    return 20_000 + per_sequence[policy] * batch

  _fake_compiler(monkeypatch, per_chip_bytes)
  real = compile_step.compile_report

  def with_speed(config, topology, num_slices=1, eval_step=True):
    report = real(config, topology, num_slices, eval_step)
    report["estimated_step_seconds"] = (
        seconds_per_sequence[config.model.remat_policy]
        * config.train.batch_size)
    return report
  compile_step.compile_report = with_speed  # undone by monkeypatch
  found = find_batch.find_batch(_config(), "v5e-4")
  fastest = min(seconds_per_sequence, key=seconds_per_sequence.get)
  assert found["remat_policy"] == fastest, (
      f"every policy runs at its own seconds per sequence whatever the "
      f"batch, so {fastest} is fastest; got {found['remat_policy']}: "
      f"{found['policies']}")
  assert found["policies"]["full"]["largest_batch_size"] > (
      found["largest_batch_size"]), "full remat should fit more sequences"


def test_nothing_fitting_names_the_keys_to_change(monkeypatch):
  _fake_compiler(monkeypatch, lambda batch, policy: 2 * HBM)
  with pytest.raises(compile_step.CompileError,
                     match=r"remat_policy=full.*mesh\.fsdp"):
    find_batch.find_batch(_config(), "v5e-4")
