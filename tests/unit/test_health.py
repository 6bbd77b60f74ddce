"""Tests of the collapse alarms (bitnet_jax/metrics/health.py) on recorded metrics.

The trajectories below are metrics.jsonl records, rounded. Eval rows are
(step, eval_loss nats, eval_accuracy, unique_predictions, copy_rate,
top_token_share); TRAIN_* are the train losses (nats) of the records that
carry one, in step order (every log_every steps, and at every eval but 0).

TINY: recorded healthy run, seed 0 (three seeds behave alike):
  python -m bitnet_jax.main --config=configs/tiny.py --workdir=/tmp/health_tiny
    --config.train.steps=500 --config.train.eval_every=25
    --config.train.checkpoint_every=500 --config.train.sample_prompts=0
COPY: the same tiny config, 200 steps, with the seeds' copy bug
  (`bitnet_jax.data.batch.split_window` monkeypatched to return
  `(window[:, :-1], window[:, :-1])`, train and eval), through
  `train.train_and_evaluate`.
TINY_60: configs/tiny.py as it is (60 steps, evals at 0, 30, 60).
MEMORIZED: tiny, 500 steps, trained on 4 short documents
  (`drivers.stream_config(config, dir, "jsonl", n_files=2, n_docs=4)`), so
  each window repeats every ~10 steps.
D20_CPU: see its comment.
"""

from unittest import mock

import pytest

from bitnet_jax.config import ConfigError, base_config, validate
from bitnet_jax.metrics import health

TINY = [
    (0, 6.259, 0.0, 128, 0.002, 0.082), (25, 5.522, 0.0215, 1, 0.0215, 1.0),
    (50, 5.346, 0.0449, 2, 0.0527, 0.854),
    (75, 5.236, 0.0469, 2, 0.0605, 0.879),
    (100, 5.243, 0.0391, 4, 0.043, 0.811),
    (125, 5.189, 0.0488, 4, 0.0586, 0.51),
    (150, 5.133, 0.0449, 7, 0.0625, 0.479),
    (175, 5.078, 0.0371, 15, 0.0176, 0.301),
    (200, 4.966, 0.0527, 12, 0.0215, 0.303),
    (225, 4.915, 0.0664, 17, 0.0488, 0.234),
    (250, 4.835, 0.0684, 19, 0.0234, 0.215),
    (275, 4.806, 0.084, 24, 0.0215, 0.17),
    (300, 4.758, 0.0938, 23, 0.0137, 0.232),
    (325, 4.707, 0.1016, 26, 0.0254, 0.27),
    (350, 4.677, 0.1016, 27, 0.0352, 0.156),
    (375, 4.661, 0.0996, 25, 0.041, 0.145),
    (400, 4.639, 0.1133, 28, 0.0527, 0.16),
    (425, 4.628, 0.1172, 27, 0.0684, 0.135),
    (450, 4.621, 0.1113, 26, 0.0586, 0.145),
    (475, 4.612, 0.1133, 28, 0.0684, 0.162),
    (500, 4.61, 0.1133, 28, 0.0664, 0.16),
]
TRAIN_TINY = """6.12 5.71 5.46 5.49 5.34 5.38 5.25 5.18 5.11 5.24 5.18 5.17 5.10
5.11 5.28 5.25 5.25 4.97 5.03 5.01 5.00 4.81 4.80 5.21 5.05 4.76 4.80 4.66 4.72
4.87 4.63 4.76 4.50 4.66 4.47 4.36 4.67 4.58 4.69 4.55 4.23 4.69 4.44 4.49 4.57
4.73 4.49 4.41 4.61 4.67 4.69 4.50 4.37 4.77 4.56 4.39 4.49 4.51 4.51 4.47"""
TINY_60 = [(0, 6.259, 0.0, 128, 0.002, 0.082),
           (30, 5.492, 0.0215, 1, 0.0215, 1.0),
           (60, 5.4, 0.0215, 1, 0.0215, 1.0)]
TRAIN_TINY_60 = "6.12 5.73 5.53 5.39 5.45 5.28"
COPY = [
    (0, 6.255, 0.002, 128, 0.002, 0.082),
    (25, 5.477, 0.0625, 3, 0.0625, 0.664),
    (50, 4.877, 0.1953, 14, 0.1953, 0.27),
    (75, 4.046, 0.3281, 41, 0.3281, 0.184),
    (100, 3.326, 0.5449, 76, 0.5449, 0.094),
    (125, 2.918, 0.6621, 87, 0.6621, 0.072),
    (150, 2.638, 0.7227, 97, 0.7227, 0.072),
    (175, 2.463, 0.7695, 98, 0.7695, 0.064),
    (200, 2.395, 0.8223, 110, 0.8223, 0.061),
]
TRAIN_COPY = """6.08 5.68 5.43 5.39 5.09 4.92 4.47 4.23 3.91 3.98 3.66 3.43 3.12
3.00 3.17 2.97 2.92 2.71 2.60 2.52 2.46 2.38 2.54 2.77"""
MEMORIZED = [
    (0, 6.262, 0.0, 129, 0.002, 0.088), (25, 5.548, 0.0156, 4, 0.0156, 0.561),
    (50, 5.424, 0.0293, 3, 0.0312, 0.748), (75, 5.37, 0.0332, 7, 0.043, 0.461),
    (100, 5.289, 0.0664, 11, 0.0918, 0.346),
    (125, 5.342, 0.0801, 27, 0.0996, 0.24),
    (150, 5.281, 0.0723, 21, 0.0938, 0.184),
    (175, 5.189, 0.0859, 39, 0.0664, 0.213),
    (200, 5.254, 0.0859, 49, 0.0547, 0.193),
    (225, 5.252, 0.0898, 55, 0.0586, 0.17),
    (250, 5.252, 0.0996, 68, 0.0684, 0.137),
    (275, 5.251, 0.1074, 73, 0.0293, 0.117),
    (300, 5.331, 0.0957, 75, 0.043, 0.135),
    (325, 5.306, 0.1152, 73, 0.0332, 0.115),
    (350, 5.361, 0.0957, 83, 0.041, 0.125),
    (375, 5.42, 0.0898, 75, 0.043, 0.119),
    (400, 5.451, 0.0938, 79, 0.0293, 0.123),
    (425, 5.422, 0.0996, 81, 0.0332, 0.117),
    (450, 5.438, 0.0898, 87, 0.0371, 0.098),
    (475, 5.434, 0.0859, 84, 0.0293, 0.098),
    (500, 5.449, 0.0898, 87, 0.0273, 0.102),
]
TRAIN_MEMORIZED = """6.13 5.71 5.46 5.42 5.20 5.16 5.08 5.09 5.08 5.08 4.83 4.84
4.71 4.58 4.37 4.48 4.43 4.25 4.21 4.07 3.95 4.14 3.89 3.76 3.74 3.42 3.52 3.46
3.41 3.26 3.27 3.31 2.93 2.88 2.79 2.78 2.93 2.87 2.75 2.76 2.62 2.57 2.44 2.72
2.34 2.41 2.83 2.31 2.60 2.52 2.58 2.42 2.44 2.45 2.20 2.35 2.46 2.30 2.30
2.24"""
# D20_CPU: recorded (nll of the train records; it resumed at step 701 after
# a SIGINT, with these health defaults):
#   python -m bitnet_jax.main --config=configs/d20.py:cpu --workdir=runs/d20_cpu
# unique_predictions 1578 -> 69 in stage 1 -> 236, 240 after the boundary
# (the run: 1573 -> 68 -> 229).
D20_CPU = [
    (0, 9.054, 0.0, 1578, 0.0, 0.0149),
    (275, 5.772, 0.1279, 69, 0.0305, 0.1372),
    (550, 5.265, 0.1639, 166, 0.0034, 0.1041),
    (825, 4.865, 0.226, 236, 0.0126, 0.0729),
    (1100, 4.754, 0.2361, 240, 0.0151, 0.067),
]
TRAIN_D20_CPU = """8.47 7.68 6.83 6.58 6.15 6.09 5.39 5.66 5.33 4.79 4.65 4.93 5.34 4.56 4.20
4.65 4.77 4.46 4.55 4.39 4.52 4.29 4.33 4.03 3.69 4.37 3.98 3.88 4.25 4.31
4.01 4.29 3.63 4.13 3.64 3.67 3.97 3.74 3.93 3.70 3.97 3.79 3.58 3.37"""


def records(evals, train: str, log_every: int = 10):
  """metrics.jsonl records: train losses at the log and eval steps (not 0)
  merged into the eval records of the same step, in step order."""
  eval_steps = [row[0] for row in evals]
  train_steps = sorted(set(range(log_every, eval_steps[-1] + 1, log_every))
                       | set(eval_steps[1:]))
  losses = [float(x) for x in train.split()]
  assert len(losses) == len(train_steps), (len(losses), len(train_steps))
  out = {s: {"step": s, "loss": loss} for s, loss in zip(train_steps, losses)}
  for step, eval_loss, accuracy, unique, copy, share in evals:
    out.setdefault(step, {"step": step}).update(
        eval_loss=eval_loss, eval_accuracy=accuracy,
        unique_predictions=unique, copy_rate=copy, top_token_share=share)
  return [out[s] for s in sorted(out)]


def upto(recs, step):
  return [r for r in recs if r["step"] <= step]


def run(recs, total_steps, vocab_size=512, monitor=None):
  """Feeds `recs` to `monitor` (default: a new one with the default
  thresholds); returns ({eval step: alarms}, the mocked WARNING)."""
  if monitor is None:
    monitor = health.HealthMonitor(base_config().health,
                                   vocab_size=vocab_size,
                                   total_steps=total_steps)
  with mock.patch.object(health.logging, "warning") as warning:
    fired = {}
    for r in recs:
      alarms = monitor.observe(r["step"], r)
      if "eval_loss" in r:
        fired[r["step"]] = alarms
      else:
        assert alarms == [], f"a train record raised {alarms}"
  return fired, warning


def first(fired, alarm):
  """The first eval step at which `alarm` fires, None if it never does."""
  return next((s for s, names in sorted(fired.items()) if alarm in names),
              None)


def warned(warning, alarm):
  """How many WARNING calls name `alarm`."""
  return sum(alarm in str(call) for call in warning.call_args_list)


def test_tiny_trajectory_holds_a_unigram_phase():
  floor = base_config().health.min_unique_predictions
  early = [row for row in TINY if 0 < row[0] <= 150]
  assert all(row[3] < floor and row[5] > 0.45 for row in early), (
      "the recorded tiny run no longer shows the unigram phase the alarms "
      f"must tolerate: {early}")


@pytest.mark.parametrize("name,recs,total", [
    ("tiny", records(TINY, TRAIN_TINY), 500),
    ("tiny_60", records(TINY_60, TRAIN_TINY_60), 60),
    ("d20_cpu", records(D20_CPU, TRAIN_D20_CPU, log_every=25), 1100)])
def test_silent_on_healthy_trajectory(name, recs, total):
  vocab = 8192 if name == "d20_cpu" else 512
  fired, warning = run(recs, total, vocab_size=vocab)
  noisy = {step: names for step, names in fired.items() if names}
  assert not noisy, f"alarms on the healthy {name} run: {noisy}"
  assert not warning.called, f"WARNINGs on the healthy {name} run"


def test_copying_fires_on_unshifted_labels_and_warns_once():
  fired, warning = run(records(COPY, TRAIN_COPY), 200)
  assert first(fired, "copying") == 100, (
      f"copying should fire at step 100 (copy_rate 0.33, 0.54 at 75, 100 = "
      f"patience 2): {fired}")
  assert all("copying" in fired[s] for s in (125, 150, 175, 200)), fired
  assert warned(warning, "copying") == 1, warning.call_args_list


def test_copying_silent_while_one_token_is_predicted_everywhere():
  # unigram phase with a frequent top token: copies = its frequency (0.25)
  recs = [{"step": s, "eval_loss": 5.0, "eval_accuracy": 0.25,
           "unique_predictions": 1, "copy_rate": 0.25,
           "top_token_share": 1.0} for s in (25, 50, 75)]
  fired, _ = run(recs, 10000)
  assert first(fired, "copying") is None, (
      f"copies bounded by top_token_share raised copying: {fired}")


def _evals(rows, total, vocab_size=512):
  """`run` on eval records (step, unique_predictions, top_token_share)."""
  recs = [{"step": s, "eval_loss": 5.0, "eval_accuracy": 0.1,
           "unique_predictions": u, "copy_rate": 0.03,
           "top_token_share": share} for s, u, share in rows]
  return run(recs, total, vocab_size=vocab_size)


def test_vocabulary_collapse_fires_when_the_phase_persists():
  # seeds (003/004 notes): 20 -> 19 -> 9 -> 4 -> 2 -> 2 tokens, 30k steps
  rows = [(1, 20, 0.3), (1000, 19, 0.3), (2000, 9, 0.3), (3000, 4, 0.3),
          (4000, 2, 0.4), (5000, 2, 0.4), (7000, 2, 0.4)]
  fired, warning = _evals(rows, 30000, vocab_size=50257)
  assert first(fired, "vocabulary_collapse") == 4000, (
      f"a collapse persisting past the grace period (3000 steps) must fire "
      f"after patience 2: {fired}")
  assert warned(warning, "vocabulary_collapse") == 1, warning.call_args_list


def test_vocabulary_collapse_fires_when_it_returns_within_grace():
  recs = upto(records(TINY, TRAIN_TINY), 300)
  collapse = [{"step": s, "eval_loss": 4.7, "eval_accuracy": 0.06,
               "unique_predictions": 5, "copy_rate": 0.02,
               "top_token_share": 0.3} for s in (325, 350)]
  fired, _ = run(recs + collapse, 500)
  assert first(fired, "vocabulary_collapse") == 350, (
      f"after recovering to 24 unique at step 275 the drop to 5 must fire "
      f"before the grace period ends (400): {fired}")
  alone, _ = run(collapse, 500)
  assert not alone[350], "without the recovery the drop is the unigram phase"


def test_frequency_collapse_fires_when_one_token_takes_over():
  recs = records(TINY, TRAIN_TINY)
  for r in recs:
    if r["step"] >= 425 and "eval_loss" in r:
      r["top_token_share"] = 0.7
  fired, warning = run(recs, 500)
  assert first(fired, "frequency_collapse") == 450, fired
  assert fired[500] == ["frequency_collapse"], fired
  assert warned(warning, "frequency_collapse") == 1, warning.call_args_list


def test_collapse_alarms_need_patience():
  rows = [(25, 1, 1.0), (500, 5, 0.8), (525, 30, 0.2), (550, 5, 0.8)]
  fired, _ = _evals(rows, 1000)
  assert not any(fired.values()), f"single-eval dips fired: {fired}"


def test_memorization_fires_on_repeated_data_and_warns_once():
  fired, warning = run(records(MEMORIZED, TRAIN_MEMORIZED), 500)
  assert first(fired, "memorization") == 250, (
      f"eval - recent train loss 1.69 / 1.88 nats at steps 225 / 250 "
      f"(patience 2): {fired}")
  assert warned(warning, "memorization") == 1, warning.call_args_list


def test_loss_too_fast_fires_on_the_copy_bugs():
  fired, warning = run(records(COPY, TRAIN_COPY), 200)
  assert first(fired, "loss_too_fast") == 175, (
      f"tiny copy bug: 2.60, 2.52, 2.46 < 0.45 ln 512 = 2.81: {fired}")
  assert warned(warning, "loss_too_fast") == 1, warning.call_args_list
  # seeds (002 notes): 10.27 at step 10 ... 2.81 at 100, 1.80 at 120
  seeds = [{"step": s, "loss": loss} for s, loss in (
      (10, 10.27), (20, 9.52), (30, 8.67), (40, 7.29), (50, 6.29), (100, 2.81))]
  seeds += [{"step": 120, "loss": 1.80, "eval_loss": 1.9, "eval_accuracy": .5,
             "unique_predictions": 900, "copy_rate": .0, "top_token_share": .1}]
  fired, _ = run(seeds, 20000, vocab_size=50257)
  assert fired[120] == ["loss_too_fast"], (
      f"mean of 6.29, 2.81, 1.80 < 0.45 ln 50257 = 4.87: {fired}")


def test_loss_too_fast_silent_on_the_seeds_fixed_run():
  curve = ((10, 10.5), (100, 8.5), (500, 5.5), (1000, 4.0), (2000, 3.5),
           (5000, 3.0), (10000, 2.7))
  recs = [{"step": s, "loss": loss, "eval_loss": loss + 0.2,
           "eval_accuracy": 0.3, "unique_predictions": 900, "copy_rate": 0.05,
           "top_token_share": 0.1} for s, loss in curve]
  fired, _ = run(recs, 20000, vocab_size=50257)
  assert not any(fired.values()), f"the seeds' healthy curve fired: {fired}"


def test_loss_too_fast_silent_after_a_pretrained_start():
  def start(eval_loss):  # step-0 eval, then a fine-tuning loss of ~2.4 nats
    recs = [{"step": 0, "eval_loss": eval_loss, "eval_accuracy": 0.4,
             "unique_predictions": 900, "copy_rate": 0.05,
             "top_token_share": 0.1}]
    recs += [{"step": s, "loss": 2.4} for s in (10, 20)]
    recs += [dict(recs[0], step=30, loss=2.4, eval_loss=2.5)]
    fired, _ = run(recs, 1000, vocab_size=50257)
    return fired[30]
  assert start(eval_loss=10.9) == ["loss_too_fast"], "from scratch: fires"
  assert start(eval_loss=2.5) == [], (
      "a step-0 eval_loss of 2.5 nats (pretrained weights) explains a low "
      "loss at step 30")


def _monitor(total=500):
  return health.HealthMonitor(base_config().health, vocab_size=512,
                              total_steps=total)


def test_replay_does_not_warn_again():
  recs = records(COPY, TRAIN_COPY)
  done = [r for r in recs if r["step"] <= 125]
  monitor = _monitor(200)
  with mock.patch.object(health.logging, "warning") as warning:
    monitor.replay(done)
  assert not warning.called, "replay must not log"
  fired, warning = run([r for r in recs if r["step"] > 125], 200,
                       monitor=monitor)
  assert "copying" in fired[150], f"the streak was lost on replay: {fired}"
  assert warned(warning, "copying") == 0, "copying warned again after resume"


def test_replay_keeps_the_armed_state():
  done = upto(records(TINY, TRAIN_TINY), 300)
  monitor = _monitor()
  monitor.replay(done)
  collapse = [{"step": s, "eval_loss": 4.7, "eval_accuracy": 0.06,
               "unique_predictions": 5, "copy_rate": 0.02,
               "top_token_share": 0.3} for s in (325, 350)]
  fired, warning = run(collapse, 500, monitor=monitor)
  assert fired[350] == ["vocabulary_collapse"], (
      f"the recovery before the resume (armed) was forgotten: {fired}")
  assert warned(warning, "vocabulary_collapse") == 1


def test_replay_honours_recorded_alarms():
  monitor = _monitor()
  monitor.replay([{"step": 300, "loss": 4.0, "eval_loss": 4.1,
                   "eval_accuracy": 0.1, "unique_predictions": 30,
                   "copy_rate": 0.03, "top_token_share": 0.2,
                   "health_alarms": ["memorization"]}])
  assert "memorization" in monitor.warned, monitor.warned


def test_message_names_each_alarm_its_numbers_and_the_fix():
  monitor = _monitor(200)
  run(records(COPY, TRAIN_COPY), 200, monitor=monitor)
  text = monitor.message(["copying", "loss_too_fast"])
  for part in ("copying", "copy_rate 0.822", "tie_embeddings",
               "loss_too_fast", "label shift"):
    assert part in text, f"{part!r} missing from: {text}"


@pytest.mark.parametrize("key,value", [
    ("grace_steps", -1), ("grace_fraction", 1.0), ("patience", 0),
    ("copy_rate_floor", 0.0), ("min_unique_predictions", 0),
    ("max_top_token_share", 1.0), ("memorization_gap", 0.0),
    ("loss_too_fast_fraction", -0.1), ("loss_too_fast_steps", -5)])
def test_invalid_values_name_the_key(key, value):
  config = base_config()
  config.health[key] = value
  with pytest.raises(ConfigError, match=rf"config\.health\.{key}="):
    validate(config)


def test_the_regularizers_do_not_count_as_train_loss():
  """An entropy bonus lowers `loss` below the cross-entropy (`nll`): the
  alarms compare the cross-entropy, so a healthy run stays silent."""
  healthy = records(TINY, TRAIN_TINY)
  bonus = [{**r, "nll": r["loss"], "loss": r["loss"] - 3.0}
           if "loss" in r else r for r in healthy]
  fired, _ = run(bonus, 500)
  assert not any(fired.values()), (
      f"loss 3 nats below nll (an entropy bonus) raised alarms: {fired}")
