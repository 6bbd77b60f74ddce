"""The launch recipes in launch/: one command everywhere, Slurm detection.

The README, the Slurm script, the GKE JobSet and the TPU VM script must run
the same training command; the Slurm script's environment must start a
multi-process JAX run with nothing but --config.distributed.initialize=true
(jax.distributed's cluster detection reads the SLURM_* variables).
"""

import os
import re
import socket
import subprocess
import sys

import yaml

from drivers import REPO

COMMAND = ('python -m bitnet_jax.main --config="$CONFIG" --workdir="$WORKDIR" '
           "--config.distributed.initialize=true --config.mesh.data=1 "
           "--config.mesh.fsdp=-1")


def _read(path):
  with open(os.path.join(REPO, path)) as f:
    return f.read()


def test_every_recipe_runs_the_readme_command():
  assert COMMAND in _read("README.md"), "README lacks the launch command"
  assert COMMAND in _read("launch/slurm.sbatch")
  tpu_vm = _read("launch/tpu_vm.sh").replace('\\"', '"').replace("\\$", "$")
  assert COMMAND in tpu_vm and "--worker=all" in tpu_vm
  jobset = yaml.safe_load(_read("launch/jobset.yaml"))
  pod = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
  container = pod["spec"]["containers"][0]
  assert container["args"] == [COMMAND], "the JobSet runs another command"
  env = {e["name"] for e in container["env"]}
  assert {"CONFIG", "WORKDIR"} <= env, "the command's variables are unset"


def test_jobset_asks_for_the_chips_of_its_topology():
  jobset = yaml.safe_load(_read("launch/jobset.yaml"))
  job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
  spec = job["template"]["spec"]
  chips = 1
  for size in spec["nodeSelector"]["cloud.google.com/gke-tpu-topology"].split(
      "x"):
    chips *= int(size)
  per_host = spec["containers"][0]["resources"]["limits"]["google.com/tpu"]
  assert job["parallelism"] * per_host == chips, (
      f"{job['parallelism']} hosts x {per_host} chips != {chips} chips")


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
  assert "--config.distributed.initialize=true" in _read("launch/slurm.sbatch")
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
