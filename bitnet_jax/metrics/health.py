"""Collapse alarms on the eval records: silent training failures, named.

Every eval record (`metrics.summarize_eval`) is checked against the
thresholds of `config.health`; `HealthMonitor.observe` returns the names of
the alarms firing at that evaluation (stored as `record["health_alarms"]`)
and logs one WARNING the first time each fires. "Train loss" below is the
mean of the last 3 train records (nats). Defaults and the runs behind them
(tiny: `configs/tiny.py`, 500 steps, an eval every 25, seeds 0-2, recorded;
d20:cpu, recorded; tables and commands in tests/unit/test_health.py and
experiments/RESULTS.md, "Watching the model learn"; and, marked "reported"
below, figures reported for earlier BitNet b1.58 training runs (d20 scale,
a 50,257-token vocabulary) that no script here reproduces):

* `copying` -- copy_rate >= eval_accuracy, copy_rate >= `copy_rate_floor`
  (0.2) and copy_rate > top_token_share: the model predicts the token it
  sees (tied embeddings, unshifted labels). Right after initialisation every
  LM predicts one token everywhere (the unigram phase): copy_rate = accuracy
  = that token's frequency (tiny: 0.02 at step 25), copies bounded by
  top_token_share (1.0 there); a copying model's copies are not. Healthy
  tiny: copy_rate <= 0.084. Unshifted labels on tiny: 0.33 at step 75, 0.82
  at step 200 (top_token_share 0.18, 0.06).
* `vocabulary_collapse` -- unique_predictions < `min_unique_predictions`
  (12; at most vocab_size // 4). Reported: collapsed runs predicted 2-8
  tokens, healthy ones > 50 at d20 scale. Healthy tiny: 1-4 at steps
  25-125, 12-19 by step 200-250, 22-29 from step 275 (19 at step 400 in
  another recorded run); d20:cpu:
  1573 at step 0, 68 in stage 1, 229 after the stage boundary.
* `frequency_collapse` -- top_token_share > `max_top_token_share` (0.5):
  one token takes most positions (reported: spaces everywhere). Healthy
  tiny: 0.8-1.0 at steps 25-100, <= 0.27 from step 275.
* `memorization` -- eval_loss - train loss > `memorization_gap` (1.5 nats):
  repeated data. Healthy tiny: <= 0.32 nats; healthy d20:cpu: 0.85, 0.87,
  0.89 and 1.17 at steps 275, 550, 825 and 1100, growing as it trains
  (held-out files differ from the train text, < 1 epoch);
  tiny trained on 4 documents (a window repeats every ~10 steps): 1.32 at
  step 200, 1.69 at 225, 1.88 at 250, 3.2 at 500.
* `loss_too_fast` -- the train loss at a step <= `loss_too_fast_steps`
  (500) falls below `loss_too_fast_fraction` (0.45) x ln(vocab_size), the
  loss of a uniform prediction. Reported: a healthy run at 5.5 nats = 0.51 x
  ln(50257) at step 500; unshifted labels: 1.8 nats = 0.17 x at step 120.
  Healthy tiny: >= 0.67 x ln(512); unshifted labels: 0.39 x by step 175.
  Silent when the step-0 eval_loss shows pretrained weights (< 0.9 ln V).

Telling the unigram phase from a collapse: `vocabulary_collapse` and
`frequency_collapse` fire only after the grace period, max(`grace_steps`
(400), `grace_fraction` (0.1) x train.steps) (tiny recovers by step 275;
a reported 30k-step run's stage-1 collapse, 4 tokens at 3k and 2 at 4k,
fires at 4k), or once armed: the metric was unhealthy (the phase) and then
clearly healthy (2 x the unique floor, half the share limit), so a collapse
that returns is caught early. Every alarm but `loss_too_fast` must hold at
`patience` (2) consecutive evals.

On the tiny config: the 60-step smoke run (1 distinct prediction at steps 30
and 60) ends inside the grace period and raises nothing; 500 steps (seeds
0-2) raise nothing; unshifted labels raise `copying` at step 100 and
`loss_too_fast` at 175; repeated data raises `memorization` at step 250 and
`loss_too_fast` at 350.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable, Mapping, Sequence

import ml_collections
from absl import logging

_RECENT = 3  # train losses averaged (one batch of a small run is noisy)
# A fresh init's step-0 eval_loss is ~ln(vocab_size) (tiny 6.26 vs 6.24,
# d20:cpu 9.05 vs 9.01); one below this fraction of it started pretrained
# (train.init_from, imported weights), where loss_too_fast does not apply.
_FRESH_INIT = 0.9
ALARMS = ("copying", "frequency_collapse", "loss_too_fast", "memorization",
          "vocabulary_collapse")

_ADVICE = {
    "copying": "the model predicts its current input token (the tied-"
               "embedding / unshifted-label signature). Try: check the label "
               "shift (targets must be window[:, 1:], bitnet_jax.data.batch."
               "split_window) and set model.tie_embeddings=False",
    "vocabulary_collapse": "the model predicts only a handful of distinct "
                           "tokens (collapsed runs predict 2-8). Try: "
                           "optimizer.stage2_weight_decay=0, a lower "
                           "optimizer.learning_rate, train.label_smoothing "
                           "or train.entropy_weight",
    "frequency_collapse": "one token takes most predictions (e.g. a "
                          "space everywhere). Try: a lower optimizer."
                          "learning_rate, optimizer.stage2_weight_decay=0, "
                          "train.label_smoothing or train.entropy_weight",
    "memorization": "the train loss lies far below the eval loss: the model "
                    "memorizes repeated data. Try: check data repetition "
                    "with `python -m bitnet_jax.data.verify --config=...`, "
                    "more data or fewer train.steps",
    "loss_too_fast": "the train loss fell faster than a language model "
                     "learns (unshifted labels: 1.8 nats in 120 steps). "
                     "Try: check the label shift (targets must be the next "
                     "token) and that train data does not repeat or leak "
                     "eval data",
}


class HealthAlarmError(RuntimeError):
  """Raised by the training loop when an alarm fires and
  `config.health.halt_on_alarm` is True; the message is
  `HealthMonitor.message(alarms)`."""


class HealthMonitor:
  """Watches the metric records of one run for the collapse modes.

  Args:
    health: `config.health` (thresholds, see the module docstring).
    vocab_size: `config.model.vocab_size` (ln of it is a uniform model's
      loss in nats).
    total_steps: `config.train.steps` (sets the grace period).
  """

  def __init__(self, health: ml_collections.ConfigDict, *, vocab_size: int,
               total_steps: int):
    self.health, self.vocab_size = health, vocab_size
    self.grace_end = max(health.grace_steps,
                         health.grace_fraction * total_steps)
    self.unique_floor = max(1, min(health.min_unique_predictions,
                                   vocab_size // 4))
    self.loss_limit = health.loss_too_fast_fraction * math.log(vocab_size)
    self.warned: set[str] = set()  # alarms whose WARNING was logged
    self.details: dict[str, str] = {}  # alarm -> its latest numbers
    self._recent = collections.deque(maxlen=_RECENT)  # last train losses
    self._early: float | None = None  # min recent mean since the last eval
    self._pretrained = False  # the step-0 eval_loss was far below ln(V)
    self._streak = dict.fromkeys(ALARMS, 0)  # consecutive evals it held
    self._dipped = {"vocabulary_collapse": False, "frequency_collapse": False}
    self._armed = dict(self._dipped)

  def observe(self, step: int, record: Mapping) -> list[str]:
    """Feeds one emitted record (in step order).

    Returns:
      [] for a train-only record (its `loss`, nats, is kept); for an eval
      record (one with "eval_loss") the sorted names of the alarms firing.
      The first firing of each alarm logs one WARNING.
    """
    return self._observe(step, record, log=True)

  def replay(self, records: Iterable[Mapping]) -> None:
    """Rebuilds the state from metrics.jsonl records on resume, silently.

    Alarms that fired then (recomputed, or listed in a record's
    `health_alarms`) count as warned and do not warn again.
    """
    for record in sorted(records, key=lambda r: r["step"]):
      fired = self._observe(record["step"], record, log=False)
      self.warned.update(fired, record.get("health_alarms") or ())

  def message(self, alarms: Sequence[str]) -> str:
    """One paragraph for `HealthAlarmError`: each alarm, its numbers, and
    what to try."""
    parts = [f"health alarm {name} ({self.details.get(name, 'no numbers')}"
             f"): {_ADVICE[name]}." for name in alarms]
    return " ".join(parts) + (" The thresholds are in config.health (see "
                              "bitnet_jax/metrics/health.py).")

  def _observe(self, step: int, record: Mapping, log: bool) -> list[str]:
    if "loss" in record:  # the cross-entropy, without the regularizers
      self._recent.append(float(record.get("nll", record["loss"])))
      if step <= self.health.loss_too_fast_steps:
        mean = sum(self._recent) / len(self._recent)
        self._early = mean if self._early is None else min(self._early, mean)
    if "eval_loss" not in record:
      return []
    if step == 0:
      self._pretrained = record["eval_loss"] < _FRESH_INIT * math.log(
          self.vocab_size)
    conditions = self._conditions(step, record)
    self._early = None
    firing = []
    for name in ALARMS:
      self._streak[name] = self._streak[name] + 1 if name in conditions else 0
      needed = 1 if name == "loss_too_fast" else self.health.patience
      if self._streak[name] >= needed:
        firing.append(name)
        self.details[name] = f"at step {step}, {conditions[name]}"
        if log and name not in self.warned:
          logging.warning("health alarm %s %s: %s.", name,
                          self.details[name], _ADVICE[name])
        if log:
          self.warned.add(name)
    return firing

  def _collapse(self, name: str, step: int, unhealthy: bool,
                healthy: bool) -> bool:
    """Tracks the unigram phase of one metric; True if `name` holds."""
    if unhealthy:
      self._dipped[name] = True
    elif healthy and self._dipped[name]:
      self._armed[name] = True  # recovered from the phase: watch it now
    return unhealthy and (self._armed[name] or step >= self.grace_end)

  def _conditions(self, step: int, r: Mapping) -> dict[str, str]:
    """The alarms whose condition holds at this eval -> their numbers."""
    h, held = self.health, {}
    copy, acc = r.get("copy_rate"), r.get("eval_accuracy")
    share = r.get("top_token_share")
    if copy is not None and acc is not None and share is not None and (
        copy >= acc and copy >= h.copy_rate_floor and copy > share):
      held["copying"] = (f"copy_rate {copy:.3f} >= eval_accuracy {acc:.3f} "
                         f"(floor {h.copy_rate_floor}, top_token_share "
                         f"{share:.3f})")
    entropy = r.get("prediction_entropy")
    entropy = "" if entropy is None else f", prediction_entropy {entropy:.2f}"
    unique = r.get("unique_predictions")
    if unique is not None and self._collapse(
        "vocabulary_collapse", step, unique < self.unique_floor,
        unique >= 2 * self.unique_floor):
      held["vocabulary_collapse"] = (
          f"unique_predictions {unique} < {self.unique_floor}{entropy}")
    if share is not None and self._collapse(
        "frequency_collapse", step, share > h.max_top_token_share,
        share <= h.max_top_token_share / 2):
      held["frequency_collapse"] = (
          f"top_token_share {share:.3f} > {h.max_top_token_share}{entropy}")
    if self._recent:
      train = sum(self._recent) / len(self._recent)
      gap = r["eval_loss"] - train
      if gap > h.memorization_gap:
        held["memorization"] = (
            f"eval_loss {r['eval_loss']:.3f} nats is {gap:.2f} above the "
            f"recent train loss {train:.3f} (limit {h.memorization_gap})")
    if self._early is not None and self._early < self.loss_limit and (
        not self._pretrained):
      held["loss_too_fast"] = (
          f"train loss {self._early:.3f} nats (mean of {_RECENT} records) < "
          f"{self.loss_limit:.3f} ({h.loss_too_fast_fraction} x "
          f"ln(vocab_size)) by step {h.loss_too_fast_steps}")
    return held
