#!/usr/bin/env bash
# The same command on every worker of a Cloud TPU VM pod slice; jax.distributed finds its peers.
#   TPU=my-v5e-32 ZONE=us-west4-a launch/tpu_pod.sh configs/dpo.py:smollm2 gs://bucket/runs/dpo1 [--config...]
# The repository must already be at $REPO on every worker with `make install` done there
# (e.g. gcloud compute tpus tpu-vm ssh $TPU --worker=all --command "git clone ... && make -C alignment install").
# The workdir must be shared by all workers (a gs:// bucket path): orbax writes one checkpoint from all hosts.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
REPO=${REPO:-alignment}
config=${1:?usage: TPU=... ZONE=... launch/tpu_pod.sh CONFIG WORKDIR [--config.key=value ...]}
workdir=${2:?usage: TPU=... ZONE=... launch/tpu_pod.sh CONFIG WORKDIR [--config.key=value ...]}
shift 2
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command \
  "cd $REPO && ALIGNMENT_DISTRIBUTED=1 .venv/bin/python -m alignment.main --config=$config --workdir=$workdir$args"
