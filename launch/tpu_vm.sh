#!/bin/bash
# A Cloud TPU VM slice (multi-host): the same command on every worker.
#
#   TPU_NAME=my-v5p-16 ZONE=us-east5-a WORKDIR=/mnt/runs/bitnet_700m \
#     bash launch/tpu_vm.sh
#
# Each worker needs this repository at ~/bitnet_jax with
# `pip install -e '.[tpu]'`, and WORKDIR on a filesystem all workers mount.
# Check the step compiles and fits first, on any CPU machine:
#   python -m bitnet_jax.compile --config="$CONFIG" --topology=v5p-16 \
#     --config.mesh.data=1 --config.mesh.fsdp=-1
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
CONFIG="${CONFIG:-configs/bitnet_700m.py}"
WORKDIR="${WORKDIR:?set WORKDIR to a path every worker mounts}"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all \
  --command="cd ~/bitnet_jax && CONFIG=$CONFIG WORKDIR=$WORKDIR bash -c 'python -m bitnet_jax.main --config=\"\$CONFIG\" --workdir=\"\$WORKDIR\" --config.distributed.initialize=true --config.mesh.data=1 --config.mesh.fsdp=-1'"
