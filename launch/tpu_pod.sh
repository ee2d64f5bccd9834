#!/usr/bin/env bash
# One run on a Cloud TPU VM pod slice: create it (or reuse it), copy this checkout to every worker and
# install it there, run the same command on all workers (their logs stream here, and each keeps run.log),
# and delete the slice afterwards if asked.
#   TPU=my-v5p-32 ZONE=us-east5-a ACCELERATOR=v5p-32 launch/tpu_pod.sh [--dry-run] CONFIG WORKDIR [--config...]
#   TPU=my-v5p-32 ZONE=us-east5-a launch/tpu_pod.sh [--dry-run] delete
# Optional: PROJECT; VERSION (the TPU runtime, default v2-alpha-tpuv5); SPOT=1 (preemptible capacity);
# QUEUED=1 (ask through a queued resource and wait until it is granted); TEARDOWN=1 (delete after the run);
# REMOTE_DIR (the checkout's directory on the workers, default alignment).
# WORKDIR must be a gs:// path all workers share. After a preemption, run the same command again: the
# slice is recreated and alignment.main resumes from the workdir's latest checkpoint.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "$0")/common.sh"
if [[ "${1:-}" == "--dry-run" ]]; then DRY_RUN=1; shift; fi
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
accelerator=${ACCELERATOR:-v5p-8} version=${VERSION:-v2-alpha-tpuv5} remote=${REMOTE_DIR:-alignment}
where=(--zone="$ZONE")
[[ -n "${PROJECT:-}" ]] && where+=(--project="$PROJECT")
spot=()
[[ "${SPOT:-0}" == 1 ]] && spot=(--spot)

delete_slice() {
  if [[ "${QUEUED:-0}" == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$TPU" "${where[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$TPU" "${where[@]}" --quiet
  fi
}

if [[ "${1:-}" == "delete" ]]; then
  delete_slice
  exit 0
fi
(($# >= 2)) || usage "TPU=... ZONE=... launch/tpu_pod.sh [--dry-run] CONFIG WORKDIR [--config.key=value ...] | delete"
config=$1 workdir=$2
shift 2
repo=$(cd "$(dirname "$0")/.." && pwd)

# 1. The slice: reuse it if it exists, else create it (directly, or through a queued resource).
if ((DRY_RUN)); then
  run gcloud compute tpus tpu-vm describe "$TPU" "${where[@]}" --format='value(state)'
  echo "# if it does not exist:"
fi
if ((DRY_RUN)) || ! gcloud compute tpus tpu-vm describe "$TPU" "${where[@]}" --format='value(state)' >/dev/null 2>&1; then
  if [[ "${QUEUED:-0}" == 1 ]]; then
    run gcloud compute tpus queued-resources create "$TPU" --node-id="$TPU" "${where[@]}" \
      --accelerator-type="$accelerator" --runtime-version="$version" "${spot[@]}"
    if ((DRY_RUN)); then
      echo "# until it prints ACTIVE:"
      run gcloud compute tpus queued-resources describe "$TPU" "${where[@]}" --format='value(state.state)'
    else
      until [[ $(gcloud compute tpus queued-resources describe "$TPU" "${where[@]}" --format='value(state.state)') == ACTIVE ]]; do
        sleep 30
      done
    fi
  else
    run gcloud compute tpus tpu-vm create "$TPU" "${where[@]}" --accelerator-type="$accelerator" \
      --version="$version" "${spot[@]}"
  fi
fi

# 2. The code on every worker, installed with the TPU build of jax.
tarball=${TMPDIR:-/tmp}/alignment-$TPU.tar.gz
run tar -czf "$tarball" --exclude=./.git --exclude=./.venv --exclude=./.venv-garak --exclude=./workdirs -C "$repo" .
run gcloud compute tpus tpu-vm scp "$tarball" "$TPU:alignment.tar.gz" --worker=all "${where[@]}"
run gcloud compute tpus tpu-vm ssh "$TPU" --worker=all "${where[@]}" \
  --command="mkdir -p $remote && tar -xzf alignment.tar.gz -C $remote && make -C $remote install-tpu"

# 3. The same command on all workers; jax.distributed finds its peers from the slice's metadata.
args=$(quote --config="$config" --workdir="$workdir" "$@")
run gcloud compute tpus tpu-vm ssh "$TPU" --worker=all "${where[@]}" \
  --command="cd $remote && ALIGNMENT_DISTRIBUTED=1 .venv/bin/python -m alignment.main $args 2>&1 | tee -a run.log"

# 4. Tear down on request.
if [[ "${TEARDOWN:-0}" == 1 ]]; then
  delete_slice
fi
