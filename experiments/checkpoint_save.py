r"""Times checkpoint saves of a config's train state: orbax's default array
handler against the one `bitnet_jax.runs.checkpoint` registers.

Orbax saves a replicated array replica-parallel by default: one slice per
replica, each an eager slice op. `runs/checkpoint.py` copies arrays whose
slice would be under `REPLICA_PARALLEL_MIN_SLICE_BYTES` from one replica.
This script builds the config's train state on every local device (its
usual sharding), saves it `--saves` times with each handler in turn (the
first save, which compiles what the transfer runs, is shown alone) and
prints one Markdown row per handler: seconds per save (blocking part, and
until the save is finished). Restores each last save and checks it equals the
state.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python experiments/checkpoint_save.py --config=configs/tiny.py \
      [--order=bitnet_jax,orbax]
"""

import os
import tempfile
import time

import grain
import jax
import numpy as np
from absl import app, flags

from bitnet_jax.distributed import sharding
from bitnet_jax.optim import optimizer
from bitnet_jax.runs import checkpoint, reader
from bitnet_jax.training import train_state

_CONFIG = flags.DEFINE_string("config", "configs/tiny.py", "config file")
_SAVES = flags.DEFINE_integer("saves", 6, "saves timed per handler")
_ORDER = flags.DEFINE_list("order", ["orbax", "bitnet_jax"],
                           "the handlers, in the order they are timed (the "
                           "first also pays orbax's first use)")


def _data_position():
  """A grain iterator, whose position a checkpoint saves beside the state."""
  return iter(grain.MapDataset.range(8).to_iter_dataset())


def _time_saves(state, directory: str) -> tuple[float, float, float]:
  """Seconds: (the first save, finished: it compiles what the transfer
  runs; the mean of the others: blocking part, and finished)."""
  ckpt = checkpoint.Checkpointer(directory, keep=2)
  blocking, total = [], []
  for step in range(_SAVES.value + 1):
    start = time.perf_counter()
    ckpt.save(step, state, _data_position(), {"tokens_seen": step})
    saved = time.perf_counter()
    ckpt.wait()
    blocking.append(saved - start)
    total.append(time.perf_counter() - start)
  ckpt.close()
  return total[0], float(np.mean(blocking[1:])), float(np.mean(total[1:]))


def main(argv):
  del argv
  config = reader.load_config_file(_CONFIG.value)
  mesh = sharding.make_mesh(config.mesh)
  _, state, _ = train_state.create_train_state(
      config, mesh, optimizer.make_optimizer(config))
  leaves = jax.tree.leaves(state)
  n_bytes = sum(x.size * x.dtype.itemsize for x in leaves)
  print(f"{_CONFIG.value}: {len(leaves)} arrays, {n_bytes:,} bytes, "
        f"{jax.device_count()} devices, {_SAVES.value} saves timed each\n")
  print("| array handler | first save, s | s per save, blocking | "
        "s per save, finished |")
  print("| --- | --- | --- | --- |")
  names = {"orbax": "orbax default (replica-parallel for every array)",
           "bitnet_jax": "bitnet_jax (small arrays from one replica)"}
  for key in _ORDER.value:
    name = names[key]
    checkpoint.Checkpointer(tempfile.mkdtemp(), keep=1).close()  # ours, once
    checkpoint.register_array_handler(  # ... and then the one timed
        None if key == "orbax" else checkpoint.REPLICA_PARALLEL_MIN_SLICE_BYTES)
    with tempfile.TemporaryDirectory() as directory:
      first, blocking, finished = _time_saves(state,
                                              os.path.join(directory, "c"))
      ckpt = checkpoint.Checkpointer(os.path.join(directory, "c"), keep=2)
      restored = ckpt.restore(jax.tree.map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                         sharding=x.sharding), state),
          _data_position())
      ckpt.close()
      for a, b in zip(jax.tree.leaves(restored.state), leaves):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    print(f"| {name} | {first:.2f} | {blocking:.3f} | {finished:.3f} |")


if __name__ == "__main__":
  app.run(main)
