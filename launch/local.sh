#!/usr/bin/env bash
# One run on this machine (CPU, or every local GPU/TPU core as one mesh).
#   launch/local.sh configs/sft.py:tiny workdirs/sft [--config.optim.lr=1e-3 ...]
# Fake a multi-device mesh on CPU with: XLA_FLAGS=--xla_force_host_platform_device_count=8 launch/local.sh ...
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:?usage: launch/local.sh CONFIG WORKDIR [--config.key=value ...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [--config.key=value ...]}
shift 2
exec .venv/bin/python -m alignment.main --config="$config" --workdir="$workdir" "$@"
