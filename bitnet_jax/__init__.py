"""bitnet_jax: BitNet b1.58 training in JAX / Flax NNX.

Importing the package first imports JAX quietly on a host that has JAX's
CUDA plugin but no NVIDIA driver (a CPU host set up to compile for GPUs,
`bitnet_jax.aot`): the plugin's libraries print "Could not find cuda
drivers" several times at import, and initializing the CUDA backend there
prints a traceback before JAX falls back to the CPU. There JAX is imported
with standard error held back and its platforms set to the CPU (and TPU
chips, if any), unless `JAX_PLATFORMS` says otherwise. Compile-only GPU
devices (`jax.experimental.topologies`) need no backend and still work.
"""

import importlib.util
import os

_CUDA_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin")
_NVIDIA_DRIVER = ("/proc/driver/nvidia", "/dev/nvidiactl")


def cuda_plugin_without_driver() -> bool:
  """JAX's CUDA plugin is installed but no NVIDIA driver is loaded."""
  return (any(importlib.util.find_spec(p) for p in _CUDA_PLUGINS)
          and not any(os.path.exists(p) for p in _NVIDIA_DRIVER))


def _import_jax_quietly() -> None:
  import contextlib  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  if "jax" in sys.modules or not cuda_plugin_without_driver():
    return

  @contextlib.contextmanager
  def stderr_held_back():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
      with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)

  with stderr_held_back():
    import jax  # pylint: disable=g-import-not-at-top
  try:  # private modules: on any failure JAX only prints more at start
    from jax._src import hardware_utils, xla_bridge  # pylint: disable=g-import-not-at-top
    if os.environ.get("JAX_PLATFORMS") is None:
      tpu_chips = hardware_utils.num_available_tpu_chips_and_device_id()[0]
      jax.config.update("jax_platforms", "tpu,cpu" if tpu_chips else "cpu")
    with stderr_held_back():  # the plugin's initialize(): no backend yet
      xla_bridge._discover_and_register_pjrt_plugins()  # pylint: disable=protected-access
  except Exception:  # noqa: BLE001,S110
    pass


_import_jax_quietly()
