"""A resume refuses to silently become a different run, and says why."""

from __future__ import annotations

import json
import os

import pytest

from bitnet_jax.config import ConfigError
from bitnet_jax.optim import optimizer as optimizer_lib
from bitnet_jax.runs import directory, identity
from bitnet_jax.runs.identity import RunIdentityError, read_history, start_run


def _set(config, key: str, value) -> None:
  *parents, name = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[name] = value


def _read(path) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _first_start(workdir, config) -> None:
  start_run(str(workdir), config, resuming=False, resume_step=0)


@pytest.mark.parametrize("key,value", [
    ("optimizer.learning_rate", 3e-3),
    ("train.batch_size", 16),
    ("train.seq_len", 64),
    ("data.dataset", "files:/corpus/*.txt"),
    ("model.d_model", 128),
])
def test_an_identity_change_is_refused_naming_the_key_and_both_values(
    tiny_config, tmp_path, key, value):
  _first_start(tmp_path, tiny_config)
  old = tiny_config.to_dict()
  for part in key.split("."):
    old = old[part]
  resumed = tiny_config.copy_and_resolve_references()
  _set(resumed, key, value)
  with pytest.raises(RunIdentityError) as error:
    start_run(str(tmp_path), resumed, resuming=True, resume_step=30)
  line = f"config.{key}: {old!r} -> {value!r}"
  lines = [text.strip() for text in str(error.value).splitlines()]
  assert line in lines, (
      f"want the line {line!r} in the refusal:\n{error.value}")
  assert "allow_config_change=true" in str(error.value), "fix not named"


def test_run_identity_error_is_a_config_error():
  assert issubclass(RunIdentityError, ConfigError), (
      "main.py reports ConfigError cleanly; RunIdentityError must be one")


def test_a_refusal_writes_nothing(tiny_config, tmp_path):
  _first_start(tmp_path, tiny_config)
  config_before = _read(tmp_path / "config.json")
  history_before = _read(tmp_path / "config_history.jsonl")
  resumed = tiny_config.copy_and_resolve_references()
  resumed.train.batch_size = 16
  with pytest.raises(RunIdentityError):
    start_run(str(tmp_path), resumed, resuming=True, resume_step=30)
  assert _read(tmp_path / "config.json") == config_before, (
      "config.json changed on refusal")
  assert _read(tmp_path / "config_history.jsonl") == history_before, (
      "config_history.jsonl changed on refusal")


def test_allow_config_change_accepts_and_records_the_override(tiny_config,
                                                              tmp_path):
  _first_start(tmp_path, tiny_config)
  resumed = tiny_config.copy_and_resolve_references()
  resumed.optimizer.learning_rate = 3e-3
  resumed.train.allow_config_change = True
  warnings = start_run(str(tmp_path), resumed, resuming=True, resume_step=30)
  assert any("config.optimizer.learning_rate: 0.0015 -> 0.003" in w
             for w in warnings), f"override not warned: {warnings}"
  entry = read_history(str(tmp_path))[-1]
  assert entry["overrode_refusal"] is True, "override not recorded"
  assert {"key": "optimizer.learning_rate", "old": 0.0015, "new": 0.003,
          "class": "identity"} in entry["changes"], (
              f"change not recorded: {entry['changes']}")
  assert entry["start_step"] == 30, "resume step not recorded"


def test_a_train_steps_change_warns_with_both_boundaries_and_learning_rates(
    tiny_config, tmp_path):
  tiny_config.train.steps = 40
  _first_start(tmp_path, tiny_config)
  resumed = tiny_config.copy_and_resolve_references()
  resumed.train.steps = 60
  step = 30
  warnings = start_run(str(tmp_path), resumed, resuming=True,
                       resume_step=step)
  old_lr = float(optimizer_lib.learning_rate_schedule(tiny_config)(step))
  new_lr = float(optimizer_lib.learning_rate_schedule(resumed)(step))
  old_boundary = optimizer_lib.stage_boundary_step(tiny_config)
  new_boundary = optimizer_lib.stage_boundary_step(resumed)
  assert old_boundary != new_boundary and old_lr != new_lr, "weak test"
  [warning] = [w for w in warnings if "train.steps" in w]
  for part in ("40 -> 60", f"from step {old_boundary} to {new_boundary}",
               f"at step {step}", f"from {old_lr:.2e} to {new_lr:.2e}"):
    assert part in warning, f"want {part!r} in the warning: {warning}"


def test_an_eval_batches_change_warns_that_evals_are_not_comparable(
    tiny_config, tmp_path):
  _first_start(tmp_path, tiny_config)
  resumed = tiny_config.copy_and_resolve_references()
  resumed.train.eval_batches = 4
  warnings = start_run(str(tmp_path), resumed, resuming=True, resume_step=30)
  assert len(warnings) == 1 and "not comparable" in warnings[0], (
      f"want one warning about comparability, got {warnings}")


def test_resume_never_overwrites_the_first_config_json(tiny_config, tmp_path):
  _first_start(tmp_path, tiny_config)
  first = _read(tmp_path / "config.json")
  resumed = tiny_config.copy_and_resolve_references()
  resumed.train.steps = 90
  resumed.mesh.data = 2
  start_run(str(tmp_path), resumed, resuming=True, resume_step=30)
  assert _read(tmp_path / "config.json") == first, "config.json overwritten"
  assert len(read_history(str(tmp_path))) == 2, "want one entry per start"


def test_a_runtime_key_change_is_accepted_without_warnings(tiny_config,
                                                            tmp_path):
  _first_start(tmp_path, tiny_config)
  resumed = tiny_config.copy_and_resolve_references()
  resumed.mesh.data = 2
  resumed.mesh.fsdp = 4
  resumed.data.data_dir = str(tmp_path / "elsewhere")
  resumed.model.attention_implementation = "xla"
  resumed.train.lock_stale_seconds = 60.0
  warnings = start_run(str(tmp_path), resumed, resuming=True, resume_step=30)
  assert warnings == [], f"runtime keys must not warn: {warnings}"


def test_a_key_present_on_one_side_only_is_refused(tiny_config, tmp_path):
  _first_start(tmp_path, tiny_config)
  resumed = tiny_config.copy_and_resolve_references()
  resumed.model.new_field = 7  # a field added to the config since
  with pytest.raises(RunIdentityError,
                     match=r"config\.model\.new_field: <absent> -> 7"):
    start_run(str(tmp_path), resumed, resuming=True, resume_step=30)


def test_a_key_added_since_at_its_default_is_no_change(tiny_config,
                                                        tmp_path):
  """A run started before `model.n_kv_heads` existed resumes unchanged."""
  _first_start(tmp_path, tiny_config)
  path = tmp_path / directory.CONFIG_JSON
  old = json.loads(_read(path))
  del old["model"]["n_kv_heads"]  # as written before the key existed
  path.write_text(json.dumps(old))
  assert start_run(str(tmp_path), tiny_config, resuming=True,
                   resume_step=30) == []
  changed = tiny_config.copy_and_resolve_references()
  changed.model.n_kv_heads = 1  # not the default: a different model
  with pytest.raises(RunIdentityError, match=r"model\.n_kv_heads"):
    start_run(str(tmp_path), changed, resuming=True, resume_step=30)


def test_a_new_run_overwrites_config_json_with_a_warning(tiny_config,
                                                         tmp_path):
  _first_start(tmp_path, tiny_config)
  other = tiny_config.copy_and_resolve_references()
  other.train.batch_size = 16
  warnings = start_run(str(tmp_path), other, resuming=False, resume_step=0)
  saved = json.loads(_read(tmp_path / "config.json"))
  assert saved["train"]["batch_size"] == 16, "new run kept the old config"
  assert len(warnings) == 1 and "no checkpoint" in warnings[0], (
      f"want one warning that no checkpoint existed, got {warnings}")


def test_a_resume_without_config_json_takes_this_config(tiny_config,
                                                        tmp_path):
  warnings = start_run(str(tmp_path), tiny_config, resuming=True,
                       resume_step=30)
  saved = json.loads(_read(tmp_path / "config.json"))
  assert saved == json.loads(tiny_config.to_json_best_effort()), (
      "config.json not written from the current config")
  assert len(warnings) == 1 and "config.json is missing" in warnings[0], (
      f"want one warning that config.json was missing, got {warnings}")


def test_a_half_written_history_line_is_skipped(tiny_config, tmp_path):
  _first_start(tmp_path, tiny_config)
  with open(tmp_path / "config_history.jsonl", "a") as f:
    f.write('{"time": "2024-01-01T00:00:00+00:00", "conf')  # a crash
  start_run(str(tmp_path), tiny_config, resuming=True, resume_step=30)
  steps = [entry["start_step"] for entry in read_history(str(tmp_path))]
  assert steps == [0, 30], f"want the two complete starts, got {steps}"


def _tokenizer(path, vocab: dict) -> str:
  with open(path, "w") as f:
    json.dump({"version": "1.0", "model": {"vocab": vocab}}, f)
  return str(path)


def test_the_first_start_copies_the_tokenizer_into_the_workdir(tmp_path):
  source = _tokenizer(tmp_path / "bpe.json", {"a": 0})
  identity.check_tokenizer(str(tmp_path / "run"), source, False,
                           resuming=False)
  assert _read(tmp_path / "run" / "tokenizer.json") == _read(source), (
      "WORKDIR/tokenizer.json is not a copy of the run's tokenizer")


def test_a_deleted_tokenizer_of_a_resumed_run_is_refused_or_accepted(
    tmp_path):
  """Checkpoints but no WORKDIR/tokenizer.json: nothing to check against,
  so refused naming the file and the key; accepted (and copied) with
  allow_config_change."""
  workdir = str(tmp_path / "run")
  source = _tokenizer(tmp_path / "bpe.json", {"a": 0})
  with pytest.raises(RunIdentityError) as error:
    identity.check_tokenizer(workdir, source, False, resuming=True)
  saved = os.path.join(workdir, "tokenizer.json")
  for named in (saved, "allow_config_change"):
    assert named in str(error.value), f"{named} not named: {error.value}"
  assert not os.path.exists(saved), "a refused start wrote the tokenizer"
  warnings = identity.check_tokenizer(workdir, source, True, resuming=True)
  assert warnings and "missing" in warnings[0], warnings
  assert _read(saved) == _read(source), "the accepted tokenizer not copied"


def test_a_changed_tokenizer_is_refused_naming_both_paths(tmp_path):
  workdir = str(tmp_path / "run")
  first = _tokenizer(tmp_path / "bpe-a.json", {"a": 0})
  identity.check_tokenizer(workdir, first, False, resuming=False)
  second = _tokenizer(tmp_path / "bpe-b.json", {"b": 0})
  with pytest.raises(RunIdentityError) as error:
    identity.check_tokenizer(workdir, second, False)
  for path in (second, os.path.join(workdir, "tokenizer.json")):
    assert path in str(error.value), f"{path} not named: {error.value}"


def test_a_reformatted_identical_tokenizer_is_accepted(tmp_path):
  workdir = str(tmp_path / "run")
  first = _tokenizer(tmp_path / "bpe.json", {"a": 0})
  identity.check_tokenizer(workdir, first, False, resuming=False)
  with open(tmp_path / "pretty.json", "w") as f:
    json.dump(json.loads(_read(first)), f, indent=2)
  warnings = identity.check_tokenizer(
      workdir, str(tmp_path / "pretty.json"), False)
  assert warnings == [], f"same tokenizer content must pass: {warnings}"


def test_allow_change_accepts_a_changed_tokenizer_and_keeps_the_copy(
    tmp_path):
  workdir = str(tmp_path / "run")
  first = _tokenizer(tmp_path / "bpe-a.json", {"a": 0})
  identity.check_tokenizer(workdir, first, False, resuming=False)
  second = _tokenizer(tmp_path / "bpe-b.json", {"b": 0})
  warnings = identity.check_tokenizer(workdir, second, True)
  assert len(warnings) == 1 and second in warnings[0], (
      f"want one warning naming {second}, got {warnings}")
  assert _read(os.path.join(workdir, "tokenizer.json")) == _read(first), (
      "the run's tokenizer copy was replaced on resume")


def test_a_new_run_replaces_a_different_tokenizer_copy(tmp_path):
  workdir = str(tmp_path / "run")
  identity.check_tokenizer(
      workdir, _tokenizer(tmp_path / "bpe-a.json", {"a": 0}), False,
      resuming=False)
  second = _tokenizer(tmp_path / "bpe-b.json", {"b": 0})
  identity.check_tokenizer(workdir, second, False, resuming=False)
  assert _read(os.path.join(workdir, "tokenizer.json")) == _read(second), (
      "a new run (no checkpoint) must take its own tokenizer")


# Key classes come from the field table (bitnet_jax.config.defaults.FIELDS).

# What a resume may change, key by key: a line moved between these sets (or
# out of them, to IDENTITY) changes which resumes are refused, so update it
# only with the reason in the table's comment.
_RUNTIME = {
    "data.data_dir", "data.prefetch_buffer_size", "model.scan_layers",
    "model.attention_implementation", "model.remat_policy",
    "model.bitlinear_matmul", "train.loss_chunk_size",
    "train.grad_accum_steps", "train.allow_config_change",
    "train.start_over_if_unrestorable",
    "train.lock_stale_seconds", "train.storage_timeout_seconds",
    "train.init_from", "eval.harness_batch_size"}
_SCHEDULE = {
    "train.steps", "train.log_every", "train.eval_every",
    "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints",
    "train.divergence_factor", "train.divergence_patience",
    "train.sample_prompts", "train.sample_prompt_tokens",
    "train.sample_new_tokens", "eval.harness_tasks", "eval.harness_every",
    "eval.harness_include_path", "eval.harness_num_fewshot",
    "eval.harness_limit"}
_RUNTIME_SECTIONS = ("mesh.", "distributed.", "health.")


def test_every_default_key_keeps_its_resume_class(tiny_config):
  keys = identity.flatten(identity.config_dict(tiny_config))
  for key in keys:
    want = (identity.RUNTIME if key in _RUNTIME
            or key.startswith(_RUNTIME_SECTIONS) else identity.SCHEDULE
            if key in _SCHEDULE else identity.IDENTITY)
    assert identity.key_class(key) == want, (
        f"config.{key} is {identity.key_class(key)}, want {want}")
  classes = {identity.key_class(key) for key in keys}
  assert classes == {identity.RUNTIME, identity.SCHEDULE,
                     identity.IDENTITY}, f"only {classes}: vacuous"


def test_key_class_reads_the_field_table(monkeypatch):
  field = identity.FIELDS["optimizer.b1"]
  monkeypatch.setitem(identity.FIELDS, "optimizer.b1",
                      field._replace(resume=identity.RUNTIME))
  assert identity.key_class("optimizer.b1") == identity.RUNTIME, (
      "key_class does not read the field table")


@pytest.mark.parametrize("key,want", [
    ("model.new_field", "identity"), ("train.stepz", "identity"),
    ("new_section.x", "identity"), ("mesh.tensor", "runtime"),
    ("distributed.timeout", "runtime"), ("health.new_alarm", "runtime"),
])
def test_a_key_unknown_to_the_table_is_identity_except_in_runtime_sections(
    key, want):
  assert key not in identity.FIELDS
  assert identity.key_class(key) == want


def test_runtime_prefixes_are_the_sections_without_another_class():
  assert sorted(identity.RUNTIME_PREFIXES) == sorted(_RUNTIME_SECTIONS)


# The run directory's names (bitnet_jax.runs.directory) are on disk in every
# run written so far: renaming one orphans those runs' files.
_ON_DISK = {
    "CONFIG_JSON": "config.json", "CONFIG_PY": "config.py",
    "CONFIG_HISTORY": "config_history.jsonl",
    "REPLACED_CONFIG": "config.replaced-{stamp}.json",
    "TOKENIZER_JSON": "tokenizer.json", "CHECKPOINTS": "checkpoints",
    "CHECKPOINT_STATE": "state", "DAMAGED_CHECKPOINTS": "damaged_checkpoints",
    "DAMAGED_HISTORY": "history-{time}",
    "METRICS": "metrics.jsonl", "SAMPLES": "samples.jsonl",
    "TENSORBOARD": "tensorboard", "RUN_LOCK": "run.lock",
    "HF_SOURCE": "hf_source"}


def test_the_run_directory_names_are_those_of_the_runs_on_disk():
  names = {name: value for name, value in vars(directory).items()
           if name.isupper()}
  assert names == _ON_DISK, (
      f"renamed or new: {set(names.items()) ^ set(_ON_DISK.items())}; a "
      "new name is added here too, an existing one never changes")
  assert directory.checkpoint_dir("gs://b/run", 3) == (
      "gs://b/run/checkpoints/3")
  assert directory.replaced_config_name("20240101T000000Z") == (
      "config.replaced-20240101T000000Z.json")
