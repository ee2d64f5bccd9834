#!/usr/bin/env bash
# One run on this machine (CPU, or every local GPU/TPU core as one mesh).
#   launch/local.sh [--dry-run] CONFIG WORKDIR [--config.key=value ...]
#   launch/local.sh configs/sft.py:tiny workdirs/sft --config.optim.lr=1e-3
# Fake a multi-device mesh on CPU with XLA_FLAGS=--xla_force_host_platform_device_count=8.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
(($# >= 2)) || usage "launch/local.sh [--dry-run] CONFIG WORKDIR [--config.key=value ...]"
config=$1 workdir=$2
shift 2
cd "$(dirname "$0")/.."
run .venv/bin/python -m alignment.main --config="$config" --workdir="$workdir" "$@"
