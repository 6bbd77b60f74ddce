"""Runs written before the package layout keep restoring: the checkpoint's
array paths and the run directory's names are those of commit b95693b.

`testdata/b95693b_tiny_run.json` was read off a run that commit's code wrote
(`python -m bitnet_jax.main --config=configs/tiny.py`): the file names of its
run directory, the items of `checkpoints/60/` and every array of the `state`
item (orbax path, shape, dtype). Orbax restores a checkpoint by those paths,
so a model, optimizer or train-state change that renames one would strand
every earlier run.
"""

import json
import os

import jax
import numpy as np

from bitnet_jax.distributed import sharding
from bitnet_jax.model.tree_paths import path_name
from bitnet_jax.optim import optimizer
from bitnet_jax.runs import directory
from bitnet_jax.training import train_state

RECORDED = os.path.join(os.path.dirname(__file__), "testdata",
                        "b95693b_tiny_run.json")


def _recorded():
  with open(RECORDED, encoding="utf-8") as f:
    return json.load(f)


def test_the_train_state_has_the_checkpoint_paths_of_b95693b(tiny_config):
  mesh = sharding.make_mesh(tiny_config.mesh, jax.devices()[:1])
  tx = optimizer.make_optimizer(tiny_config)
  _, abstract, _ = train_state.create_train_state(tiny_config, mesh, tx,
                                                  initialize=False)
  ours = {path_name(path): [list(leaf.shape), np.dtype(leaf.dtype).name]
          for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}
  theirs = _recorded()["state"]
  assert len(theirs) > 40, "the recording holds too few arrays to mean much"
  missing, extra = sorted(theirs.keys() - ours), sorted(ours.keys() - theirs)
  assert not missing and not extra, (
      f"checkpoint paths changed: b95693b's runs have {missing[:5]}, this "
      f"code restores {extra[:5]}")
  changed = {k: (theirs[k], ours[k]) for k in theirs if theirs[k] != ours[k]}
  assert not changed, f"shapes or dtypes changed: {changed}"


def test_the_run_directory_names_are_those_of_b95693b():
  recorded = _recorded()
  names = {directory.CHECKPOINTS, directory.CONFIG_JSON,
           directory.CONFIG_HISTORY, directory.METRICS, directory.SAMPLES,
           directory.TENSORBOARD, directory.TOKENIZER_JSON}
  assert names == set(recorded["run_directory"]), (
      f"a run directory now names {sorted(names)}, b95693b wrote "
      f"{recorded['run_directory']}")
  assert directory.CHECKPOINT_STATE in recorded["checkpoint_items"]
