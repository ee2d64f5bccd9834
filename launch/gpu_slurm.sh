#!/usr/bin/env bash
# A SLURM job with one process per node, each owning all GPUs of its node; jax reads SLURM's variables.
#   sbatch --nodes=2 --gpus-per-node=8 launch/gpu_slurm.sh configs/sft.py:smollm2 /shared/runs/sft1 [--config...]
#SBATCH --job-name=alignment
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
set -euo pipefail
config=${1:?usage: sbatch launch/gpu_slurm.sh CONFIG WORKDIR [--config.key=value ...]}
workdir=${2:?usage: sbatch launch/gpu_slurm.sh CONFIG WORKDIR [--config.key=value ...]}
shift 2
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
# The workdir must be on a filesystem every node sees.
srun --kill-on-bad-exit=1 env ALIGNMENT_DISTRIBUTED=1 \
  .venv/bin/python -m alignment.main --config="$config" --workdir="$workdir" "$@"
