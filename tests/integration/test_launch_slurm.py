"""The Slurm script's environment starts a multi-process JAX run with nothing
but --config.distributed.initialize=true (jax.distributed's cluster detection
reads the SLURM_* variables): two processes on this host. (The recipes'
command itself: tests/unit/test_launch.py.)
"""

import os
import re
import socket
import subprocess
import sys

from drivers import REPO

WORKER = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, "tests")
import drivers
config = drivers.load_config("configs/tiny.py", {"distributed.initialize": True})
from bitnet_jax.distributed import sharding
sharding.initialize_distributed(config)
import jax
print("processes", jax.process_index(), jax.process_count(), jax.device_count())
"""


def test_slurm_environment_starts_two_processes():
  with open(os.path.join(REPO, "launch", "slurm.sbatch")) as f:
    assert "--config.distributed.initialize=true" in f.read()
  with socket.socket() as s:  # a job id whose derived port is free
    s.bind(("127.0.0.1", 0))
    job_id = str(s.getsockname()[1] % 10000 + 1)
  procs = []
  for rank in range(2):
    env = {**os.environ, "SLURM_JOB_ID": job_id, "SLURM_NTASKS": "2",
           "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank),
           "SLURM_STEP_NODELIST": "localhost",
           "SLURM_JOB_NODELIST": "localhost"}
    procs.append(subprocess.Popen([sys.executable, "-c", WORKER], cwd=REPO,
                                  env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outputs = [p.communicate(timeout=180)[0] for p in procs]
  for rank, out in enumerate(outputs):
    found = re.search(r"processes (\d) (\d) (\d)", out)
    assert found, f"rank {rank} did not start:\n{out[-2000:]}"
    assert found.groups() == (str(rank), "2", "4"), (
        f"rank {rank}: (index, count, devices) = {found.groups()}")
