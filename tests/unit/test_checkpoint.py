"""Checkpointer: retention keeps the best state, failures are loud and named."""

import os
import shutil
import subprocess

import numpy as np
import pytest

from bitnet_jax.runs import checkpoint
from bitnet_jax.runs.directory import DAMAGED_CHECKPOINTS, damaged_steps

from drivers import abstract_of, grain_iterator, save_steps, small_state


def test_retention_keeps_the_newest_and_the_best_eval_checkpoint(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1)
  save_steps(ckpt, {1: 5.0, 2: 3.0, 3: 9.0, 4: None})
  assert ckpt.all_steps() == [2, 4], (
      f"kept {ckpt.all_steps()}: want the newest (4) and best eval (2)")
  ckpt.close()

  reopened = checkpoint.Checkpointer(str(tmp_path), keep=1)
  save_steps(reopened, {5: 7.0})
  assert reopened.all_steps() == [2, 5], (
      "after a restart the best-eval checkpoint was forgotten and deleted: "
      f"{reopened.all_steps()}")
  reopened.close()


def test_weights_only_checkpoints_are_never_pruned_nor_restored_as_state(
    tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1)
  ckpt.save_weights(0, small_state()["params"], {"tokens_seen": 0})
  assert ckpt.restore(abstract_of(small_state()), grain_iterator()) is None, (
      "a weights-only checkpoint was restored as a train state")
  save_steps(ckpt, {1: None, 2: None, 3: None})
  assert ckpt.all_steps() == [0, 3], (
      f"kept {ckpt.all_steps()}: the imported weights (0) must stay")
  ckpt.close()
  reopened = checkpoint.Checkpointer(str(tmp_path), keep=1)
  assert reopened.is_weights_only(0) and not reopened.is_weights_only(3)
  reopened.close()


def test_run_facts_are_restored_with_the_state(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
  save_steps(ckpt, {3: 4.5})
  restored = ckpt.restore(abstract_of(small_state()), grain_iterator())
  assert restored.step == 3
  assert restored.run == {"tokens_seen": 30, "eval_loss": 4.5}
  np.testing.assert_array_equal(restored.state["params"]["w"],
                                small_state()["params"]["w"])
  ckpt.close()


def test_replicated_arrays_small_and_large_round_trip_on_eight_devices(
    tmp_path):
  """Small arrays are copied from one replica, those of at least
  REPLICA_PARALLEL_MIN_SLICE_BYTES per replica slice still replica-parallel
  (orbax's default): both must come back exactly."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rows = 8 * checkpoint.REPLICA_PARALLEL_MIN_SLICE_BYTES // (4 * 256)
  state = {"step": np.int32(5), "params": {
      "scale": np.linspace(0, 1, 64, dtype=np.float32),
      "big": np.arange(rows * 256, dtype=np.float32).reshape(rows, 256)}}
  on_devices = jax.device_put(state, replicated)
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=1)
  handler = ocp.type_handlers.get_type_handler(jax.Array)
  assert handler._min_slice_bytes_for_replica_parallel == (  # pylint: disable=protected-access
      checkpoint.REPLICA_PARALLEL_MIN_SLICE_BYTES), (
          "orbax's array handler still slices small arrays per replica")
  ckpt.save(5, on_devices, grain_iterator(), {"tokens_seen": 1})
  ckpt.wait()
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=replicated), on_devices)
  restored = ckpt.restore(target, grain_iterator())
  for name in ("scale", "big"):
    np.testing.assert_array_equal(restored.state["params"][name],
                                  state["params"][name],
                                  err_msg=f"{name} changed in the round trip")
  ckpt.close()


def test_shape_mismatch_lists_each_differing_array_on_one_line(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2)
  save_steps(ckpt, {1: None})
  with pytest.raises(checkpoint.CheckpointMismatchError) as caught:
    ckpt.restore(abstract_of(small_state(width=16)), grain_iterator())
  message = str(caught.value)
  assert "params/w: checkpoint (4, 8) float32, config (4, 16) float32" in (
      message), message
  assert "strict" not in message, "orbax's advice to disable checks leaked"
  assert "step" not in message.split("differing arrays:")[1].split(
      "Resume")[0], "an array that matches was listed"
  ckpt.close()


@pytest.mark.parametrize("damage", ["truncate_array_file", "delete_state"])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_previous_restored(
    tmp_path, damage):
  directory = tmp_path / "checkpoints"
  ckpt = checkpoint.Checkpointer(str(directory), keep=3)
  save_steps(ckpt, {1: None, 2: None})
  ckpt.close()
  state_dir = directory / "2" / "state"
  if damage == "delete_state":
    shutil.rmtree(state_dir)
  else:
    data_files = [os.path.join(root, name)
                  for root, _, names in os.walk(state_dir)
                  for name in names if f"{os.sep}d{os.sep}" in
                  os.path.join(root, name)]
    assert data_files, "found no array data file to damage"
    for path in data_files:
      with open(path, "r+b") as f:
        f.truncate(max(1, os.path.getsize(path) // 3))

  reopened = checkpoint.Checkpointer(str(directory), keep=3)
  restored = reopened.restore(abstract_of(small_state()), grain_iterator())
  assert restored is not None and restored.step == 1, (
      "the previous checkpoint was not restored")
  moved = os.listdir(tmp_path / DAMAGED_CHECKPOINTS)
  assert len(moved) == 1 and moved[0].startswith("2-"), (
      f"damaged checkpoint not kept aside: {moved}")
  assert damaged_steps(str(tmp_path)) == [2], moved
  assert reopened.all_steps() == [1]
  reopened.close()


def test_a_save_into_an_unwritable_directory_raises_naming_the_path(tmp_path):
  directory = tmp_path / "checkpoints"
  ckpt = checkpoint.Checkpointer(str(directory), keep=2)
  save_steps(ckpt, {1: None})
  if subprocess.run(["chattr", "+i", str(directory)],
                    capture_output=True).returncode:
    pytest.skip("chattr +i is not supported here (root ignores chmod)")
  try:
    with pytest.raises(checkpoint.CheckpointSaveError,
                       match=str(directory)) as caught:
      ckpt.save(2, small_state(), grain_iterator(), {"tokens_seen": 20})
    assert "not permitted" in str(caught.value) or "denied" in str(
        caught.value), f"the cause is missing: {caught.value}"
  finally:
    subprocess.run(["chattr", "-i", str(directory)], check=True)
  ckpt.close()
