"""Reading a run directory: its config, tokenizer and parameters.

A run directory is self-sufficient: `config.json` (written at the first
training start) or `config.py` (written by `convert import-hf` before any
training), `tokenizer.json`, and `checkpoints/<step>/`. Export and generation
read runs through this module; they need no data and no optimizer state.
"""

from __future__ import annotations

import importlib.util
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from bitnet_jax.config import ConfigError, base_config
from bitnet_jax.data.tokenizer import end_of_text_id
from bitnet_jax.distributed import sharding
from bitnet_jax.model.layout import to_layout
from bitnet_jax.model.transformer import Transformer, bind
from bitnet_jax.model.tree_paths import is_stacked
from bitnet_jax.runs import checkpoint, identity
from bitnet_jax.runs.directory import (
  CHECKPOINT_STATE,
  CHECKPOINTS,
  CONFIG_JSON,
  CONFIG_PY,
  HF_SOURCE,
  TOKENIZER_JSON,
  checkpoint_dir,
  checkpoints_dir,
)
from bitnet_jax.storage import paths


def load_config_file(path: str, key: str = "--config"
                     ) -> ml_collections.ConfigDict:
  """Loads a Python config file's `get_config()`.

  Raises:
    ConfigError: naming `key` when the file is missing or has no get_config.
  """
  spec = importlib.util.spec_from_file_location("_run_config", path)
  if spec is None or not os.path.isfile(path):
    raise ConfigError(f"{key}={path!r}: no such config file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{key}={path!r} defines no get_config()")
  return module.get_config()


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config: `config.json` (over today's defaults), else `config.py`.

  Raises:
    ConfigError: naming `--workdir` when neither exists (not a run).
  """
  saved = identity.read_saved_config(paths.join(workdir, CONFIG_JSON))
  if saved is not None:
    config = base_config()  # keys added since the run started: defaults
    config.update(saved)
    return config
  py_path = paths.join(workdir, CONFIG_PY)
  if paths.isfile(py_path):
    return load_config_file(paths.local_file(py_path), "--workdir")
  raise ConfigError(f"--workdir={workdir!r} is not a run directory: it has "
                    f"neither {CONFIG_JSON} nor {CONFIG_PY}")


def resolve_checkpoint(source: str, key: str = "train.init_from"
                       ) -> tuple[str, int]:
  """Finds the checkpoint a path names: (checkpoints directory, step).

  Args:
    source: a run directory (its newest checkpoint), its `checkpoints/`
      directory, or one step's directory `RUN/checkpoints/<step>`.
    key: the config key or flag that gave `source`, for the error message.

  Raises:
    ConfigError: naming `key` and `source` when no checkpoint is there.
  """
  path = paths.resolve(source)
  base = os.path.basename(path.rstrip("/"))
  if base.isdigit() and paths.isdir(paths.join(path, CHECKPOINT_STATE)):
    return paths.parent(path), int(base)
  for directory in (checkpoints_dir(path), path):
    steps = _steps(directory)
    if steps:
      return directory, steps[-1]
  raise ConfigError(
      f"{key}={source!r}: no checkpoint there; give a run directory (with "
      "checkpoints/<step>/state), its checkpoints/ directory or one "
      "checkpoints/<step> directory")


def load_params(source: str, abstract_params: Any,
                key: str = "train.init_from") -> tuple[Any, int]:
  """Restores only the parameters of a checkpoint, in the target shardings.

  Works on full train-state checkpoints and weights-only ones alike (the
  optimizer state is never read), so a 2B-parameter model's Adam moments are
  not loaded to fine-tune or export it. A checkpoint of the other layer
  layout (`model.scan_layers`) is read on the host and converted.

  Args:
    source: see `resolve_checkpoint`.
    abstract_params: `jax.ShapeDtypeStruct`s (with `.sharding`) of the
      parameters the config builds.
    key: the config key or flag that gave `source` (for messages).

  Returns:
    (params, step of the checkpoint read).

  Raises:
    ConfigError: no checkpoint at `source`, or it cannot be read.
    CheckpointMismatchError: its parameters differ in shape or dtype from
      the config's, one line per array.
  """
  directory, step = resolve_checkpoint(source, key)
  path = paths.join(directory, str(step), CHECKPOINT_STATE)
  target = {"params": abstract_params}
  with ocp.PyTreeCheckpointer() as checkpointer:
    try:
      saved = checkpointer.metadata(path).item_metadata.tree
    except Exception as e:  # a damaged or partial checkpoint
      raise ConfigError(f"{key}: {path} is not a readable checkpoint ({e})"
                        ) from e
    saved_params = saved.get("params", {})
    relayout = "layers" in saved_params and (
        is_stacked(saved_params) != is_stacked(abstract_params))
    if relayout:  # read the saved layout on the host, convert, then place
      target = {"params": to_layout(abstract_params, saved_params)}
    mismatch = checkpoint.describe_mismatch({"params": saved_params}, target)
    if mismatch:
      raise checkpoint.mismatch_error(
          f"{key}: the parameters in {path} do not fit the config", mismatch,
          "Use the config the checkpoint was written with (its run's "
          "config.json).")
    restore_args = (
        jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                     target) if relayout else
        ocp.checkpoint_utils.construct_restore_args(target))
    try:
      restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
          target, partial_restore=True, restore_args=restore_args))
    except Exception as e:  # orbax/tensorstore raise many types
      raise ConfigError(
          f"{key}: cannot read {path} ({type(e).__name__}: {e}); point at "
          "another checkpoint (`--step=N`, or .../checkpoints/<step>)") from e
  logging.info("loaded the parameters of checkpoint %s", path)
  if relayout:
    return _place(to_layout(restored["params"], abstract_params),
                  abstract_params), step
  return restored["params"], step


def _place(host_params: Any, abstract_params: Any) -> Any:
  """numpy arrays -> global arrays in the shardings of `abstract_params`
  (each process supplies the shards it holds)."""
  return jax.tree.map(
      lambda x, a: jax.make_array_from_callback(
          a.shape, a.sharding, lambda index, x=x: x[index]),
      host_params, abstract_params)


def abstract_model(model_config: ml_collections.ConfigDict,
                    device: jax.Device | None = None) -> tuple[Any, Any]:
  """(graphdef, parameter `jax.ShapeDtypeStruct`s on one device), from one
  `nnx.eval_shape` of the Transformer."""
  sharding = jax.sharding.SingleDeviceSharding(device or jax.devices()[0])
  model = nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0)))
  graphdef, _ = nnx.split(model)
  return graphdef, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def abstract_params(model_config: ml_collections.ConfigDict,
                    device: jax.Device | None = None) -> Any:
  """The parameter tree's `jax.ShapeDtypeStruct`s, placed on one device."""
  return abstract_model(model_config, device)[1]


def _checkpoint_source(workdir: str, step: int | None
                       ) -> tuple[ml_collections.ConfigDict, str]:
  """(run config, checkpoint path for `load_params`) of `workdir`, `step`."""
  workdir = paths.resolve(workdir)
  config = load_run_config(workdir)
  if step is None:
    return config, workdir
  source = checkpoint_dir(workdir, step)
  if not paths.isdir(source):
    raise ConfigError(f"--step={step}: {source} does not exist; steps "
                      f"there: {_steps(paths.parent(source))}")
  return config, source


def load_run(workdir: str, step: int | None = None
             ) -> tuple[ml_collections.ConfigDict, Any, int]:
  """(config, parameters on one device, step) of a run's checkpoint.

  Args:
    workdir: the run directory.
    step: a checkpoint step; None = the newest.

  Raises:
    ConfigError: not a run, or no checkpoint `step` (names `--step`).
    CheckpointMismatchError: the checkpoint does not fit the run's config.
  """
  config, source = _checkpoint_source(workdir, step)
  params, found = load_params(
      source, abstract_params(config.model), key="--workdir")
  return config, params, found


def load_model(workdir: str, step: int | None = None
               ) -> tuple[ml_collections.ConfigDict, Transformer, int]:
  """(config, `Transformer` holding the checkpoint's parameters and step
  (`transformer.bind`), step).

  Like `load_run` (same arguments and errors), with the model built.
  """
  config, source = _checkpoint_source(workdir, step)
  graphdef, abstract = abstract_model(config.model)
  params, found = load_params(source, abstract, key="--workdir")
  return config, bind(graphdef, params, found), found


def sharded_abstract_model(model_config: ml_collections.ConfigDict,
                           mesh: jax.sharding.Mesh) -> tuple[nnx.GraphDef, Any]:
  """(graphdef, parameter `jax.ShapeDtypeStruct`s in the FSDP shardings of
  `mesh`, `sharding.state_shardings`): the target `load_params` reads a
  sharded model into, or shapes to lower a step with."""
  graphdef, abstract = abstract_model(model_config)
  return graphdef, jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, sharding.state_shardings(abstract, mesh))


def load_sharded_model(workdir: str, step: int | None, mesh: jax.sharding.Mesh
                       ) -> tuple[ml_collections.ConfigDict, nnx.GraphDef,
                                  Any, int]:
  """(config, graphdef, parameters, step) of a run's checkpoint, the
  parameters read straight into the FSDP shardings of `mesh`
  (`sharded_abstract_model`), each process reading its own shards.

  Arguments and errors as for `load_run`.
  """
  config, source = _checkpoint_source(workdir, step)
  graphdef, abstract = sharded_abstract_model(config.model, mesh)
  params, found = load_params(source, abstract, key="--workdir")
  return config, graphdef, params, found


def _steps(directory: str) -> list[int]:
  """The steps of `directory`'s checkpoints (`<step>/state`), sorted."""
  return sorted(int(n) for n in paths.listdir(directory)
                if n.isdigit() and paths.isdir(paths.join(directory, n,
                                                          CHECKPOINT_STATE)))


def check_init_tokenizer(init_from: str, tokenizer_json: str,
                         allow_change: bool, key: str = "train.init_from"
                         ) -> None:
  """Refuses to fine-tune `init_from`'s weights with another tokenizer.

  Args:
    init_from: `train.init_from` (a run, its checkpoints/ or one step).
    tokenizer_json: the tokenizer this start loaded or trained.
    allow_change: `train.allow_config_change`: log a WARNING instead.
    key: the config key that gave `init_from` (`train.teacher` too).

  Raises:
    RunIdentityError: the run of `init_from` saved a tokenizer.json that
      differs, and `allow_change` is false (its embeddings would read other
      token ids). A checkpoint outside a run directory is not checked.
  """
  directory, _ = resolve_checkpoint(init_from, key)
  saved = paths.join(paths.parent(directory), TOKENIZER_JSON)
  if os.path.basename(directory) != CHECKPOINTS or not paths.isfile(saved):
    return
  with paths.open_file(saved, "rb") as f, open(tokenizer_json, "rb") as g:
    if identity.same_tokenizer(f.read(), g.read()):
      return
  message = (f"{key}={init_from!r} was trained with the tokenizer "
             f"{saved}, but this run loads {tokenizer_json}: its embeddings "
             "would read other token ids. Set data.tokenizer_path to "
             f"{saved}")
  if not allow_change:
    raise identity.RunIdentityError(
        message + " (or train.allow_config_change=true to go on anyway).")
  logging.warning("train.allow_config_change=true: %s", message)


def tokenizer_path(workdir: str) -> str:
  """`WORKDIR/tokenizer.json` as a local path (a gs:// run's is downloaded,
  `paths.local_file`).

  Raises:
    ConfigError: naming `--workdir` when the run has no tokenizer.json.
  """
  path = paths.join(workdir, TOKENIZER_JSON)
  if not paths.isfile(path):
    raise ConfigError(f"--workdir={workdir!r} has no {TOKENIZER_JSON}; "
                      "training writes it at its first start")
  return paths.local_file(path)


def hf_source_config(workdir: str) -> dict:
  """The imported HF folder's config.json (`RUN/hf_source`), or {} for a run
  trained here.

  Raises:
    ConfigError: naming the path when the file is not valid JSON.
  """
  path = paths.join(workdir, HF_SOURCE, "config.json")  # HF's name
  if not paths.isfile(path):
    return {}
  try:
    with paths.open_file(path, encoding="utf-8") as f:
      return json.load(f)
  except ValueError as e:
    raise ConfigError(f"{path} is not valid JSON ({e}): restore it from the "
                      "imported folder") from e


def special_token_ids(workdir: str, tokenizer) -> tuple[int, int | list[int]]:
  """(bos, eos) token ids of a run: the imported model's (bos may be None,
  eos a list), else the document separator for both (`end_of_text_id`)."""
  source = hf_source_config(workdir)
  if source.get("eos_token_id") not in (None, []):
    return source.get("bos_token_id"), source["eos_token_id"]
  eos = end_of_text_id(tokenizer, paths.join(workdir, TOKENIZER_JSON))
  return eos, eos


def context_length(workdir: str, config: ml_collections.ConfigDict) -> int:
  """The longest sequence the run's model reads, in tokens: an imported
  model's `max_position_embeddings` (4096 for 2B-4T), else `train.seq_len`
  (what it trained on; also what `export-hf` writes as the former)."""
  source = hf_source_config(workdir)
  return int(source.get("max_position_embeddings", config.train.seq_len))
