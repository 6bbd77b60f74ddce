"""The launch recipes in launch/: one command everywhere, Slurm detection.

The README, the Slurm script, the GKE JobSet and the TPU VM script must run
the same training command (the Slurm script's two processes:
tests/integration/test_launch_slurm.py).
"""

import os

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


