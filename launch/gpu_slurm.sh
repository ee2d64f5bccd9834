#!/usr/bin/env bash
# A GPU cluster under SLURM: one process per node, each owning all GPUs of its node.
#   NODES=2 GPUS_PER_NODE=8 launch/gpu_slurm.sh [--dry-run] CONFIG WORKDIR [--config.key=value ...]
# Run from a checkout on a filesystem every node sees, after `make install-cuda` there. The script submits
# itself with sbatch; inside the allocation it starts the processes with srun, and jax.distributed takes
# the coordinator, the process count and each process's id from SLURM's variables (ALIGNMENT_DISTRIBUTED=1).
# WORKDIR must be shared by all nodes too: every process writes its part of each checkpoint there.
# Optional: PARTITION, TIME (sbatch's --time), ACCOUNT. The job's log is slurm-JOBID.out in the checkout.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
(($# >= 2)) || usage "NODES=2 GPUS_PER_NODE=8 launch/gpu_slurm.sh [--dry-run] CONFIG WORKDIR [--config.key=value ...]"
config=$1 workdir=$2
shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)

if [[ -z "${SLURM_JOB_ID:-}" ]]; then  # on the login node: submit this script
  sbatch_args=(--job-name=alignment --nodes="${NODES:-1}" --ntasks-per-node=1 --gpus-per-node="${GPUS_PER_NODE:-8}"
               --exclusive --chdir="$repo" --output="$repo/slurm-%j.out")
  [[ -n "${PARTITION:-}" ]] && sbatch_args+=(--partition="$PARTITION")
  [[ -n "${TIME:-}" ]] && sbatch_args+=(--time="$TIME")
  [[ -n "${ACCOUNT:-}" ]] && sbatch_args+=(--account="$ACCOUNT")
  run sbatch "${sbatch_args[@]}" "$repo/launch/gpu_slurm.sh" "$config" "$workdir" "$@"
else  # inside the allocation: the same command on every node
  run srun --kill-on-bad-exit=1 --ntasks-per-node=1 env ALIGNMENT_DISTRIBUTED=1 \
    "$repo/.venv/bin/python" -m alignment.main --config="$config" --workdir="$workdir" "$@"
fi
